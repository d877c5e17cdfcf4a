"""The CPU rows of `bench/moe_layer.py` (ep_size 1 in one process, ep_size 2 through the launcher) as
docs/benchmarks.md quotes them: ms and, in brackets, the speed relative to DeepSpeed's stock layer
(its time / the row's), plus the routes stock drops at capacity factor 1.25.

    python bench/cpu_layer_tables.py runs/bench/2026-12-05-cpu

Reads moe_layer_ep1.txt and moe_layer_ep2.txt (the scripts' output; their last JSON line).
tests/test_benchmarks_doc.py checks that docs/benchmarks.md holds exactly this output.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from gpu_suite_tables import last_json


def table(run: dict) -> str:
    variants = list(run["rows"][0]["results"])
    out = [f"ep_size {run['ep_size']}, {run['tokens_per_rank']} tokens per rank, {run['dtype']}, median of "
           f"{run['iters']}; ms (× DeepSpeed stock)", "",
           "| shape | routing | " + " | ".join(f"`{v}`" for v in variants) + " | stock drops |",
           "|---|---|" + "---|" * (len(variants) + 1)]
    for row in run["rows"]:
        r = row["results"]
        cells = [f"{r[v]['ms']:.1f} ({r[v]['vs_deepspeed']:.2f}×)" for v in variants]
        out.append(f"| {row['shape']} | {row['routing']} | " + " | ".join(cells)
                   + f" | {r['deepspeed_stock']['dropped']:.1%} |")
    return "\n".join(out)


def tables(folder: Path) -> str:
    return "\n\n".join(table(last_json(folder / f"moe_layer_ep{ep}.txt")) for ep in (1, 2)) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    print(tables(parser.parse_args().folder), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
