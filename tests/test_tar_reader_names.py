"""Member names of long keys, read by our tar reader as Python's tarfile writes them (pax and GNU
records), and skip logs of several ranks merged as a union per reason (issue 23's mutation check)."""
from __future__ import annotations

import io
import tarfile

import pytest

from mmoe_ds.data.skips import SkipLog
from mmoe_ds.data.tar_reader import iter_members

LONG = "deep/" + "x" * 150 + "_é.txt"  # over the 100-byte ustar name field, not ASCII: needs a long-name record


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_come_back_whole(fmt):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in ((LONG, b"long"), ("short.txt", b"s")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    assert list(iter_members(buffer)) == [(LONG, b"long"), ("short.txt", b"s")]


def test_merged_skip_logs_are_the_union_per_reason():
    rank0, rank1 = SkipLog(), SkipLog()
    rank0.add("bad_image", "a.tar", "k1")
    rank0.add("bad_image", "a.tar", "k2")
    rank1.add("bad_image", "a.tar", "k2")  # both ranks met k2 (sample-level slots share a shard): once
    rank1.add("bad_image", "a.tar", "k3")
    merged = SkipLog.merged([rank0.state(), rank1.state()])
    assert merged.counts()["bad_image"] == 3
    assert merged.state() == {"bad_image": ["a.tar#k1", "a.tar#k2", "a.tar#k3"]}
