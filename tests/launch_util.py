"""Start a script on 2 CPU processes with the real `deepspeed` launcher (gloo backend).

The launcher's and the workers' stdout and stderr are captured as one stream, in the order they
were written, so a failure shows what each worker printed just before it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmoe_ds.config import launch_env

REPO = Path(__file__).resolve().parents[1]

free_port = launch_env.free_port  # re-exported: the tests import it from here


@dataclass(frozen=True)
class LaunchResult:
    """One run of the deepspeed launcher.

    Attributes:
        cmd: the command line.
        returncode: the launcher's exit status (a worker killed by signal N shows as 256 - N).
        output: launcher and worker stdout + stderr, interleaved as written.
        seconds: wall time.
    """

    cmd: list[str]
    returncode: int
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def failure_message(self, tail_chars: int = 12000) -> str:
        status = self.returncode
        signal_note = f" (a worker died of signal {256 - status})" if 128 < status < 256 else ""
        return (f"deepspeed launch failed with exit status {status}{signal_note} after {self.seconds:.0f} s: "
                f"{' '.join(self.cmd)}\n--- launcher and worker output (last {tail_chars} chars) ---\n"
                f"{self.output[-tail_chars:]}")


def launch(script_args: list[str], num_procs: int = 2, timeout: int = 600, module: bool = False) -> LaunchResult:
    """Run `script_args` under `python -m deepspeed.launcher.runner --num_gpus num_procs` on the CPU.

    Args:
        script_args: the script (or module, with `module=True`) and its arguments.
        num_procs: processes to start.
        timeout: seconds before the launcher is killed (the result then has returncode -9).
    Returns:
        a LaunchResult; never raises for a failed launch.
    """
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs),
           "--master_port", str(free_port())] + (["--module"] if module else []) + script_args
    return run_process(cmd, child_env(), timeout)


def child_env(**extra: str) -> dict[str, str]:
    """The environment launched processes get: this one, one OpenMP thread each, offline, the repo importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra)


def run_process(cmd: list[str], env: dict[str, str], timeout: int) -> LaunchResult:
    """Run a launcher (deepspeed, torchrun, accelerate, a stub srun) in its own process group.

    Args:
        cmd: the command.
        env: its environment.
        timeout: seconds before the whole group (launcher, agents, workers) is killed.
    Returns:
        a LaunchResult with stdout and stderr merged in write order (returncode -9 after a timeout).
    """
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher and everything it started
        output, _ = proc.communicate()
        output += f"\n[launch_util] killed after the {timeout} s timeout"
    return LaunchResult(cmd, proc.returncode, output, time.monotonic() - start)


def deepspeed_launch(script_args: list[str], num_procs: int = 2, timeout: int = 600,
                     module: bool = False) -> LaunchResult:
    """`launch`, raising AssertionError with the launcher's and workers' output if it failed."""
    result = launch(script_args, num_procs, timeout, module)
    if not result.ok:
        raise AssertionError(result.failure_message())
    return result


@dataclass(frozen=True)
class SharedLaunch:
    """One launch whose results several tests read (a module-scoped fixture's value).

    A failed launch is reported once, by the test named `reported_by` (call `check()` there);
    every other test calls `require()` and is skipped with a pointer to it, instead of repeating
    the same error once per test.
    """

    result: LaunchResult
    reported_by: str

    def check(self) -> None:
        if not self.result.ok:
            pytest.fail(self.result.failure_message(), pytrace=False)

    def require(self) -> None:
        if not self.result.ok:
            pytest.skip(f"the launch failed (exit status {self.result.returncode}); see {self.reported_by}")
