"""A strict, streaming tar reader for shards.

Why not `tarfile`: it stops quietly at a header that fails its checksum, at a zeroed header or at
a cut on a block boundary, so the rest of a damaged shard would vanish without a trace; and its
header parsing is most of a loader's reading time. This reader raises `TarDamage` at the first
sign of damage and accepts an archive only if it holds at least one file and ends with the
end-of-archive marker (two zero blocks) followed by nothing but zero padding: a cut exactly at a
member's end, a zero-filled file and junk after the end are all damage. The checksum field itself
must be octal digits, NUL or space, so a flipped byte anywhere in a header is caught. It reads
POSIX ustar (what `prepare` writes), plus the pax ('x') and GNU long-name ('L') records other
writers add.

Memory stays bounded whatever the archive claims: a member larger than `max_member_bytes` is
never held whole; its first `keep_bytes(name)` bytes are kept (an `Oversized`, which records the
full size) and the rest is read in chunks and dropped.
"""
from __future__ import annotations

from typing import BinaryIO, Callable, Iterator

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR_FILE_TYPES = (b"0", b"\0", b"7")
METADATA_TYPES = (b"L", b"K", b"x", b"g")  # long names, long link names, pax records
MAX_METADATA_BYTES = 1 << 20  # a long name or pax record larger than this is damage, not metadata
CHUNK = 1 << 20
CHECKSUM_CHARS = b"01234567 \0"


class TarDamage(Exception):
    """The archive cannot be read past this point."""


class Oversized(bytes):
    """The first bytes of a member larger than the reader's cap; `size` is the member's full size."""

    def __new__(cls, prefix: bytes, size: int):
        obj = super().__new__(cls, prefix)
        obj.size = size
        return obj

    def __reduce__(self):
        return Oversized, (bytes(self), self.size)


def _number(field: bytes, offset: int, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for values too large for octal
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if text.translate(None, b"01234567"):  # int() would also take signs, '_' and '0o'
        raise TarDamage(f"invalid {what} in the header at byte {offset}")
    return int(text or b"0", 8)


def _checksum_ok(header: bytes, offset: int) -> bool:
    if header[148:156].translate(None, CHECKSUM_CHARS):  # the one byte the sum does not cover: a NUL or space
        return False
    stored = _number(header[148:156], offset, "checksum")
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces
    if stored == unsigned:
        return True
    return stored == unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)  # old writers: signed


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """'%d %s=%s\\n' records; the length counts the whole record."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarDamage("invalid pax record") from None
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += max(length, 1)
    return records


def _check_end(stream: BinaryIO, offset: int) -> None:
    tail = BLOCK  # the zero block already read
    while chunk := stream.read(1 << 16):
        if chunk.count(0) != len(chunk):
            raise TarDamage(f"data after a zero block at byte {offset}: a zeroed header or junk past the end")
        tail += len(chunk)
    if tail < 2 * BLOCK:
        raise TarDamage(f"archive cut at byte {offset + tail}: incomplete end-of-archive marker")


def _read_exactly(stream: BinaryIO, n: int, offset: int) -> bytes:
    data = stream.read(n)
    if len(data) < n:
        raise TarDamage(f"archive cut at byte {offset + len(data)}, inside a member's data")
    return data


def _discard(stream: BinaryIO, n: int, offset: int) -> None:
    """Read and drop n bytes in bounded chunks (works on pipes and decompressors alike)."""
    while n > 0:
        got = len(stream.read(min(n, CHUNK)))
        if got == 0:
            raise TarDamage(f"archive cut at byte {offset}, inside a member's data")
        n, offset = n - got, offset + got


def iter_members(stream: BinaryIO, *, max_member_bytes: int | None = None,
                 keep_bytes: Callable[[str], int] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in order; raises TarDamage where the archive is damaged.

    Args:
        stream: the uncompressed archive; `read(n)` must return n bytes unless at its end.
        max_member_bytes: members larger than this are not read whole; their data is an
            `Oversized` holding the first `keep_bytes(name)` bytes (none by default). None: no cap.
        keep_bytes: how much of an oversized member to keep, by member name.

    Raises:
        TarDamage: a cut, a header failing its checksum or unparseable, a zeroed header, junk after
            the end-of-archive marker, or an archive holding no file at all (e.g. zero-filled).
    """
    offset, long_name, pax, members = 0, None, {}, 0
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            raise TarDamage(f"archive cut at byte {offset + len(header)}: no end-of-archive marker")
        if header == ZERO_BLOCK:
            _check_end(stream, offset)
            if members == 0:
                raise TarDamage("the archive holds no file: empty or zero-filled")
            return
        if not _checksum_ok(header, offset):
            raise TarDamage(f"header at byte {offset} fails its checksum")
        members += 1
        kind = header[156:157]
        size = _number(header[124:136], offset, "size")
        if "size" in pax and kind in REGULAR_FILE_TYPES:  # a pax record overrides the header (huge files)
            try:
                size = int(pax["size"])
            except ValueError:
                raise TarDamage(f"invalid pax size before the header at byte {offset}") from None
        has_data = kind not in (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: no data
        padded = -(-size // BLOCK) * BLOCK if has_data else 0
        data_offset = offset + BLOCK
        if kind in METADATA_TYPES:
            if size > MAX_METADATA_BYTES:
                raise TarDamage(f"a {size}-byte long-name/pax record at byte {offset}: a damaged header")
            data = _read_exactly(stream, padded, data_offset)[:size]
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(data)
        elif kind in REGULAR_FILE_TYPES:
            name = long_name or pax.get("path") or _name(header)
            if max_member_bytes is not None and size > max_member_bytes:
                keep = min(max(keep_bytes(name) if keep_bytes else 0, 0), size)
                prefix = _read_exactly(stream, keep, data_offset)
                _discard(stream, padded - keep, data_offset + keep)
                yield name, Oversized(prefix, size)
            else:
                yield name, _read_exactly(stream, padded, data_offset)[:size]
            long_name, pax = None, {}
        else:  # links, directories, devices, unknown types: skip their data
            _discard(stream, padded, data_offset)
            long_name, pax = None, {}
        offset += BLOCK + padded
