"""Atomically written files and folders end with the modes a plain write gives under the umask.

A temp file from `tempfile.mkstemp` (or a library's private temp file, as safetensors' writer
makes) is 0600; renamed into place as it is, exported weights would be unreadable to the other
users of a shared cluster. The expected modes below are literal: what `open(path, "w")` and
`mkdir` give under each umask.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_model import tiny_config

from mmoe_ds.export import save_export
from mmoe_ds.io.atomic import atomic_write_bytes, atomic_write_text, staged_directory
from mmoe_ds.model import MmoeForCausalLM
from mmoe_ds.training import checkpoint

# umask -> (file mode, folder mode) of a plain write
MODES = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700), 0o002: (0o664, 0o775)}
EXPORT_FILES = {"model.safetensors", "config.json", "generation_config.json", "README.md", "modeling_mmoe.py",
                "tokenizer.json", "processor_config.json", "routing_report.md", "routing_report.png"}


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def tree_modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): mode(p) for p in [root, *root.rglob("*")]}


def user_folder(path: Path, files: dict[str, bytes]) -> Path:
    """A folder as a user leaves it: files written 0600 (e.g. by a private tool) that we copy from."""
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
        os.chmod(path / name, 0o600)
    return path


@pytest.mark.parametrize("mask", sorted(MODES))
def test_export_files_and_folder_get_plain_write_modes(tmp_path, mask):
    file_mode, dir_mode = MODES[mask]
    processor = user_folder(tmp_path / "processor", {"tokenizer.json": b"{}", "processor_config.json": b"{}"})
    report = user_folder(tmp_path / "report", {"routing_report.md": b"| image |\n", "routing_report.png": b"\x89PNG"})
    torch.manual_seed(0)
    model = MmoeForCausalLM(tiny_config())
    out = tmp_path / "shared" / "export"
    with umask(mask):
        save_export(model, out, {"step": 3, "ep_size": 2, "world_size": 2}, processor, report)
        first = tree_modes(out)
        save_export(model, out)  # replacing an existing export
        second = tree_modes(out)
    assert EXPORT_FILES <= set(first)
    expected = {name: dir_mode if name == "." else file_mode for name in first}
    assert first == expected, {n: oct(m) for n, m in first.items() if m != expected[n]}
    assert all(m == (dir_mode if n == "." else file_mode) for n, m in second.items()), second
    assert sorted(p.name for p in out.parent.iterdir()) == ["export"], "temp folders left behind"


class FileWritingEngine:
    """Test double for a DeepSpeed engine: `save_checkpoint` writes one file the way DeepSpeed does
    (a plain torch.save into the tag folder it creates)."""

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        assert save_latest is False
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"module": {}}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))


@contextlib.contextmanager
def one_process_group(tmp_path: Path):
    if dist.is_initialized():  # an earlier in-process test set one up: use it
        yield
        return
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_checkpoint_files_get_plain_write_modes(tmp_path, mask):
    file_mode, dir_mode = MODES[mask]
    run = tmp_path / "run"
    with umask(mask), one_process_group(tmp_path):
        run.mkdir()
        checkpoint.save(FileWritingEngine(), str(run), 1, {"ep_size": 1, "world_size": 1}, {"rng": 1}, keep_last=2)
        checkpoint.save(FileWritingEngine(), str(run), 2, {"ep_size": 1, "world_size": 1}, {"rng": 2}, keep_last=2)
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000002"
    assert json.loads((ckpt / "step00000002" / "meta.json").read_text())["step"] == 2
    modes = tree_modes(ckpt)
    assert set(modes) == {".", "latest", "step00000001", "step00000002"} | {
        f"step0000000{s}/{f}" for s in (1, 2) for f in ("meta.json", "rank0_state.pt", "mp_rank_00_model_states.pt")}
    for name, m in modes.items():
        assert m == (dir_mode if name in (".", "step00000001", "step00000002") else file_mode), (name, oct(m))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_writes_modes_and_overwrite_keeps_mode(tmp_path, mask):
    file_mode, dir_mode = MODES[mask]
    with umask(mask):
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_bytes(tmp_path / "b.bin", b"\0\1")
        (tmp_path / "c.txt").write_text("old")
        os.chmod(tmp_path / "c.txt", 0o640)  # a plain overwrite keeps an existing file's mode
        atomic_write_text(tmp_path / "c.txt", "new")
        with staged_directory(tmp_path / "d") as d:
            (d / "f").write_text("f")
    assert (mode(tmp_path / "a.txt"), mode(tmp_path / "b.bin")) == (file_mode, file_mode)
    assert (tmp_path / "c.txt").read_text() == "new" and mode(tmp_path / "c.txt") == 0o640
    assert (mode(tmp_path / "d"), mode(tmp_path / "d" / "f")) == (dir_mode, file_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.txt", "d"]


def test_failed_atomic_writes_leave_the_old_content_and_no_temp_files(tmp_path):
    (tmp_path / "keep.txt").write_text("old")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "old").write_text("old")
    with pytest.raises(TypeError):
        atomic_write_text(tmp_path / "keep.txt", b"bytes are not text")
    with pytest.raises(RuntimeError, match="boom"), staged_directory(tmp_path / "dir") as d:
        (d / "new").write_text("half")
        raise RuntimeError("boom")
    assert (tmp_path / "keep.txt").read_text() == "old"
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "keep.txt"]
