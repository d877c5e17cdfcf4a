"""The review's experiments, one command each:

    python -m mmoe_ds.experiments NAME [--seeds 0,1,2] [--scale tiny|cpu|gpu] [--root .] [--out DIR] [--procs N]
    python -m mmoe_ds.experiments docs [--root .] [--out DIR] [--doc FILE] [--readme FILE]

Experiments:
  e1   matched 2×2: aware vs agnostic router × none / per-modality balance / the aware run's routing as a
       loss (the review's regularization ablation), with a size sweep and the covariance-regime data
  e2   convergence: both routers trained 10× longer; distance between their routing patterns at 1, 2, 5, 10×
  e3   expert function: CKA between experts and modality probes for every router design in recipes/modes
  e4   Gaussian toy: routers on two Gaussians that differ only in covariance; parameter counts against d
  e5   transfer: routing learnt on the embedded data, zero-shot and fine-tuned on the emoji data
  e6   capacity audit: drop rates and compute shares per modality under flipped batch mixes
  all  e1..e6, then docs
  docs regenerate docs/experiments.md (and the README's generated block) from the results

Runs are stored under OUT/_runs by content hash and reused when finished (an interrupted experiment,
run again, continues); each experiment writes OUT/<name>/results.json, then results.md and its PNGs
from it. ROOT (--root, default: the current directory) is an mmoe-ds source checkout: the recipes
are read from ROOT/recipes/; OUT defaults to ROOT/runs/experiments, --doc to ROOT/docs/experiments.md
and --readme to ROOT/README.md.
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
    """The command line (see the module docstring); --out, --doc and --readme default to paths under --root."""
    ap = argparse.ArgumentParser(prog="python -m mmoe_ds.experiments", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=["e1", "e2", "e3", "e4", "e5", "e6", "all", "docs"],
                    help="e1 matched 2×2, e2 convergence, e3 expert function/CKA, e4 Gaussian toy, e5 transfer, "
                         "e6 capacity audit, all, docs (see above)")
    ap.add_argument("--seeds", type=_seeds, default=[0, 1, 2])
    ap.add_argument("--scale", choices=["tiny", "cpu", "gpu"], default="cpu")
    ap.add_argument("--root", type=Path, default=Path("."),
                    help="the mmoe-ds source checkout whose recipes/ the runs use (default: the current directory)")
    ap.add_argument("--out", type=Path, default=None, help="the experiments folder (default: ROOT/runs/experiments)")
    ap.add_argument("--procs", type=int, default=None, help="processes per run (default: the scale's; on GPU: GPUs)")
    ap.add_argument("--doc", type=Path, default=None,
                    help="docs: the file to regenerate (default: ROOT/docs/experiments.md)")
    ap.add_argument("--readme", type=Path, default=None,
                    help="docs: the README whose generated experiments block is rewritten (skipped without the block; "
                         "default: ROOT/README.md)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    args.out = args.root / "runs" / "experiments" if args.out is None else args.out
    args.doc = args.root / "docs" / "experiments.md" if args.doc is None else args.doc
    args.readme = args.root / "README.md" if args.readme is None else args.readme
    return args


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
    """Run the experiment(s) named on the command line, or regenerate the docs; 2 with one line on stderr
    when something is wrong (a root without recipes/, no results to document, a failed run)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.name == "docs":
            from .docs import write_document

            if not args.out.is_dir():
                raise ExperimentError(f"--out {args.out.resolve()}: no such folder, so no results to document; pass "
                                      "the experiments folder with --out (or the checkout with --root).")
            print(f"wrote {write_document(args.out, args.doc, args.readme)}")
            return 0
        scale = Scale.load(args.scale, args.procs, args.root)
        names = ["e1", "e2", "e3", "e4", "e5", "e6"] if args.name == "all" else [args.name]
        for name in names:
            run_experiment(name, args.seeds, scale, args.out, args.quiet)
            print(f"{name}: results in {args.out}")
        if args.name == "all":
            from .docs import write_document

            print(f"wrote {write_document(args.out, args.doc, args.readme)}")
    except ExperimentError as e:
        print(f"mmoe_ds.experiments: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
