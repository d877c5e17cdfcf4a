"""docs/benchmarks.md quotes the committed GPU run's tables exactly as bench/gpu_suite_tables.py prints them."""
from __future__ import annotations

import subprocess
import sys

from launch_util import REPO

RUN = "runs/gpu_suite/2026-12-04-h200"


def test_gpu_tables_in_the_doc_are_the_scripts_output_from_the_committed_run():
    printed = subprocess.run([sys.executable, "bench/gpu_suite_tables.py", RUN], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    doc = (REPO / "docs/benchmarks.md").read_text()
    quoted = doc.split("<!-- gpu_suite_tables begin -->\n", 1)[1].split("<!-- gpu_suite_tables end -->", 1)[0]
    assert quoted == printed
    assert "| ours ≥ 3× DeepSpeed stock at d1024/f4096/E8/k2 | 1.93× | no |" in quoted  # the run's own verdict


def test_cpu_layer_tables_in_the_doc_are_the_scripts_output_from_the_committed_runs():
    printed = subprocess.run([sys.executable, "bench/cpu_layer_tables.py", "runs/bench/2026-12-05-cpu"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    doc = (REPO / "docs/benchmarks.md").read_text()
    quoted = doc.split("<!-- cpu_layer_tables begin -->\n", 1)[1].split("<!-- cpu_layer_tables end -->", 1)[0]
    assert quoted == printed
    assert "| d64/f128/E8/k2 | zipf | 8.4 (1.00×) |" in quoted  # ep_size 2's stock row: both runs are there
