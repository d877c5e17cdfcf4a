"""Every DeepSpeed config in ds_configs/ builds a real engine with MoE layers and steps (CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from launch_util import REPO, free_port

CONFIGS = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))


def test_every_ds_config_initialises_and_steps():
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "tests/ds_config_worker.py", *CONFIGS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert set(results) == set(CONFIGS) and len(CONFIGS) >= 11
    expected = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
    for name, outcome in results.items():
        assert outcome == f"ok {expected[name.rsplit('_', 1)[1]]}", (name, outcome)
