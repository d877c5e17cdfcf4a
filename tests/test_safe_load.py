"""Issue 12, D' / acceptance 6: no code runs from a checkpoint.

A real checkpoint (tiny model, real DeepSpeed engine, ZeRO 1, one step; tests/safe_load_worker.py)
is tampered with the way an attacker would: a file's pickle is made to call `os.system("touch
MARKER")` while it is read, either injected into DeepSpeed's real state dict and re-saved with
`torch.save`, or as a bare pickle (protocol 4) in place of the file. Export and resume must refuse
each tampered file with one message naming the file and the global, and the marker must never
appear. The untampered checkpoint still exports and resumes to the trained weights.
"""
from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch_util import REPO, free_port
from mmoe_ds.export import export
from mmoe_ds.export.gather import load_checkpoint_model
from mmoe_ds.safe_load import (RNG_STATE_GLOBALS, UnsafeCheckpointError, deepspeed_globals, pickle_globals,
                              safe_torch_load)

TAG = "checkpoints/step00000001"
MODEL_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = "layer_0_expert_1_mp_rank_00_model_states.pt"
OPTIMIZER_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
RANK_FILE = "rank0_state.pt"


class RunsCode:
    """What an attacker pickles: reading it back calls os.system (the shell creates `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def inject(path: Path, marker: Path) -> None:
    """Keep the file's real content, add the payload under a new key, re-save it with torch.save."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own, untampered file
    state["notes"] = RunsCode(marker)
    torch.save(state, path)


def replace_with_bare_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(RunsCode(marker), f, protocol=4)


def run_worker(*args: str) -> dict:
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "tests/safe_load_worker.py", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:]
    return json.loads(lines[0][len("RESULTS "):])


@pytest.fixture(scope="module")
def trusted(tmp_path_factory) -> tuple[Path, float]:
    """(a run folder holding a real step-1 checkpoint, the weights' checksum after that step)."""
    run = tmp_path_factory.mktemp("safe_load") / "trusted"
    saved = run_worker("save", str(run))
    assert (run / TAG / OPTIMIZER_FILE).exists() and (run / TAG / EXPERT_FILE).exists()
    return run, saved["checksum"]


def tampered_copy(trusted_run: Path, dest: Path, name: str, tamper) -> tuple[Path, Path]:
    """A copy of the trusted run with `name` tampered; returns (run folder, the payload's marker file)."""
    shutil.copytree(trusted_run, dest)
    marker = dest.parent / f"{dest.name}.pwned"
    tamper(dest / TAG / name, marker)
    return dest, marker


def assert_refusal(message: str, run: Path, name: str) -> None:
    assert message.startswith(f"{run / TAG / name}: refused to load: it contains a pickle that references "
                              "posix.system, which is not on mmoe-ds's allow-list"), message
    assert "would run code" in message and "Load only checkpoints you trust" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("tamper", [inject, replace_with_bare_pickle])
def test_the_payload_does_run_code_when_loaded_the_old_way(trusted, tmp_path, tamper):
    """The control: each tampered form really runs code under weights_only=False (what export and
    resume did before), so the refusals below are refusals of a live exploit."""
    run, marker = tampered_copy(trusted[0], tmp_path / "run", EXPERT_FILE, tamper)
    try:
        torch.load(run / TAG / EXPERT_FILE, weights_only=False)
    except RuntimeError as e:  # the bare pickle runs while torch reads it as the magic number, then fails
        assert tamper is replace_with_bare_pickle and "magic number" in str(e)
    assert marker.exists()


@pytest.mark.parametrize("name,tamper", [(MODEL_FILE, inject), (EXPERT_FILE, inject),
                                         (EXPERT_FILE, replace_with_bare_pickle)])
def test_export_refuses_a_tampered_file_and_runs_nothing(trusted, tmp_path, name, tamper):
    run, marker = tampered_copy(trusted[0], tmp_path / "run", name, tamper)
    with pytest.raises(UnsafeCheckpointError) as refused:
        export(run, tmp_path / "export")
    assert_refusal(str(refused.value), run, name)
    assert not marker.exists()
    assert not (tmp_path / "export").exists()


