"""bench/gpu_suite.sh: the whole GPU pipeline runs on the CPU at toy sizes (--dry-run), and without
--dry-run it refuses to start where there is no CUDA device."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from launch_util import REPO, child_env, free_port


def suite(*args: str, out) -> subprocess.CompletedProcess:
    env = child_env(PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    return subprocess.run(["bash", "bench/gpu_suite.sh", *args, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    proc = suite("--dry-run", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bench"] == "gpu_suite" and summary["checks_ok"] is True, summary
    assert set(summary["shapes"]) == {"d32/f64/E4/k2 balanced", "d32/f64/E4/k2 zipf"}, summary["shapes"]
    assert set(summary["mfu"]) == {"torch", "deepspeed", "dropless"}, summary  # None on the CPU: no peak FLOP/s
    layer = json.loads((tmp_path / "moe_layer.txt").read_text().splitlines()[-1])
    variants = set(layer["rows"][0]["results"])
    assert {"dense", "grouped_gemm", "deepspeed_stock", "deepspeed_dropless", "dropless_ref",
            "dropless_modality_bias"} <= variants, variants
    assert layer["skipped"] == {"dropless_fused": "needs CUDA sm90+ with Triton"}
    zipf = next(r for r in layer["rows"] if r["routing"] == "zipf")["results"]
    assert zipf["deepspeed_stock"]["dropped"] > 0 and zipf["dropless_ref"]["dropped"] == 0, zipf


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the suite would run")
def test_without_cuda_it_refuses_to_start(tmp_path):
    proc = suite(out=tmp_path)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr, (proc.returncode, proc.stderr)
    assert not (tmp_path / "moe_layer.txt").exists()
