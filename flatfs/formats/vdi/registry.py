"""The VirtualBox media registry in a VM's ``.vbox`` file: which HardDisk UUID lives where.

A ``.vbox`` file is XML: ``<HardDisk uuid="{...}" location="...">`` elements,
nested child under parent. Only ``uuid`` and ``location`` are read. The file
is untrusted: its size is bounded by the caller, and the parser refuses any
document type declaration, so no entity (internal, external or parameter)
can be declared, let alone expanded or fetched. A file that does not parse
is ignored: the registry is only a hint, the parent's UUID is the proof.
"""

from __future__ import annotations

import xml.parsers.expat

MAX_REGISTRY_BYTES = 4 << 20  # a real .vbox is some KiB
MAX_DISKS = 65536
MAX_DEPTH = 256


class RefusedXML(Exception):
    """The document declares a DOCTYPE or entities, or is out of bounds."""


def _refuse(*args: object) -> None:
    raise RefusedXML("document type declarations and entities are refused")


def hard_disks(data: bytes) -> dict[str, str]:
    """uuid (lower case, no braces) -> location, for every HardDisk element in ``data``.

    Raises RefusedXML for a DOCTYPE, an entity or too much nesting, and
    ValueError-like expat errors for malformed XML (the caller ignores both).
    """
    out: dict[str, str] = {}
    depth = 0
    parser = xml.parsers.expat.ParserCreate()
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse
    parser.EntityDeclHandler = _refuse
    parser.UnparsedEntityDeclHandler = _refuse
    parser.ExternalEntityRefHandler = _refuse  # type: ignore[assignment]

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise RefusedXML("nested too deeply")
        if name.rsplit(":", 1)[-1] != "HardDisk":
            return
        ident = attrs.get("uuid", "").strip().strip("{}").lower()
        loc = attrs.get("location", "")
        if ident and loc and "\0" not in loc:
            if len(out) >= MAX_DISKS:
                raise RefusedXML("too many HardDisk elements")
            out.setdefault(ident, loc)

    def end(name: str) -> None:
        nonlocal depth
        depth -= 1

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.Parse(data, True)
    return out
