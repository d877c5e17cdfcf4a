"""Issue 12, D' / acceptance 6: no code runs from a checkpoint.

A real checkpoint (tiny model, real DeepSpeed engine, ZeRO 1, one step; tests/safe_load_worker.py)
is tampered with the way an attacker would: a file's pickle is made to call `os.system("touch
MARKER")` while it is read, either injected into DeepSpeed's real state dict and re-saved with
`torch.save`, or as a bare pickle (protocol 4) in place of the file. Export and resume must refuse
each tampered file with one message naming the file and the global, and the marker must never
appear. The untampered checkpoint still exports and resumes to the trained weights.

Issue 23: the allow-list is pinned (exactly these globals per kind of file); a table of pickle
gadgets, written opcode by opcode (eval, exec, getattr + __import__, os.system, subprocess.Popen,
functools.partial, operator.attrgetter, open, nested torch.load / pickle.loads / numpy.load), each
refused by export (its CLI, exit 2, one line) and by resume (one worker for all, plus the trainer's
own CLI once); and a `latest` naming a tag without meta.json, with an expert file missing or with
a file cut short is refused by both, naming what is wrong and the complete tags beside it.
"""
from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_util import REPO, free_port

from mmoe_ds.cli import main as cli_main
from mmoe_ds.errors import IncompleteCheckpointError, UnsafeCheckpointError
from mmoe_ds.export import export
from mmoe_ds.export.gather import load_checkpoint_model
from mmoe_ds.io.safe_load import RNG_STATE_GLOBALS, allowed_globals, deepspeed_globals, pickle_globals, safe_torch_load

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


def record_sizes(tag_dir: Path) -> None:
    """Re-record the tag's file sizes in meta.json, as an attacker who rewrites a file would (else the
    size check of mmoe_ds.training.checkpoint.verify_tag refuses the file before its pickle is read)."""
    meta = json.loads((tag_dir / "meta.json").read_text())
    meta["files"] = {name: (tag_dir / name).stat().st_size for name in meta["files"]}
    (tag_dir / "meta.json").write_text(json.dumps(meta))


def tampered_copy(trusted_run: Path, dest: Path, name: str, tamper) -> tuple[Path, Path]:
    """A copy of the trusted run with `name` tampered; returns (run folder, the payload's marker file)."""
    shutil.copytree(trusted_run, dest)
    marker = dest.parent / f"{dest.name}.pwned"
    tamper(dest / TAG / name, marker)
    record_sizes(dest / TAG)
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


