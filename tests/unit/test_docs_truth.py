"""The docs stay true to the program: synopses, value lists, format lists and the README's
options table are checked against the click commands and FORMATS, both ways.

Each failure names the option or format, and the document to fix. No qemu, no FUSE.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest

from flatfs.cli import main
from flatfs.cli.common import chain_options
from flatfs.formats import FOREIGN_MAGICS, FORMATS

from ..helpers.manpages import PAGES, option_strings, plain, read, sections

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FOREIGN = {name for _, _, name in FOREIGN_MAGICS}
NAMES = {n for f in FORMATS for n in (f.name, *f.aliases)}  # what -f accepts
PLACEHOLDERS = {"OPTIONS", "CHAIN-OPTIONS"}


def _chain_option_strings() -> set[str]:
    @click.command()
    @chain_options()
    def probe(**_: object) -> None:
        pass

    return set(option_strings(probe))


CHAIN = _chain_option_strings()


def _lines(roff: str) -> str:
    """A section's text, macro names dropped, as one line."""
    text = plain(roff)
    text = re.sub(r"^\.[A-Z]{1,2}\b ?", "", text, flags=re.M)
    return " ".join(text.replace('"', " ").split())


def synopses() -> list[tuple[str, str, str]]:
    """(page, command, its synopsis text) for every `.B flatfs COMMAND` block of every page."""
    out = []
    for page in PAGES:
        syn = sections(read(page)).get("SYNOPSIS", "")
        for block in re.split(r"(?m)^\.B flatfs\b", syn)[1:]:
            first, _, rest = block.partition("\n")
            cmd = first.strip()
            out.append((page, cmd or "flatfs", _lines(rest)))
    return out


def command(name: str) -> click.Command:
    return main if name == "flatfs" else main.commands[name]


def choices_of(cmd: click.Command) -> dict[str, set[str]]:
    """Option string -> the values it accepts, for the options with a fixed list."""
    out: dict[str, set[str]] = {}
    for p in cmd.params:
        if isinstance(p, click.Option) and isinstance(p.type, click.Choice):
            for o in p.opts:
                out[o] = set(map(str, p.type.choices))
    return out


# [ -f | --format qcow2 | raw ]: the option's spellings, then its value (a list, or a name)
_ENTRY = re.compile(
    r"\[\s*((?:-{1,2}[\w-]+\s*\|\s*)*-{1,2}[\w-]+)((?:\s+[^\[\]\s|]+(?:\s*\|\s*[^\[\]\s|]+)*)?)"
)


@pytest.mark.parametrize(("page", "name", "text"), synopses(), ids=lambda v: v if len(str(v)) < 30 else "")
def test_each_synopsis_lists_what_its_command_takes(page: str, name: str, text: str) -> None:
    assert name == "flatfs" or name in main.commands, (
        f"{page}: SYNOPSIS shows 'flatfs {name}', no such command"
    )
    cmd = command(name)
    has = set(option_strings(cmd)) | {"-h", "--help"}
    shown: set[str] = set()
    values = choices_of(cmd)
    for m in _ENTRY.finditer(text):
        opts = [o.strip() for o in m.group(1).split("|")]
        shown.update(opts)
        for o in opts:
            assert o in has, f"{page}: SYNOPSIS of 'flatfs {name}' shows {o}, which the command does not have"
        listed = [v.strip() for v in m.group(2).split("|")] if "|" in m.group(2) else []
        if listed and opts[0] in values:
            want = values[opts[0]]
            assert set(listed) == want, (
                f"{page}: SYNOPSIS of 'flatfs {name}' lists {opts[0]} values {sorted(listed)}; "
                f"the command takes {sorted(want)} (write them, or a name such as FORMAT)"
            )
    words = set(re.findall(r"\[\s*([A-Z-]+)\s*\]", text))
    missing = [
        o
        for o in option_strings(cmd)
        if o not in shown and not ("OPTIONS" in words or (o in CHAIN and "CHAIN-OPTIONS" in words))
    ]
    assert not missing, f"{page}: SYNOPSIS of 'flatfs {name}' does not show {missing} (nor [OPTIONS])"


@pytest.mark.parametrize("page", PAGES)
def test_value_lists_in_the_options_sections_are_the_real_ones(page: str) -> None:
    """`.BR -f ", " --format " " qcow2|raw`: the listed values are the ones the option takes."""
    text = plain(sections(read(page)).get("OPTIONS", ""))
    every: dict[str, list[set[str]]] = {}
    for name in main.commands:
        for o, values in choices_of(main.commands[name]).items():
            every.setdefault(o, []).append(values)
    for line in text.splitlines():
        m = re.match(r"\.B[IR]?\s+(.*)$", line)
        if not m or "|" not in m.group(1):
            continue
        words = m.group(1).replace('"', " ").replace(",", " ").split()
        opts = [w for w in words if w.startswith("-")]
        listed = [w for w in words if not w.startswith("-")]
        values = {v for w in listed for v in w.split("|") if v}
        for o in opts:
            if o in every and len(values) > 1:
                assert values in every[o], (
                    f"{page}: OPTIONS lists {o} values {sorted(values)}; it takes {sorted(every[o][0])}"
                )


