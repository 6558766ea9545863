"""Every text parser fed Unicode digits, overlong numbers and control characters (issue 23).

The VMDK descriptor, the VirtualBox ``.vbox`` registry (XML), the VHDX parent
locator (UTF-16 key/value pairs) and the VHD parent locators. Each either
returns a result or raises its documented error, whose message is one line and
quotes none of the input (every free word carries a SECRET marker). Numbers
come out as plain ints parsed from ASCII digits only: ``str.isdigit`` accepts
``²`` and ``٢``, which ``int`` then either refuses (a traceback) or reads.
No qemu, no FUSE.
"""

from __future__ import annotations

import os
import uuid
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import quoteattr

from hypothesis import given, settings
from hypothesis import strategies as st

from flatfs.errors import FlatfsError
from flatfs.formats.vdi import registry
from flatfs.formats.vhd import spec as vhd
from flatfs.formats.vhdx import spec as vhdx
from flatfs.formats.vmdk.descriptor import decimal, not_a_descriptor, parse_descriptor

from ..helpers.vhdx_writer import locator

EXAMPLES = int(os.environ.get("FLATFS_FUZZ_EXAMPLES", "150"))
MARK = "SECRET"

UNICODE_DIGITS = "²³¹⁰٠١٢٣۴۵०१২৩๑໒༣၁០᠑０１９𝟎𝟗"
CONTROLS = "".join(map(chr, [*range(0, 32), 0x7F, 0x85, 0x2028, 0x2029, 0xFEFF]))
ASCII_DIGITS = "0123456789"

number = st.one_of(
    st.integers(0, 2**70).map(str),
    st.text(ASCII_DIGITS, min_size=19, max_size=40),  # overlong
    st.text(ASCII_DIGITS + UNICODE_DIGITS, min_size=1, max_size=6),
    st.text(UNICODE_DIGITS, min_size=1, max_size=4),
)
noise = st.text(st.sampled_from(UNICODE_DIGITS + CONTROLS + ' "=#x-'), max_size=8)
word = st.builds(lambda a, b: f"{a}{MARK}{b}", noise, noise)
access = st.sampled_from(["RW", "RDONLY", "NOACCESS", "rw", "RW\u00a0"])
etype = st.sampled_from(["FLAT", "SPARSE", "ZERO", "VMFS", "FLAT²", "SESPARSE"])
space = st.sampled_from([" ", "  ", "\t", "\u3000", "\x0b", ""])


def _extent(a: str, sp: str, n: str, t: str, name: str, off: str, shape: int) -> str:
    tail = ["", f' "{name}"', f' "{name}" {off}', f" {name} {off}", f' "{name}"{off}'][shape]
    return f"{a}{sp}{n}{sp}{t}{tail}"


extent_line = st.builds(_extent, access, space, number, etype, word, number, st.integers(0, 4))
key_line = st.builds(
    lambda k, sp, v: f"{k}{sp}={sp}{v}",
    st.sampled_from(["version", "CID", "parentCID", "createType", "parentFileNameHint", "ddb.x", MARK]),
    space,
    st.one_of(number, word, st.builds(lambda w: f'"{w}"', word)),
)
line = st.one_of(extent_line, key_line, word, noise, st.just(""), st.just("# comment"))
descriptor = st.builds(
    lambda lines, nl: ("# Disk DescriptorFile\n" + nl.join(lines)).encode("utf-8", "surrogatepass"),
    st.lists(line, max_size=12),
    st.sampled_from(["\n", "\r\n", "\r", "\x00"]),
)


def _one_line_quoting_nothing(exc: BaseException) -> None:
    msg = str(exc)
    assert "\n" not in msg and "\r" not in msg, msg
    assert MARK not in msg, msg
    for ch in UNICODE_DIGITS:
        assert ch not in msg, msg


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(descriptor)
def test_vmdk_descriptor(raw: bytes) -> None:
    assert isinstance(not_a_descriptor(raw[:512], raw[:2048]), bool)
    try:
        d = parse_descriptor("top.vmdk", raw)
    except FlatfsError as exc:
        _one_line_quoting_nothing(exc)
        return
    numbers = [d.version, d.parent_cid, d.sectors, *(e.sectors for e in d.extents)]
    for n in numbers + [e.offset for e in d.extents]:
        assert type(n) is int and n >= 0
    for e in d.extents:
        assert 0 < e.sectors < 2**63


@given(number)
def test_decimal_takes_ascii_digits_only(text: str) -> None:
    got = decimal(text)
    if text.isascii() and text.isdigit() and len(text) <= 20:
        assert got == int(text)
    else:
        assert got is None


xml_attr = st.one_of(word, number, st.builds(lambda d: "{" + d + "}", number))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(xml_attr, xml_attr), max_size=6), st.sampled_from(["", "<!DOCTYPE x>", "\x00"]))
def test_vbox_registry(disks: list[tuple[str, str]], prolog: str) -> None:
    inner = "".join(f"<HardDisk uuid={quoteattr(u)} location={quoteattr(loc)}/>" for u, loc in disks)
    data = f'<?xml version="1.0"?>{prolog}<VirtualBox><HardDisks>{inner}</HardDisks></VirtualBox>'
    try:
        out = registry.hard_disks(data.encode("utf-8", "surrogatepass"))
    except (registry.RefusedXML, ExpatError, ValueError):
        return  # the caller ignores a registry it cannot read: it is only a hint
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


guid_text = st.one_of(
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: "{" + str(u).replace("1", "١").replace("2", "²") + "}"),
    number,
    word,
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(guid_text, st.one_of(word, number), st.booleans())
def test_vhdx_parent_locator(linkage: str, path: str, twice: bool) -> None:
    kv = {"parent_linkage": linkage, "relative_path": path}
    raw = locator(kv)
    if twice:  # the same key twice: a second entry pointing at the first key
        raw = locator({**kv, "parent_linkage2": linkage})
    try:
        out = vhdx.parse_locator("top.vhdx", raw, 0)
    except FlatfsError as exc:
        _one_line_quoting_nothing(exc)
        return
    assert out["parent_linkage"].isascii()
    assert uuid.UUID(vhdx.linkage(out["parent_linkage"]).strip("{}"))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sampled_from(sorted(vhd.PLATFORMS)), st.one_of(word, number, noise))
def test_vhd_parent_locator(platform: bytes, text: str) -> None:
    codec = "utf-16-le" if platform in (vhd.W2RU, vhd.W2KU) else "utf-8"
    data = text.encode(codec, "surrogatepass")
    loc = vhd.Locator(0, platform, 512, len(data), 512)
    try:
        got = vhd.decode_locator("top.vhd", loc, data)
    except FlatfsError as exc:
        _one_line_quoting_nothing(exc)
        return
    assert isinstance(got, str)
