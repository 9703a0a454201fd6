"""NAL units: the one reader of H.264/HEVC packets for the whole package.

Annex-B buffers (start codes ``00 00 01`` / ``00 00 00 01``) and length-prefixed
ones (MP4/MKV's avcC/hvcC framing). Zero bytes between units are the byte
stream's, not the units' (a unit ends in its stop bit, or in a cabac_zero_word's
``03``), so they are dropped, and so are empty units.
"""

from __future__ import annotations

__all__ = ["annexb_nal_units", "length_prefixed", "length_prefixed_nal_units", "nal_units"]


def annexb_nal_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex-B buffer, start codes and trailing zero bytes removed."""
    units = []
    start = data.find(b"\x00\x00\x01")
    while start >= 0:
        begin = start + 3
        nxt = data.find(b"\x00\x00\x01", begin)
        unit = data[begin : len(data) if nxt < 0 else nxt].rstrip(b"\x00")
        if unit:
            units.append(unit)
        start = nxt
    return units


def length_prefixed_nal_units(data: bytes, size: int = 4) -> list[bytes]:
    """The NAL units of a length-prefixed packet; raises ValueError if it is malformed."""
    units, i = [], 0
    while i < len(data):
        if i + size > len(data):
            raise ValueError("truncated NAL unit length in a length-prefixed packet")
        n = int.from_bytes(data[i : i + size], "big")
        i += size
        if n == 0 or i + n > len(data):
            raise ValueError("bad NAL unit length in a length-prefixed packet")
        units.append(data[i : i + n])
        i += n
    return units


def nal_units(data: bytes, length_size: int | None = None) -> list[bytes]:
    """Annex-B when ``length_size`` is None (or 0), else ``length_size``-byte prefixes."""
    if not length_size:
        return annexb_nal_units(data)
    return length_prefixed_nal_units(data, length_size)


def length_prefixed(units: list[bytes], size: int = 4) -> bytes:
    """NAL units framed with ``size``-byte big-endian lengths (avcC/hvcC)."""
    return b"".join(len(u).to_bytes(size, "big") + u for u in units)
