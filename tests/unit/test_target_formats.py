"""The target formats come from one table: -O's choices, the man pages and -o's keys agree."""

from __future__ import annotations

import re
from pathlib import Path

from flatfs.cli.common import target_format_names
from flatfs.convert.options import options_help, target_writer
from flatfs.formats import FORMATS

MAN = Path(__file__).resolve().parents[2] / "docs" / "man"


def test_every_target_format_is_in_the_man_pages():
    names = target_format_names()
    assert names[0] == "qcow2" and "raw" in names
    assert all(f.name in names for f in FORMATS if f.writer is not None)
    for page in ("flatfs-convert.1", "flatfs-measure.1"):
        text = (MAN / page).read_text()
        line = re.search(r"^\.BR \\-O .*$", text, re.M)
        assert line is not None, page
        assert sorted(re.findall(r"\\fI(\w+)\\fR", line.group(0))) == sorted(names), (page, line.group(0))


def test_every_writer_option_is_listed_by_o_help_and_documented():
    page = (MAN / "flatfs-convert.1").read_text()
    for f in FORMATS:
        writer = target_writer(f.name)
        if writer is None:
            continue
        helped = "\n".join(options_help(f.name))
        for opt in writer.options:
            assert opt.key in helped and opt.key in page, (f.name, opt.key)


def test_o_help_shows_each_kind_of_value():
    vmdk = options_help("vmdk")
    assert (
        "hwversion=TEXT" in vmdk and "adapter_type=lsilogic|ide|buslogic|lsisas1068|pvscsi|legacyESX" in vmdk
    )
    assert "block_size=SIZE" in options_help("vhdx")
    assert options_help("raw") == ["-O raw has no -o options"]
