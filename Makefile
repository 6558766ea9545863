# flatfs: `make demo` and `make test` work on a fresh Debian machine as root.
# The interpreter of the venvs: the system's, so that an installed flatfs runs for every user
# (a pyenv or conda python3 first on root's PATH would not); PYTHON=... chooses another.
PYTHON ?= /usr/bin/python3
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
	@PYTHON='$(PYTHON)' sh .ci/ensure-deps run

deps-test:
	@PYTHON='$(PYTHON)' sh .ci/ensure-deps test

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
# With DESTDIR (staging for a package), the venv is made in DESTDIR/PREFIX and every path in it
# that names the staging folder (scripts' #! lines, pyvenv.cfg, compiled files) is rewritten to
# PREFIX, so the tree runs once moved into place. INSTALLED_DIRS records the folders install
# created (PREFIX and its parents included, unless staged), so that uninstall removes them, and
# only them, once empty.
INSTALLED_DIRS := lib/flatfs/installed-dirs
# Every folder install writes into, relative to PREFIX, deepest last
install_dirs = $$(for d in $(INSTALL_DIRS) $(dir $(INSTALL_FILES)); do d=$${d%/}; \
	  while [ "$$d" != . ]; do echo "$$d"; d=$$(dirname "$$d"); done; done | sort -u)

install: deps-run
	@case '$(PREFIX)' in *[[:space:]]*) echo "make install: PREFIX must not contain white space (the systemd unit could not name it)" >&2; exit 1;; esac
	@case '$(PREFIX)' in /*) ;; *) echo "make install: PREFIX must be an absolute path" >&2; exit 1;; esac
	@root='$(DESTDIR)$(PREFIX)'; set -e; \
	created=$$(cat "$$root/$(INSTALLED_DIRS)" 2>/dev/null || true); \
	p='$(PREFIX)'; [ -n '$(DESTDIR)' ] || while [ ! -d "$$p" ] && [ "$$p" != / ]; do created="$$created $$p"; p=$$(dirname "$$p"); done; \
	for d in $(install_dirs); do [ -d "$$root/$$d" ] || created="$$created $(PREFIX)/$$d"; done; \
	rm -rf "$$root/lib/flatfs"; \
	$(PYTHON) -m venv "$$root/lib/flatfs"; \
	"$$root/lib/flatfs/bin/python" -m pip install -q --no-cache-dir --no-compile . >"$$root/lib/flatfs/install.log" 2>&1 \
	  || { cat "$$root/lib/flatfs/install.log"; exit 1; }; \
	rm -f "$$root/lib/flatfs/install.log"; \
	stage=$$(cd "$$root/lib/flatfs" && pwd); \
	if [ "$$stage" != '$(PREFIX)/lib/flatfs' ]; then \
	  grep -rlI --null -F "$$stage" "$$stage/bin" "$$stage/pyvenv.cfg" | xargs -0 -r sed -i "s|$$stage|$(PREFIX)/lib/flatfs|g"; \
	fi; \
	"$$root/lib/flatfs/bin/python" -m compileall -q -f -s "$${stage%/lib/flatfs}" -p '$(PREFIX)' "$$stage/lib" >/dev/null; \
	printf '%s\n' $$created | sort -u >"$$root/$(INSTALLED_DIRS)"; \
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
	created=$$(cat "$$root/$(INSTALLED_DIRS)" 2>/dev/null); \
	for f in $(INSTALL_FILES); do rm -f "$$root/$$f"; done; \
	for d in $(INSTALL_DIRS); do rm -rf "$$root/$$d"; done; \
	for d in $$(printf '%s\n' $$created | sort -r); do rmdir "$(DESTDIR)$$d" 2>/dev/null || true; done; \
	echo "removed flatfs from $(PREFIX)"