# -- the allow-list, pinned ------------------------------------------------------------------------
# Exactly what mmoe-ds adds to torch's weights-only defaults, per kind of file (safe_load's docstring
# says where each comes from). A new entry must be argued for there and added here.
RANK_STATE_NAMES = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                    "numpy.dtype", "numpy.dtypes.UInt32DType"}
OPTIMIZER_NAMES = {"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                   "deepspeed.utils.tensor_fragment.fragment_address", "deepspeed.runtime.zero.config.ZeroStageEnum"}


def test_the_allow_lists_are_exactly_these():
    import mmoe_ds.analysis.analyze  # noqa: F401  (with the trainer: everything that loads checkpoints)
    import mmoe_ds.train  # noqa: F401

    base = allowed_globals()
    assert allowed_globals(RNG_STATE_GLOBALS) - base == RANK_STATE_NAMES
    assert allowed_globals(deepspeed_globals()) - base == OPTIMIZER_NAMES
    assert len(RNG_STATE_GLOBALS) == len(RANK_STATE_NAMES) and len(deepspeed_globals()) == len(OPTIMIZER_NAMES)
    # the model files' list is torch's alone: nothing registered process-wide but torch's own tensor types
    registered = [f"{g.__module__}.{g.__qualname__}" for g in torch.serialization.get_safe_globals()]
    assert [name for name in registered if not name.startswith("torch.")] == []


def test_torch_defaults_hold_no_callable_that_runs_code():
    """Torch's own defaults (version-pinned with torch) are types, dtypes and its tensor rebuilders."""
    defaults = torch._weights_only_unpickler._get_allowed_globals()
    others = sorted(name for name, obj in defaults.items()
                    if not (isinstance(obj, (type, torch.dtype, torch.qscheme)) or type(obj).__name__ == "StorageType"
                            or name.startswith(("torch._utils._rebuild_", "torch._tensor._rebuild_"))))
    assert others == ["_codecs.encode", "torch.serialization._get_layout"]


@pytest.mark.parametrize("gadget", ["eval", "exec", "builtins.open"])
def test_the_refusal_is_the_allow_list(tmp_path, gadget):
    """The gadgets are refused because of the list: with a gadget's global on it, torch's loader
    accepts the file (and runs it; the canary shows it), so a widened list cannot go unseen. (Torch
    also blocks some modules outright, `os` and `subprocess` among them, whatever the list says.)"""
    import builtins

    objects = {f"builtins.{name}": getattr(builtins, name) for name in ("eval", "exec", "open")}
    canary = tmp_path / "canary"
    (tmp_path / "g.pt").write_bytes(gadget_bytes(gadget, canary, tmp_path / "work"))
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(tmp_path / "g.pt")
    assert not canary.exists()
    with pytest.raises(RuntimeError, match="magic number"):  # torch runs the pickle as the legacy magic number
        safe_torch_load(tmp_path / "g.pt", allowed=[(objects[g], g) for g in GADGETS[gadget][1]])
    assert canary.exists()


# -- the gadget table: hand-written pickles, each calling code a different way ----------------------------
# Each builder returns the bytes of a pickle that, read by an unrestricted unpickler, creates `canary`;
# `work` is a folder for the files a nested load reads. Written opcode by opcode (GLOBAL, strings,
# tuples, REDUCE): no object of ours is pickled, so nothing here can run the payload by accident.

def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_call(fn: bytes, *args: bytes) -> bytes:
    return fn + b"(" + b"".join(args) + b"tR"


def as_pickle(expression: bytes) -> bytes:
    return b"\x80\x02" + expression + b"."  # the protocol torch writes (it warns on others)


def touch(canary: Path) -> str:
    return f"touch {shlex.quote(str(canary))}"


def nested_payload_file(canary: Path, work: Path, suffix: str) -> Path:
    inner = work / f"inner{suffix}"
    inner.write_bytes(as_pickle(op_call(op_global("os", "system"), op_str(touch(canary)))))
    return inner


def nested_npy_file(canary: Path, work: Path) -> Path:
    """A .npy file of one object whose pickle runs os.system (numpy pickles object arrays)."""
    inner = work / "inner.npy"
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    body = as_pickle(b"]" + op_call(op_global("os", "system"), op_str(touch(canary))) + b"a")
    inner.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + body)
    return inner


