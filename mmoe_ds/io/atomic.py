"""Atomic writes that end with the modes a normal write would give.

A crash never leaves a half-written file or folder behind: everything is written under a
temporary name in the destination's folder and renamed into place. Temporary files and folders
made by `tempfile` (and by some libraries, e.g. safetensors' writer) are private (0600 / 0700);
the helpers here give the result the mode a plain `open(path, "w")` / `mkdir` would have given
under the process umask: files `0o666 & ~umask` (an existing file keeps its mode, as with a
plain overwrite), folders `0o777 & ~umask`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting and restoring it
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Mode of a file created by a plain `open(path, "w")`: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """Mode of a folder created by a plain `mkdir`: 0o777 minus the umask."""
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temp file next to `path`; on a clean exit it is flushed, synced and renamed onto `path`.

    Args:
        path: the destination; its folder must exist.
        mode: "wb" or "w" (text, then `encoding` applies; default utf-8).
    Yields:
        the open temp file. If the block raises, the temp file is removed and `path` is untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}.")
    path = Path(path)
    try:
        final_mode = stat.S_IMODE(path.stat().st_mode)  # overwriting keeps the mode, as `open(path, "w")` does
    except FileNotFoundError:
        final_mode = default_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, final_mode)
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + rename), with the mode a plain write gives."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (temp file + rename), with the mode a plain write gives."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def apply_default_modes(root: str | os.PathLike) -> None:
    """Give `root` and everything below it the modes a plain write under the umask gives
    (folders 0o777 & ~umask, files 0o666 & ~umask). Use on a staged folder that other code
    (libraries writing through private temp files) filled. Symlinks are left alone."""
    root = Path(root)
    file_mode, dir_mode = default_file_mode(), default_dir_mode()
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), dir_mode)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), file_mode)


def replace_directory(staged: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move the finished folder `staged` onto `dest` (same file system), replacing any old `dest`.

    The old folder is renamed aside before the new one is renamed in, so at every moment `dest`
    is either the complete old folder or the complete new one; the old one is then deleted.
    """
    staged, dest = Path(staged), Path(dest)
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        os.replace(dest, old / dest.name)
        os.replace(staged, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, dest)
    return dest


@contextlib.contextmanager
def staged_directory(dest: str | os.PathLike, normalize_modes: bool = False) -> Iterator[Path]:
    """Fill a fresh temp folder next to `dest`; on a clean exit it replaces `dest` in one rename.

    Args:
        dest: the folder to create or replace; its parent is created if missing.
        normalize_modes: also give every file and folder inside the plain-write modes
            (`apply_default_modes`), for content written by libraries that make private files.
    Yields:
        the temp folder (mode 0o777 & ~umask). If the block raises, it is removed and `dest` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp.", dir=dest.parent))
    try:
        os.chmod(staged, default_dir_mode())
        yield staged
        if normalize_modes:
            apply_default_modes(staged)
        replace_directory(staged, dest)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
