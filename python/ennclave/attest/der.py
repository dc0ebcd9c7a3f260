"""A strict reader for the few DER values inside vendor certificate extensions.

`cryptography` parses the certificates and checks every signature; what it cannot
interpret are the vendors' private extensions (AMD's TCB and hwID values, Intel's SGX
extension tree), which it hands over as raw DER. This module reads those: definite
lengths only, minimal length encoding, no trailing bytes. It does no cryptography.
"""

from __future__ import annotations

from dataclasses import dataclass

INTEGER = 0x02
OCTET_STRING = 0x04
OBJECT_IDENTIFIER = 0x06
ENUMERATED = 0x0A
UTF8_STRING = 0x0C
IA5_STRING = 0x16
SEQUENCE = 0x30


class DerError(ValueError):
    """The bytes are not the DER value expected."""


@dataclass(frozen=True)
class Tlv:
    tag: int
    value: bytes


def _read(data: bytes, off: int) -> tuple[Tlv, int]:
    if off + 2 > len(data):
        raise DerError("a DER value is truncated")
    tag = data[off]
    if tag & 0x1F == 0x1F:
        raise DerError("multi-byte DER tags are not used here")
    first = data[off + 1]
    off += 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise DerError("indefinite lengths are not DER")
    else:
        n = first & 0x7F
        if n > 4 or off + n > len(data):
            raise DerError("a DER length is truncated or too large")
        length = int.from_bytes(data[off : off + n], "big")
        if data[off] == 0 or length < 0x80:
            raise DerError("a DER length is not minimally encoded")
        off += n
    if off + length > len(data):
        raise DerError("a DER value is longer than its container")
    return Tlv(tag, data[off : off + length]), off + length


def read_all(data: bytes) -> list[Tlv]:
    """Consecutive TLVs that exactly fill `data` (the contents of a SEQUENCE)."""
    out, off = [], 0
    while off < len(data):
        tlv, off = _read(data, off)
        out.append(tlv)
    return out


def read_one(data: bytes, tag: int | None = None) -> Tlv:
    tlv, end = _read(data, 0)
    if end != len(data):
        raise DerError("trailing bytes after a DER value")
    if tag is not None and tlv.tag != tag:
        raise DerError(f"expected DER tag {tag:#04x}, found {tlv.tag:#04x}")
    return tlv


def integer(t: Tlv) -> int:
    if t.tag not in (INTEGER, ENUMERATED) or not t.value:
        raise DerError("expected a DER INTEGER")
    return int.from_bytes(t.value, "big", signed=True)


def octets(t: Tlv) -> bytes:
    if t.tag != OCTET_STRING:
        raise DerError("expected a DER OCTET STRING")
    return t.value


def oid(t: Tlv) -> str:
    if t.tag != OBJECT_IDENTIFIER or not t.value or t.value[-1] & 0x80:
        raise DerError("expected a DER OBJECT IDENTIFIER")
    arcs, acc = [], 0
    for b in t.value:
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(acc)
            acc = 0
    head = arcs[0]
    first = [min(head // 40, 2), head - 40 * min(head // 40, 2)]
    return ".".join(str(a) for a in first + arcs[1:])
