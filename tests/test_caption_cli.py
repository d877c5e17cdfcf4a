"""`mmoe-ds caption EXPORT IMAGE [IMAGE...]` (issue 18): a user's own image files and folders, one caption
per file, through the real command line; bad paths and unreadable files named in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_hub_export import make_export

from mmoe_ds.export.caption import caption_images
from mmoe_ds.export.caption import main as caption_main

REPO = Path(__file__).resolve().parents[1]


def test_caption_prints_one_caption_per_file_and_folder_image(tmp_path):
    export_dir, model, processor = make_export(tmp_path)
    rng = np.random.default_rng(0)
    some = tmp_path / "some.png"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(some)
    other = tmp_path / "other.jpg"
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(other, quality=90)
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (50, 50), "red").save(folder / "b.png")
    Image.new("L", (28, 28), 255).save(folder / "a.bmp")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a PNG cut after its signature
    files = [some, other, folder / "a.bmp", folder / "b.png"]
    with torch.no_grad():
        expected = [c.strip() for c in caption_images(model, processor, [Image.open(f) for f in files])]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-m", "mmoe_ds.cli", "caption", str(export_dir), str(some), str(other),
                           str(folder)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(f) for f in files]  # folder images sorted, notes.txt not one
    assert [line["generated"] for line in lines] == expected
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("mmoe-ds caption: skipped")]
    assert len(skipped) == 1 and str(folder / "broken.png") in skipped[0] and "not a readable image" in skipped[0]


def test_caption_refuses_paths_that_are_not_images_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args, words in [([str(tmp_path / "missing.png")], "missing.png: no such file or folder"),
                        ([str(tmp_path / "empty")], "a folder with no image files")]:
        assert caption_main([str(tmp_path / "export")] + args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mmoe-ds caption: ") and words in err, err
