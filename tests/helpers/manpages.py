"""Reading the man pages as text: sections, options, roff escapes (the docs tests share it)."""

from __future__ import annotations

import re
from pathlib import Path

import click

MAN = Path(__file__).resolve().parents[2] / "docs" / "man"

# Which page documents which command; anything not listed is in flatfs.1.
PAGE_OF = {
    "mount": "flatfs-mount.1",
    "umount": "flatfs-mount.1",
    "convert": "flatfs-convert.1",
    "measure": "flatfs-measure.1",
    "serve": "flatfs-serve.1",
}
DEFAULT_PAGE = "flatfs.1"
PAGES = ("flatfs.1", "flatfs-mount.1", "flatfs-convert.1", "flatfs-measure.1", "flatfs-serve.1")
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "EXAMPLES", "SEE ALSO")
HELP = {"-h", "--help"}


def page_for(command: str) -> str:
    return PAGE_OF.get(command, DEFAULT_PAGE)


def plain(roff: str) -> str:
    """The page's text with roff's escapes that can sit inside an option name removed."""
    text = roff.replace("\\-", "-")
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)  # font changes: \fB \fR \f(CW \f[B]
    return re.sub(r"\\[&%:]", "", text)  # \& \% \: (zero-width)


def sections(roff: str) -> dict[str, str]:
    """Section title -> its text, from the .SH lines."""
    out: dict[str, str] = {}
    title = None
    for line in roff.splitlines():
        m = re.match(r'\.SH\s+"?([^"]*)"?\s*$', line)
        if m:
            title = plain(m.group(1)).strip().upper()
            out[title] = ""
        elif title is not None:
            out[title] += line + "\n"
    return out


def option_strings(cmd: click.Command) -> list[str]:
    opts: list[str] = []
    for param in cmd.params:
        if isinstance(param, click.Option):
            opts += [o for o in (*param.opts, *param.secondary_opts) if o not in HELP]
    return opts


def undocumented(options: list[str], roff: str) -> list[str]:
    """The options that do not appear, as whole words, in the page's OPTIONS section."""
    text = plain(sections(roff).get("OPTIONS", ""))
    return [o for o in options if not re.search(r"(?<![\w-])" + re.escape(o) + r"(?![\w-])", text)]


def read(page: str) -> str:
    return (MAN / page).read_text(encoding="utf-8")