def test_export_cli_refuses_in_one_line_without_a_traceback(trusted, tmp_path):
    run, marker = tampered_copy(trusted[0], tmp_path / "run", MODEL_FILE, inject)
    proc = subprocess.run([sys.executable, "-m", "mmoe_ds.cli", "export", str(run), str(tmp_path / "export")],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmoe-ds export: ") and "Traceback" not in proc.stderr, lines
    assert_refusal(lines[0][len("mmoe-ds export: "):], run, MODEL_FILE)
    assert not marker.exists() and not (tmp_path / "export").exists()


def test_untampered_checkpoint_exports_the_trained_weights(trusted):
    run, saved_checksum = trusted
    model, meta, tag_dir = load_checkpoint_model(run)
    assert tag_dir == run / TAG and meta["step"] == 1
    assert sum(float(p.detach().double().sum()) for p in model.parameters()) == pytest.approx(saved_checksum, rel=1e-9)


@pytest.fixture(scope="module")
def resumed(trusted, tmp_path_factory) -> dict:
    """One resume worker over the untampered run and one copy per tampered file:
    {case: (run folder, marker, the worker's result for it)}."""
    base = tmp_path_factory.mktemp("resume")
    cases = {"clean": trusted[0]}
    markers = {"clean": base / "clean.pwned"}
    for case, name, tamper in [("model", MODEL_FILE, inject), ("expert", EXPERT_FILE, replace_with_bare_pickle),
                               ("optimizer", OPTIMIZER_FILE, inject), ("rank_state", RANK_FILE, inject)]:
        cases[case], markers[case] = tampered_copy(trusted[0], base / case, name, tamper)
    results = run_worker("resume", *(str(run) for run in cases.values()))
    return {case: (run, markers[case], results[str(run)]) for case, run in cases.items()}


@pytest.mark.parametrize("case,name", [("model", MODEL_FILE), ("expert", EXPERT_FILE),
                                       ("optimizer", OPTIMIZER_FILE), ("rank_state", RANK_FILE)])
def test_resume_refuses_a_tampered_file_and_runs_nothing(resumed, case, name):
    run, marker, result = resumed[case]
    assert result.get("error") == "UnsafeCheckpointError", result
    assert_refusal(result["message"], run, name)
    assert not marker.exists()


def test_untampered_checkpoint_resumes_to_the_trained_weights(resumed, trusted):
    _, _, result = resumed["clean"]
    assert result.get("step") == 1, result
    assert result["checksum"] == pytest.approx(trusted[1], rel=1e-9)
    assert result["loader"] == {"format": 1, "batches": 1, "epoch": 0}


def test_rank_state_round_trips_numpy_rng_state_weights_only(tmp_path):
    """numpy's RNG state (a uint32 array) is allowed in the rank-state file, under numpy 2's name
    and numpy 1's (`numpy.core.multiarray._reconstruct`, written by older environments)."""
    import numpy as np

    np.random.seed(7)
    state = np.random.get_state()
    torch.save({"numpy": state}, tmp_path / "rng.pt")
    loaded = safe_torch_load(tmp_path / "rng.pt", allowed=RNG_STATE_GLOBALS)["numpy"]
    assert loaded[0] == "MT19937" and loaded[1].dtype == np.uint32 and (loaded[1] == state[1]).all()
    np.random.set_state(loaded)
    assert np.random.randint(1 << 30) == np.random.RandomState(7).randint(1 << 30)
    old_name = pickle.dumps(state, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in old_name
    with open(tmp_path / "old.pt", "wb") as f:  # torch's legacy (non-zip) layout: magic, protocol, sys info, data
        for part in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(part, f, protocol=2)
        f.write(old_name)
        pickle.dump([], f, protocol=2)
    assert (safe_torch_load(tmp_path / "old.pt", allowed=RNG_STATE_GLOBALS)[1] == state[1]).all()


def test_fp16_dynamic_loss_scaler_is_allowed_in_optimizer_files(tmp_path):
    """ZeRO 1/2 under fp16 pickle a DynamicLossScaler (this CPU may not run fp16, so the object is
    built directly, as DeepSpeed's CreateLossScaler builds it); without the allow-list it is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    torch.save({"loss_scaler": scaler}, tmp_path / "optim.pt")
    loaded = safe_torch_load(tmp_path / "optim.pt", allowed=deepspeed_globals())["loss_scaler"]
    assert type(loaded) is DynamicLossScaler and loaded.cur_scale == 65536.0 and loaded.dtype == torch.half
    with pytest.raises(UnsafeCheckpointError, match="references deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler, "
                                                    "which is not on mmoe-ds's allow-list"):
        safe_torch_load(tmp_path / "optim.pt")


def test_pickle_globals_names_what_a_pickle_would_import():
    """Read statically from the opcodes; nothing is executed."""
    data = pickle.dumps(RunsCode(Path("/nonexistent/x")), protocol=4)
    assert pickle_globals(data) == ["posix.system"]
    assert pickle_globals(pickle.dumps(RunsCode(Path("/nonexistent/x")), protocol=0)) == ["posix.system"]
    assert pickle_globals(pickle.dumps({"a": [1, 2.0, "s"]})) == []
