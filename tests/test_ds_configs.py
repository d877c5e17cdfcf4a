"""Every DeepSpeed config in ds_configs/ builds a real engine with MoE layers and steps (CPU).

fp16 and bf16 depend on the hardware: each config runs where DeepSpeed's accelerator supports
its precision and is skipped elsewhere, the skip naming the precision, the device and the check
(`pytest -rs` prints it). The skip logic itself is tested with test doubles of the support.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from dtype_support import DtypeSupport
from launch_util import REPO, free_port

CONFIGS = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))
TORCH_DTYPE = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}


def precision_of(name: str) -> str:
    """The precision a config's file name declares: zero1_bf16 -> bf16."""
    return name.rsplit("_", 1)[1]


@dataclass(frozen=True)
class ConfigPlan:
    """Which configs run here, and why the others do not (config name -> skip reason)."""

    run: list[str]
    skipped: dict[str, str]


def plan_configs(names: list[str], support: DtypeSupport) -> ConfigPlan:
    run, skipped = [], {}
    for name in names:
        reason = support.skip_reason(precision_of(name))
        if reason is None:
            run.append(name)
        else:
            skipped[name] = f"{name}: {reason}"
    return ConfigPlan(run, skipped)


@pytest.fixture(scope="module")
def support() -> DtypeSupport:
    return DtypeSupport.detect()


@pytest.fixture(scope="module")
def worker_output(support) -> dict[str, dict]:
    """One process (no launcher) builds an engine per supported config. Returns {"RESULTS": {config:
    "ok <dtype>" | error}, "OPTIMIZER": {config: {"measured", "planned"}}} (tests/ds_config_worker.py)."""
    plan = plan_configs(CONFIGS, support)
    if not plan.run:
        return {"RESULTS": {}, "OPTIMIZER": {}}
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "tests/ds_config_worker.py", *plan.run], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    out = {key: [json.loads(line[len(key) + 1:]) for line in proc.stdout.splitlines() if line.startswith(key + " ")]
           for key in ("RESULTS", "OPTIMIZER")}
    if proc.returncode != 0 or not out["RESULTS"] or not out["OPTIMIZER"]:
        failure = f"worker exited with status {proc.returncode}:\n{proc.stdout[-4000:]}"
        return {"RESULTS": {name: failure for name in plan.run}, "OPTIMIZER": {"failure": failure}}
    return {key: values[0] for key, values in out.items()}


@pytest.fixture(scope="module")
def worker_results(worker_output) -> dict[str, str]:
    """{config: "ok <dtype>" | error}."""
    return worker_output["RESULTS"]


def test_the_memory_plan_counts_the_optimizer_bytes_a_real_engine_holds(worker_output):
    """mmoe_ds/training/plan.py's optimizer term (Adam's moments + fp32 masters, as DeepSpeed holds them at
    ZeRO 0/1/2 in fp32/bf16/fp16) equals what the engine's optimizer holds after a step, within 1%."""
    optimizer = worker_output["OPTIMIZER"]
    assert "failure" not in optimizer, optimizer.get("failure")
    assert len(optimizer) >= 6, optimizer  # fp32 and bf16 at ZeRO 0/1/2 at least
    for name, v in optimizer.items():
        assert abs(v["planned"] - v["measured"]) <= 0.01 * v["measured"], (name, v)


def test_config_files_declare_and_enable_one_precision():
    assert len(CONFIGS) >= 11
    for name in CONFIGS:
        config = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
        enabled = {p for p in ("fp16", "bf16") if config.get(p, {}).get("enabled")}
        assert enabled == ({precision_of(name)} - {"fp32"}), (name, enabled)


@pytest.mark.parametrize("name", CONFIGS)
def test_ds_config_initialises_and_steps(name, support, worker_results):
    reason = support.skip_reason(precision_of(name))
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    assert worker_results[name] == f"ok {TORCH_DTYPE[precision_of(name)]}"


def test_fp16_configs_skip_on_a_cpu_without_fp16_naming_the_cpu():
    """An AMD EPYC as DeepSpeed 0.19 sees it: bf16 yes, fp16 no (no AVX512-FP16)."""
    epyc = DtypeSupport(accelerator="cpu", device="AMD EPYC 9B14", fp16=False, bf16=True)
    plan = plan_configs(["cpu_zero0_fp32", "zero0_bf16", "zero0_fp16", "zero1_fp16", "zero2_bf16"], epyc)
    assert plan.run == ["cpu_zero0_fp32", "zero0_bf16", "zero2_bf16"]
    assert sorted(plan.skipped) == ["zero0_fp16", "zero1_fp16"]
    reason = plan.skipped["zero1_fp16"]
    assert reason.startswith("zero1_fp16: fp16 not supported by DeepSpeed's cpu accelerator on 'AMD EPYC 9B14'")
    assert "is_fp16_supported() is False" in reason and "AVX512-FP16" in reason


def test_every_precision_runs_where_supported_and_fp32_always():
    names = ["zero0_fp32", "zero1_bf16", "zero2_fp16"]
    full = DtypeSupport(accelerator="cpu", device="Intel Xeon Platinum 8480+", fp16=True, bf16=True)
    assert plan_configs(names, full) == ConfigPlan(names, {})
    bare = DtypeSupport(accelerator="cpu", device="Intel Xeon E5-2680 v4", fp16=False, bf16=False)
    plan = plan_configs(names, bare)
    assert plan.run == ["zero0_fp32"]
    assert "bf16 not supported" in plan.skipped["zero1_bf16"] and "AVX512-BF16" in plan.skipped["zero1_bf16"]
    gpu = DtypeSupport(accelerator="cuda", device="Tesla V100-SXM2-16GB", fp16=True, bf16=False)
    assert plan_configs(names, gpu).skipped == {
        "zero1_bf16": "zero1_bf16: bf16 not supported by DeepSpeed's cuda accelerator on 'Tesla V100-SXM2-16GB': "
                      "get_accelerator().is_bf16_supported() is False"}
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        full.skip_reason("fp8")
