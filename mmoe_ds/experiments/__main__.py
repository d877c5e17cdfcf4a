"""The review's experiments, one command each:

    python -m mmoe_ds.experiments NAME [--seeds 0,1,2] [--scale tiny|cpu|gpu] [--out runs/experiments] [--procs N]
    python -m mmoe_ds.experiments docs [--out runs/experiments] [--doc docs/experiments.md]

NAME: e1 (matched 2×2 × modality embedding), e2 (convergence: agnostic at 1×, 5×, 10× the aware
run's steps), e3 (expert function: the analysis of every router design in recipes/modes), e4
(the Gaussian toy), e5 (cross-dataset transfer to the emoji dataset), e6 (capacity and bias audit
under flipped batch mixes), all (e1..e6 then docs). Runs are stored under OUT/_runs by content
hash and reused when finished (an interrupted experiment, run again, continues); each
experiment writes OUT/<name>/results.json, results.md and its PNGs; `docs` regenerates
docs/experiments.md from them.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .runner import ExperimentError, Runner, Scale

EXPERIMENTS = {"e1": "e1_matched", "e2": "e2_convergence", "e3": "e3_function", "e5": "e5_transfer", "e6": "e6_audit"}
TOY_STEPS = {"tiny": 30}  # E4 at --scale tiny: fewer steps (the toy's default elsewhere)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"give distinct seeds, e.g. 0,1,2 (got {text!r})")
    return seeds


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mmoe_ds.experiments", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=["e1", "e2", "e3", "e4", "e5", "e6", "all", "docs"])
    ap.add_argument("--seeds", type=_seeds, default=[0, 1, 2])
    ap.add_argument("--scale", choices=["tiny", "cpu", "gpu"], default="cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/experiments"))
    ap.add_argument("--procs", type=int, default=None, help="processes per run (default: the scale's; on GPU: GPUs)")
    ap.add_argument("--doc", type=Path, default=Path("docs/experiments.md"), help="docs: the file to regenerate")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap.parse_args(argv)


def run_experiment(name: str, seeds: list[int], scale: Scale, out: Path, quiet: bool = False) -> dict | None:
    """Run one experiment (e1..e6) and return its results (E4: None; it writes its own files).

    Args:
        name: e1, e2, e3, e4, e5 or e6.
        seeds: the seeds.
        scale: the Scale of every run.
        out: the experiments folder.
    """
    if name == "e4":
        from . import toy

        argv = ["--seeds", ",".join(map(str, seeds)), "--out", str(out / "e4_toy")]
        if scale.name in TOY_STEPS:
            argv += ["--steps", str(TOY_STEPS[scale.name])]
        toy.main(argv)
        return None
    module = importlib.import_module(f".{EXPERIMENTS[name]}", __package__)
    runner = Runner(out, scale, log=not quiet)
    return module.run(runner, seeds, out / module.NAME)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.name == "docs":
        from .docs import write_document

        print(f"wrote {write_document(args.out, args.doc)}")
        return 0
    try:
        scale = Scale.load(args.scale, args.procs)
        names = ["e1", "e2", "e3", "e4", "e5", "e6"] if args.name == "all" else [args.name]
        for name in names:
            run_experiment(name, args.seeds, scale, args.out, args.quiet)
            print(f"{name}: results in {args.out}")
        if args.name == "all":
            from .docs import write_document

            print(f"wrote {write_document(args.out, args.doc)}")
    except ExperimentError as e:
        print(f"mmoe_ds.experiments: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
