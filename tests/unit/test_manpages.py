"""The man pages stay true to the CLI: every option of every command is documented.

The check runs one way only: each option the click group has must appear in
the OPTIONS section of its command's page. A page may document an option the
CLI does not have yet (one being added elsewhere); the reverse is a failure.
No qemu, no FUSE.
"""

from __future__ import annotations

import re

import pytest

from flatfs.cli import main

from ..helpers.manpages import (
    DEFAULT_PAGE,
    MAN,
    PAGES,
    SECTIONS,
    option_strings,
    page_for,
    read,
    sections,
    undocumented,
)


def commands() -> list[str]:
    return sorted(main.commands)


def test_the_cli_has_the_commands_the_pages_are_split_by() -> None:
    assert {"info", "map", "mount", "umount", "convert", "measure"} <= set(main.commands)


@pytest.mark.parametrize("command", commands())
def test_each_command_has_its_page(command: str) -> None:
    assert (MAN / page_for(command)).is_file(), f"{command}: no {page_for(command)}"


@pytest.mark.parametrize("page", PAGES)
def test_each_page_has_the_required_sections(page: str) -> None:
    roff = read(page)
    assert roff.startswith('.\\"') or roff.startswith(".TH")
    assert re.search(r"^\.TH\s", roff, re.M), f"{page}: no .TH"
    missing = [s for s in SECTIONS if s not in sections(roff)]
    assert not missing, f"{page}: missing sections {missing}"


@pytest.mark.parametrize("command", commands())
def test_every_option_of_a_command_is_in_its_page(command: str) -> None:
    page = page_for(command)
    missing = undocumented(option_strings(main.commands[command]), read(page))
    assert not missing, f"flatfs {command}: {page} does not document {missing}"


def test_the_global_options_are_in_flatfs_1() -> None:
    missing = undocumented(option_strings(main), read(DEFAULT_PAGE))
    assert not missing, f"flatfs: {DEFAULT_PAGE} does not document {missing}"


def test_the_check_catches_an_option_taken_out_of_a_page() -> None:
    """The check above is not vacuous: remove one option (and only it) and it is reported."""
    roff = read("flatfs-convert.1")
    options = option_strings(main.commands["convert"])
    assert "--force" in options and "--force-share" in options
    # --force is a prefix of --force-share, which stays: only a whole-word match may count.
    stripped = re.sub(r"\\-\\-force(?!\\-)", "", roff)
    assert undocumented(options, stripped) == ["--force"]
    stripped = roff.replace("\\-\\-extended\\-l2", "")
    assert undocumented(options, stripped) == ["--extended-l2"]