GADGETS = {
    "eval": (lambda c, w: op_call(op_global("builtins", "eval"), op_str(f"__import__('os').system({touch(c)!r})")),
             ["builtins.eval"]),
    "exec": (lambda c, w: op_call(op_global("builtins", "exec"), op_str(f"import os; os.system({touch(c)!r})")),
             ["builtins.exec"]),
    "getattr": (lambda c, w: op_call(op_call(op_global("builtins", "getattr"),
                                             op_call(op_global("builtins", "__import__"), op_str("os")),
                                             op_str("system")), op_str(touch(c))),
                ["builtins.getattr", "builtins.__import__"]),
    "__import__": (lambda c, w: op_call(op_call(op_global("operator", "methodcaller"), op_str("system"),
                                                op_str(touch(c))),
                                        op_call(op_global("builtins", "__import__"), op_str("os"))),
                   ["operator.methodcaller", "builtins.__import__"]),
    "os.system": (lambda c, w: op_call(op_global("os", "system"), op_str(touch(c))), ["os.system"]),
    "subprocess.Popen": (lambda c, w: op_call(op_global("subprocess", "Popen"),
                                              b"(" + op_str("touch") + op_str(str(c)) + b"t"),
                         ["subprocess.Popen"]),
    "functools.partial": (lambda c, w: op_call(op_global("functools", "partial"), op_global("os", "system"),
                                               op_str(touch(c))) + b")R",
                          ["functools.partial", "os.system"]),
    "operator.attrgetter": (lambda c, w: op_call(op_call(op_call(op_global("operator", "attrgetter"),
                                                                 op_str("os.system")), op_global("os", "path")),
                                                 op_str(touch(c))),
                            ["operator.attrgetter", "os.path"]),
    "builtins.open": (lambda c, w: op_call(op_global("builtins", "open"), op_str(str(c)), op_str("w")),
                      ["builtins.open"]),
    "nested torch.load": (lambda c, w: op_call(op_global("torch", "load"),
                                               op_str(str(nested_payload_file(c, w, ".pt"))),
                                               b"N", op_global("torch.serialization", "pickle")),
                          ["torch.load", "torch.serialization.pickle"]),
    "nested pickle.loads": (lambda c, w: op_call(op_global("pickle", "loads"),
                                                 b"B" + struct.pack("<I", len(inner := as_pickle(op_call(
                                                     op_global("os", "system"), op_str(touch(c)))))) + inner),
                            ["pickle.loads"]),
    "nested numpy.load": (lambda c, w: op_call(op_global("numpy", "load"), op_str(str(nested_npy_file(c, w))),
                                               b"N", b"\x88"),
                          ["numpy.load"]),
}


def gadget_bytes(name: str, canary: Path, work: Path) -> bytes:
    work.mkdir(parents=True, exist_ok=True)
    return as_pickle(GADGETS[name][0](canary, work))


def gadget_copy(trusted_run: Path, dest: Path, gadget: str, name: str) -> tuple[Path, Path]:
    """A copy of the trusted run whose file `name` is the gadget's pickle; (run folder, canary)."""
    def tamper(path: Path, canary: Path) -> None:
        path.write_bytes(gadget_bytes(gadget, canary, dest.parent / f"{dest.name}.work"))
    return tampered_copy(trusted_run, dest, name, tamper)


def assert_names(message: str, run: Path, name: str, globals_: list[str]) -> None:
    """One line naming the file and exactly the gadget's globals, no traceback."""
    listed = ", ".join(globals_)
    verb = "is" if len(globals_) == 1 else "are"
    assert message.startswith(f"{run / TAG / name}: refused to load: it contains a pickle that references "
                              f"{listed}, which {verb} not on mmoe-ds's allow-list"), message
    assert "\n" not in message and "Traceback" not in message


