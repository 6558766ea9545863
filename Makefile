# flatfs: `make demo` and `make test` work on a fresh Debian machine as root.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

PREFIX ?= /usr/local
DESTDIR ?=
# What `make install` writes, relative to $(DESTDIR)$(PREFIX); `make uninstall` removes exactly these.
INSTALL_DIRS  := lib/flatfs share/doc/flatfs
INSTALL_FILES := bin/flatfs share/man/man1/flatfs.1 share/man/man1/flatfs-mount.1 \
                 share/man/man1/flatfs-convert.1 share/man/man1/flatfs-measure.1 \
                 lib/systemd/system/flatfs@.service
INSTALL_FILES += share/man/man1/flatfs-serve.1 \
                 lib/systemd/system/flatfs-serve@.service lib/systemd/system/flatfs-serve@.socket

.PHONY: all demo test test-fast check bench fuzz-long deps-run deps-test venv clean install uninstall

all: test

deps-run:
	@sh .ci/ensure-deps run

deps-test:
	@sh .ci/ensure-deps test

$(BIN)/.stamp: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@$(BIN)/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@touch $@

venv: $(BIN)/.stamp

demo: deps-run venv
	@$(BIN)/python demo/demo.py

test: deps-test venv
	@$(BIN)/python -m pytest $(PYTEST_ARGS)

check: deps-run venv
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .
	@$(BIN)/mypy

test-fast: venv
	@$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: deps-test venv
	@$(BIN)/python bench/run.py $(BENCH_ARGS)

fuzz-long: deps-test venv
	@FLATFS_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest tests/fuzz $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# flatfs in its own venv under PREFIX/lib/flatfs (the system Python is never touched),
# PREFIX/bin/flatfs a link to it, the man pages, and the systemd unit with PREFIX's paths.
install: deps-run
	@case '$(PREFIX)' in *[[:space:]]*) echo "make install: PREFIX must not contain white space (the systemd unit could not name it)" >&2; exit 1;; esac
	@root='$(DESTDIR)$(PREFIX)'; set -e; \
	rm -rf "$$root/lib/flatfs"; \
	$(PYTHON) -m venv "$$root/lib/flatfs"; \
	"$$root/lib/flatfs/bin/python" -m pip install -q --no-cache-dir . >"$$root/lib/flatfs/install.log" 2>&1 \
	  || { cat "$$root/lib/flatfs/install.log"; exit 1; }; \
	rm -f "$$root/lib/flatfs/install.log"; \
	install -d "$$root/bin" "$$root/share/man/man1" "$$root/lib/systemd/system" "$$root/share/doc/flatfs"; \
	ln -sfn "$(PREFIX)/lib/flatfs/bin/flatfs" "$$root/bin/flatfs"; \
	install -m644 docs/man/flatfs.1 docs/man/flatfs-mount.1 docs/man/flatfs-convert.1 docs/man/flatfs-measure.1 "$$root/share/man/man1/"; \
	sed 's|/usr/local/bin/flatfs|$(PREFIX)/bin/flatfs|g' systemd/flatfs@.service \
	  >"$$root/lib/systemd/system/flatfs@.service"; \
	install -m644 systemd/example.conf "$$root/share/doc/flatfs/example.conf"; \
	install -m644 docs/man/flatfs-serve.1 "$$root/share/man/man1/"; \
	sed 's|/usr/local/bin/flatfs|$(PREFIX)/bin/flatfs|g' systemd/flatfs-serve@.service \
	  >"$$root/lib/systemd/system/flatfs-serve@.service"; \
	install -m644 systemd/flatfs-serve@.socket "$$root/lib/systemd/system/"; \
	echo "installed flatfs in $(PREFIX) ($(PREFIX)/bin/flatfs, unit flatfs@.service)"

uninstall:
	@root='$(DESTDIR)$(PREFIX)'; \
	for f in $(INSTALL_FILES); do rm -f "$$root/$$f"; done; \
	for d in $(INSTALL_DIRS); do rm -rf "$$root/$$d"; done; \
	for d in bin share/man/man1 share/man lib/systemd/system lib/systemd lib share/doc share; do \
	  rmdir "$$root/$$d" 2>/dev/null || true; done; \
	echo "removed flatfs from $(PREFIX)"
