"""Launch a 2-process DeepSpeed worker N times in a row through the real launcher, optionally with
busy loops occupying the cores, and count the clean launches.

    python tools/launch_stress.py --runs 30                       # the expert-parallel test's worker
    python tools/launch_stress.py --runs 30 --load 2              # plus 2 busy-loop processes
    python tools/launch_stress.py --runs 10 -- tests/ep_worker.py --out {out}

Each run uses `tests/launch_util.launch`, exactly as the tests do; `{out}` in the worker arguments
becomes a fresh path per run. Failed runs keep their full launcher + worker output in
`--logs/run<i>.log`. Prints one line per run and "N/M clean"; exits 1 unless all were clean.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from launch_util import launch  # noqa: E402

DEFAULT_WORKER = ["tests/ep_worker.py", "--out", "{out}"]


def busy_loop() -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--load", type=int, default=0, help="busy-loop processes to run alongside")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    parser.add_argument("--logs", default=None, help="folder for failed runs' output (default: a temp folder)")
    parser.add_argument("worker", nargs="*", help="script and arguments (default: tests/ep_worker.py --out {out})")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.load < 0:
        parser.error("--runs must be >= 1 and --load >= 0")
    logs = Path(args.logs or tempfile.mkdtemp(prefix="launch_stress_"))
    logs.mkdir(parents=True, exist_ok=True)
    worker = args.worker or DEFAULT_WORKER
    loads = [mp.Process(target=busy_loop, daemon=True) for _ in range(args.load)]
    for p in loads:
        p.start()
    clean = 0
    try:
        for i in range(args.runs):
            out = logs / f"run{i}" / "result"
            out.parent.mkdir(exist_ok=True)
            result = launch([a.replace("{out}", str(out)) for a in worker], timeout=args.timeout)
            clean += result.ok
            note = "" if result.ok else f"  -> {logs / f'run{i}.log'}"
            if not result.ok:
                (logs / f"run{i}.log").write_text(result.failure_message(tail_chars=10**7))
            print(f"run {i + 1}/{args.runs}: exit {result.returncode} in {result.seconds:.0f} s{note}", flush=True)
    finally:
        for p in loads:
            p.terminate()
    print(f"{clean}/{args.runs} clean (load: {args.load} busy loops; logs: {logs})")
    return 0 if clean == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