def test_the_readme_options_table_has_every_chain_option_and_no_other() -> None:
    rows = re.findall(r"^\| `([^`]*)`", README, re.M)
    table = {o for r in rows for o in re.findall(r"-{1,2}[\w-]+", r.split()[0].replace("/", " "))}
    missing = sorted(CHAIN - table)
    assert not missing, f"README.md: the chain options table does not list {missing}"
    extra = sorted(o for o in table if o.startswith("--") and o not in CHAIN)
    assert not extra, f"README.md: the chain options table lists {extra}, which are not chain options"


def test_the_readme_format_option_lists_every_format_name() -> None:
    row = next(line for line in README.splitlines() if line.startswith("| `-f/--format"))
    listed = set(re.findall(r"[a-z0-9]+", row.split("format:", 1)[1].split("(default", 1)[0])) - {"or"}
    assert listed == NAMES, f"README.md: -f/--format lists {sorted(listed)}; it takes {sorted(NAMES)}"


def _names_in(text: str) -> set[str]:
    return {f.name for f in FORMATS if any(re.search(rf"(?i)\b{n}\b", text) for n in (f.name, *f.aliases))}


def test_the_format_table_and_the_descriptions_name_every_format() -> None:
    table = [line.split("|")[1] for line in README.splitlines() if re.match(r"\| \S.* \| .* \| .* \|$", line)]
    first = " ".join(table[table.index(" format ") + 1 :]) if " format " in table else ""
    every = {f.name for f in FORMATS}
    assert _names_in(first) == every, f"README.md: the format table lacks {sorted(every - _names_in(first))}"
    desc = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    assert _names_in(desc) == every, f"pyproject.toml: description lacks {sorted(every - _names_in(desc))}"
    helptext = main.help or ""
    assert _names_in(helptext) == every, f"flatfs --help lacks {sorted(every - _names_in(helptext))}"
    formats = plain(sections(read("flatfs.1")).get("FORMATS", ""))
    assert _names_in(formats) == every, f"flatfs.1: FORMATS lacks {sorted(every - _names_in(formats))}"


@pytest.mark.parametrize("doc", ["docs/man/flatfs.1", "README.md", "docs/security.md", "docs/qemu-compat.md"])
def test_what_is_refused_by_name_is_not_a_format_flatfs_reads(doc: str) -> None:
    text = " ".join(plain((ROOT / doc).read_text(encoding="utf-8")).split())
    for m in re.finditer(r"\(([^()]*)\)\s*(?:is|are) refused by name", text):
        names = {n.strip() for n in m.group(1).split(",")}
        read_ = sorted(names & NAMES)
        assert not read_, f"{doc}: says {read_} are refused by name, but flatfs reads them"


def test_the_check_catches_a_synopsis_that_lies() -> None:
    """Not vacuous: a value list that is short by one, and an option that does not exist."""
    (page, name, text) = next(s for s in synopses() if s[:2] == ("flatfs-mount.1", "mount"))
    assert "--format" in text
    lying = text.replace("--max-depth", "--max-width")
    with pytest.raises(AssertionError, match="--max-width"):
        test_each_synopsis_lists_what_its_command_takes(page, name, lying)


def test_flatfs_1_lists_every_name_format_takes() -> None:
    text = plain(sections(read("flatfs.1")).get("OPTIONS", ""))
    entry = text.split('.BR -f ", " --format', 1)[1].split(".TP", 1)[0]
    lines = []
    for line in entry.split("one of:", 1)[1].splitlines():
        lines.append(line)
        if line.endswith(" ."):  # the list's last name ends the sentence
            break
    listed = set(re.findall(r"^\.BR? (\w+)", "\n".join(lines), re.M))
    assert listed == NAMES, f"flatfs.1: -f/--format lists {sorted(listed)}; it takes {sorted(NAMES)}"


@pytest.mark.parametrize(
    "doc", [*(f"docs/man/{p}" for p in PAGES), "README.md", "docs/security.md", "docs/qemu-compat.md"]
)
def test_no_doc_says_an_unrecorded_backing_is_probed_for_qcow2_only(doc: str) -> None:
    """It is probed for every format in FORMATS (never as raw without --allow-probe-raw)."""
    text = " ".join(plain((ROOT / doc).read_text(encoding="utf-8")).split())
    assert "for qcow2 only" not in text, f"{doc}: says a backing file is probed for qcow2 only"


def test_the_readme_already_exists_example_is_the_real_message(tmp_path: Path) -> None:
    src, target = tmp_path / "vm.raw", tmp_path / "flat.qcow2"
    src.write_bytes(b"\0" * 65536)
    target.write_bytes(b"")
    r = subprocess.run(
        [sys.executable, "-m", "flatfs", "convert", "-f", "raw", src, target], capture_output=True, text=True
    )
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().replace(str(target), "flat.qcow2")
    assert line in README, f"README.md: the 'already exists' example is not the real message: {line}"
