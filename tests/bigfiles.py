"""Large files built cheaply and streaming, as the world makes them: a PNG of W x H black pixels
(a real, valid PNG: its IDAT is the zlib stream of the W*(1+3H) zero bytes, a few hundred KB for
20000 x 20000) and a gzip'd tar holding a member of hundreds of MiB, written without ever holding
more than a few MiB."""
from __future__ import annotations

import struct
import tarfile
import zlib
from typing import BinaryIO

CHUNK = 1 << 22


def deflate_repeated(byte: int, n: int) -> bytes:
    """A raw deflate stream of n copies of one byte, in O(n / 1000) time: after a full flush the
    compressor forgets its window, so each further full chunk compresses to the same bytes."""
    full, rest = divmod(n, CHUNK)
    block = bytes([byte]) * CHUNK
    once = zlib.compressobj(9, zlib.DEFLATED, -15)
    repeated = once.compress(block) + once.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    return repeated * full + last.compress(block[:rest]) + last.flush()


def _adler32_repeated(byte: int, n: int) -> int:
    a = (1 + byte * n) % 65521  # closed form of adler32 over n copies of `byte`
    b = (n + byte * n * (n + 1) // 2) % 65521
    return (b << 16) | a


def zlib_repeated(byte: int, n: int) -> bytes:
    return b"\x78\xda" + deflate_repeated(byte, n) + struct.pack(">I", _adler32_repeated(byte, n))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zero_png(width: int, height: int, rgb: bool = False) -> bytes:
    """A valid black PNG (8-bit gray, or RGB): every row is filter byte 0 + zero samples."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2 if rgb else 0, 0, 0, 0)
    idat = zlib_repeated(0, height * (1 + width * (3 if rgb else 1)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _crc32_repeated(byte: int, n: int) -> int:
    crc, block = 0, bytes([byte]) * CHUNK
    for _ in range(n // CHUNK):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(block[:n % CHUNK], crc)


def gzip_member_repeated(byte: int, n: int) -> bytes:
    """One gzip member (RFC 1952) holding n copies of `byte`; members concatenate into one stream."""
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + deflate_repeated(byte, n) + struct.pack("<II", _crc32_repeated(byte, n), n & 0xFFFFFFFF)


def write_gzip_tar(out: BinaryIO, members: list[tuple[str, bytes | tuple[int, int]]]) -> None:
    """A gzip'd ustar archive: each member is (name, data) or (name, (byte, size)) for `size` copies
    of one byte; each piece is its own gzip member (gzip -d and Python's gzip read them as one)."""
    import gzip

    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data) if isinstance(data, bytes) else data[1]
        pad = bytes(-info.size % 512)
        out.write(gzip.compress(info.tobuf(tarfile.USTAR_FORMAT)))
        out.write(gzip.compress(data + pad) if isinstance(data, bytes) else
                  gzip_member_repeated(data[0], data[1]) + gzip.compress(pad))
    out.write(gzip.compress(bytes(1024)))  # the end-of-archive marker