def test_every_gadget_runs_code_when_loaded_unchecked(tmp_path):
    """The control: each pickle of the table creates its canary under a plain `pickle.load` (one
    process for all), so every refusal below is the refusal of a working exploit."""
    canaries = {g: tmp_path / f"{i}.canary" for i, g in enumerate(GADGETS)}
    files = []
    for i, gadget in enumerate(GADGETS):
        files.append(tmp_path / f"{i}.pkl")
        files[-1].write_bytes(gadget_bytes(gadget, canaries[gadget], tmp_path / f"{i}.work"))
    script = ("import pickle, sys\nfor p in sys.argv[1:]:\n    try:\n        pickle.load(open(p, 'rb'))\n"
              "    except Exception as e:\n        print(p, type(e).__name__, e)\n")
    subprocess.run([sys.executable, "-c", script, *map(str, files)], check=True, timeout=120,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.time() + 10  # subprocess.Popen's touch runs in its own process
    while time.time() < deadline and not all(c.exists() for c in canaries.values()):
        time.sleep(0.1)
    assert [g for g, c in canaries.items() if not c.exists()] == []


def test_every_gadget_global_is_found_statically():
    for gadget, (_, globals_) in GADGETS.items():
        assert pickle_globals(gadget_bytes(gadget, Path("/nonexistent/c"), Path("/tmp"))) == globals_, gadget


@pytest.mark.parametrize("gadget", list(GADGETS))
def test_export_refuses_every_gadget_in_one_line(trusted, tmp_path, capsys, gadget):
    """`mmoe-ds export` (its main, in this process): exit 2, one line naming file and globals."""
    name = (MODEL_FILE, EXPERT_FILE)[list(GADGETS).index(gadget) % 2]
    run, canary = gadget_copy(trusted[0], tmp_path / "run", gadget, name)
    capsys.readouterr()
    assert cli_main(["export", str(run), str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmoe-ds export: ") and err.count("\n") == 1, err
    assert_names(err[len("mmoe-ds export: "):].strip(), run, name, GADGETS[gadget][1])
    time.sleep(0.2 if gadget == "subprocess.Popen" else 0)
    assert not canary.exists() and not (tmp_path / "export").exists()


# -- broken `latest`: the tag it names lacks meta.json, an expert file, or has a file cut short ----------
def no_meta(tag_dir: Path) -> None:
    (tag_dir / "meta.json").unlink()


def missing_expert(tag_dir: Path) -> None:
    (tag_dir / EXPERT_FILE).unlink()


def truncated_model(tag_dir: Path) -> None:
    data = (tag_dir / MODEL_FILE).read_bytes()
    (tag_dir / MODEL_FILE).write_bytes(data[:len(data) // 2])


def truncated_optimizer(tag_dir: Path) -> None:
    data = (tag_dir / OPTIMIZER_FILE).read_bytes()
    (tag_dir / OPTIMIZER_FILE).write_bytes(data[:-100])


BROKEN = {"no_meta": (no_meta, "it has no meta.json"), "missing_expert": (missing_expert, f"{EXPERT_FILE} is missing"),
          "truncated_model": (truncated_model, f"{MODEL_FILE} has "),
          "truncated_optimizer": (truncated_optimizer, f"{OPTIMIZER_FILE} has ")}
LATER = "checkpoints/step00000002"


def broken_copy(trusted_run: Path, dest: Path, damage) -> Path:
    """The trusted run plus a step-2 tag (a copy of step 1) that `latest` names, damaged by `damage`."""
    shutil.copytree(trusted_run, dest)
    shutil.copytree(dest / TAG, dest / LATER)
    meta = json.loads((dest / LATER / "meta.json").read_text())
    (dest / LATER / "meta.json").write_text(json.dumps(dict(meta, step=2, tag="step00000002")))
    (dest / "checkpoints" / "latest").write_text("step00000002")
    damage(dest / LATER)
    return dest


def assert_incomplete(message: str, run: Path, problem: str) -> None:
    assert message.startswith(f"{run / 'checkpoints' / 'latest'} names step00000002, but that checkpoint is "
                              f"incomplete: {problem}"), message
    assert "refusing to use other weights in its place" in message and "\n" not in message
    assert message.endswith(f"write one of the complete tags here (step00000001) into "
                            f"{run / 'checkpoints' / 'latest'}."), message


@pytest.mark.parametrize("case", [c for c in BROKEN if c != "truncated_optimizer"])
def test_export_refuses_a_latest_tag_that_is_incomplete(trusted, tmp_path, capsys, case):
    """Export reads model and expert files only: those must all be there and whole."""
    run = broken_copy(trusted[0], tmp_path / "run", BROKEN[case][0])
    capsys.readouterr()
    assert cli_main(["export", str(run), str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmoe-ds export: ") and err.count("\n") == 1, err
    assert_incomplete(err[len("mmoe-ds export: "):].strip(), run, BROKEN[case][1])
    assert not (tmp_path / "export").exists()


def test_export_ignores_what_it_does_not_read(trusted, tmp_path):
    """A cut optimizer shard does not stop an export (it reads model files only); resume refuses it."""
    run = broken_copy(trusted[0], tmp_path / "run", truncated_optimizer)
    assert load_checkpoint_model(run)[2] == run / LATER


def test_a_tag_given_directly_is_checked_too(trusted, tmp_path):
    run = broken_copy(trusted[0], tmp_path / "run", missing_expert)
    with pytest.raises(IncompleteCheckpointError, match=f"{run / LATER}: incomplete checkpoint: {EXPERT_FILE} is "
                                                        "missing; .* use one of the complete checkpoints "
                                                        r"\(step00000001\)"):
        load_checkpoint_model(run / LATER)


def test_a_checkpoint_without_the_file_list_is_checked_by_structure(trusted, tmp_path):
    """Checkpoints written before meta.json listed its files: the expected files must be there, each
    a whole zip (a truncated torch.save file has no central directory)."""
    run = broken_copy(trusted[0], tmp_path / "run", lambda tag: None)
    meta = json.loads((run / LATER / "meta.json").read_text())
    (run / LATER / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    assert load_checkpoint_model(run)[2] == run / LATER
    truncated_model(run / LATER)
    with pytest.raises(IncompleteCheckpointError, match=f"{MODEL_FILE} is not a whole torch.save file"):
        load_checkpoint_model(run)


@pytest.fixture(scope="module")
def resumed(trusted, tmp_path_factory) -> dict:
    """One resume worker over the untampered run, one copy per tampered file, per gadget and per broken
    `latest`: {case: (run folder, marker, the worker's result for it)}."""
    base = tmp_path_factory.mktemp("resume")
    cases = {"clean": trusted[0]}
    markers = {"clean": base / "clean.pwned"}
    for case, name, tamper in [("model", MODEL_FILE, inject), ("expert", EXPERT_FILE, replace_with_bare_pickle),
                               ("optimizer", OPTIMIZER_FILE, inject), ("rank_state", RANK_FILE, inject)]:
        cases[case], markers[case] = tampered_copy(trusted[0], base / case, name, tamper)
    for i, gadget in enumerate(GADGETS):
        name = RESUME_TARGETS[i % len(RESUME_TARGETS)]
        cases[gadget], markers[gadget] = gadget_copy(trusted[0], base / f"gadget{i}", gadget, name)
    for case, (damage, _) in BROKEN.items():
        cases[case], markers[case] = broken_copy(trusted[0], base / case, damage), base / f"{case}.pwned"
    results = run_worker("resume", *(str(run) for run in cases.values()))
    return {case: (run, markers[case], results[str(run)]) for case, run in cases.items()}


RESUME_TARGETS = [MODEL_FILE, EXPERT_FILE, OPTIMIZER_FILE, RANK_FILE]


@pytest.mark.parametrize("gadget", list(GADGETS))
def test_resume_refuses_every_gadget(resumed, gadget):
    run, canary, result = resumed[gadget]
    assert result.get("error") == "UnsafeCheckpointError", result
    assert_names(result["message"], run, RESUME_TARGETS[list(GADGETS).index(gadget) % 4], GADGETS[gadget][1])
    assert not canary.exists()


def test_train_refuses_a_gadget_in_one_line_with_exit_2(trusted, small_dataset, tmp_path):
    """The trainer itself (`python -m mmoe_ds.train`, one process) resuming a run whose model file is
    a gadget: exit 2, one line on stderr naming file and global, no traceback, the canary absent."""
    from test_training import DS_CONFIG, write_recipe

    run, canary = gadget_copy(trusted[0], tmp_path / "run", "eval", MODEL_FILE)
    recipe = write_recipe(tmp_path / "recipe.json", small_dataset, run, ep=1, steps=2)
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "mmoe_ds.train", "--recipe", str(recipe), "--deepspeed_config",
                           DS_CONFIG], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mmoe-ds train:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("mmoe-ds train: configuration error: ")
    assert_names(errors[0][len("mmoe-ds train: configuration error: "):], run, MODEL_FILE, ["builtins.eval"])
    assert not canary.exists() and not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("case", list(BROKEN))
def test_resume_refuses_a_latest_tag_that_is_incomplete(resumed, case):
    run, _, result = resumed[case]
    assert result.get("error") == "IncompleteCheckpointError", result
    assert_incomplete(result["message"], run, BROKEN[case][1])


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
