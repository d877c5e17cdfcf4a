"""A finished gloo worker tears its process groups down before the interpreter does.

Issue 11, item 8: workers that left gloo to interpreter shutdown aborted at random under CPU load
("terminate called without an active exception", launcher exit status 250). These tests pin the
helper's contract in fresh 1-process worlds: what it reports and how the process ends.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

from launch_util import REPO, free_port

PRELUDE = """
import torch, torch.distributed as dist
from mmoe_ds.training.teardown import exit_process, gloo_threads, shutdown_distributed
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
"""


def run(body: str) -> subprocess.CompletedProcess:
    script = PRELUDE.format(port=free_port()) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_unreferenced_groups_are_joined_and_referenced_ones_reported():
    proc = run("""
        sub = dist.new_group([0]); dist.all_reduce(torch.ones(2), group=sub)
        print("before", sorted(set(gloo_threads())))
        del sub
        print("after", shutdown_distributed())
        held = []
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port2}", rank=0, world_size=1)
        held.append(dist.new_group([0]))   # kept alive, as a DeepSpeed engine keeps its groups
        print("held", sorted(set(shutdown_distributed())))
    """.replace("{port2}", str(free_port())))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "[WARNING]" not in line]
    assert lines == ["before ['gloo_tcp_loop', 'pt_gloo_runloop']", "after []",
                     "held ['gloo_tcp_loop', 'pt_gloo_runloop']"], proc.stdout


def test_exit_process_keeps_the_exit_status_and_the_output():
    clean = run("""
        print("result written", flush=False)
        exit_process(3)
        print("not reached")
    """)
    assert (clean.returncode, clean.stdout) == (3, "result written\n"), clean.stderr[-3000:]
    held = run("""
        keep = dist.new_group([0]); dist.all_reduce(torch.ones(2), group=keep)
        print("result written", flush=False)   # still in the buffer: exit_process must flush it
        exit_process(0)
        print("not reached")
    """)
    assert (held.returncode, held.stdout) == (0, "result written\n"), held.stderr[-3000:]


def test_without_distributed_it_is_a_plain_exit():
    script = ("from mmoe_ds.training.teardown import exit_process, shutdown_distributed\n"
              "print(shutdown_distributed())\nexit_process(0)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "[]\n"), proc.stderr[-3000:]
