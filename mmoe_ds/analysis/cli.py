"""`mmoe-ds analyze RUN_OR_EXPORT`: the routing analysis of a run or an export on a held-out probe set.

Writes analysis.json, analysis.md and PNGs (utilization heatmaps per layer, CKA heatmaps, probe
accuracy / TV / NMI per layer) to --out (default: RUN/analysis for a run, EXPORT-analysis beside
an export). Bad input (not a run or an export, data without a test split, a model without MoE
layers) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .alarms import AlarmThresholds


def default_out(source: Path) -> Path:
    """RUN/analysis for a run (or its checkpoints / a tag dir inside it), EXPORT-analysis beside an export."""
    source = source.resolve()
    for candidate in (source, source.parent, source.parent.parent):
        if (candidate / "checkpoints").is_dir():
            return candidate / "analysis"
    return source.parent / f"{source.name}-analysis"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The arguments of `mmoe-ds analyze`."""
    d = AlarmThresholds()
    p = argparse.ArgumentParser(prog="mmoe-ds analyze", description=__doc__.splitlines()[0])
    p.add_argument("source", help="a run's output dir, a checkpoint dir, or an export dir")
    p.add_argument("--data", default=None, help="prepared data whose test split is the probe set (default: the run's; "
                                                "required for an export)")
    p.add_argument("--out", default=None, help="folder for the report (default: RUN/analysis or EXPORT-analysis)")
    p.add_argument("--n-probe", type=int, default=512, help="test image+caption samples in the probe set (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="probe samples, probe split, permutation null (%(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (%(default)s)")
    p.add_argument("--n-perm", type=int, default=1000, help="shuffles of the permutation null (%(default)s)")
    p.add_argument("--compare", default=None, help="another run or export of the same architecture and tokenizer: "
                                                   "match its experts to these")
    p.add_argument("--dead-fraction", type=float, default=d.dead_fraction_of_uniform,
                   help="dead-expert alarm below this fraction of an even share of the routes (%(default)s)")
    p.add_argument("--monopoly-share", type=float, default=d.monopoly_share,
                   help="monopoly alarm above this share of a modality's tokens on one expert (%(default)s)")
    p.add_argument("--min-effective-experts", type=float, default=d.min_effective_experts,
                   help="few-experts alarm below this many effective experts for a modality (%(default)s)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    """Args: argv: the command line after `analyze`. Returns: the exit status (0 ok, 2 bad input)."""
    args = parse_args(argv)
    from .analyze import AnalysisInputError, analyze, write_report

    try:
        thresholds = AlarmThresholds(args.dead_fraction, args.monopoly_share, args.min_effective_experts)
        if args.n_probe < 2:
            raise AnalysisInputError(f"--n-probe: at least 2 probe samples, got {args.n_probe}.")
        if args.batch_size < 1:
            raise AnalysisInputError(f"--batch-size: at least 1, got {args.batch_size}.")
        if args.n_perm < 1:
            raise AnalysisInputError(f"--n-perm: at least 1, got {args.n_perm}.")
        result = analyze(args.source, args.data, n_probe=args.n_probe, seed=args.seed, batch_size=args.batch_size,
                         compare=args.compare, thresholds=thresholds, n_perm=args.n_perm)
    except (AnalysisInputError, ValueError) as e:
        print(f"mmoe-ds analyze: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out(Path(args.source))
    paths = write_report(result, out)
    print(f"analyzed {args.source} on {result.n_probe_samples} probe samples in {result.seconds:.1f} s; "
          f"{len(result.alarms)} alarm(s); wrote " + ", ".join(str(p) for p in paths))
    return 0
