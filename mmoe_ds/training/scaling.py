"""What expert parallelism moves: all-to-all bytes per step as a formula, and the cluster table.

DeepSpeed's `MOELayer` (the `moe_backend: "deepspeed"` path) lays each rank's routed tokens into a
capacity buffer [E, C, d] (E = all experts of the layer, C slots each, d the hidden size) and moves it
with one `all_to_all_single` over the expert-parallel group; the experts' outputs come back through a
second one of the same size. Backward runs both again on the gradients. So per MoE layer and micro
batch, each rank sends 4 buffers of E·C·d elements, of which the share (EP-1)/EP leaves the rank.

C is fixed by the router (mmoe_ds/moe/router.py `_slot_limits`, DeepSpeed's `_capacity`):
  with capacity (drop_tokens):  C = max(ceil(S / E · cf · k_eff), min_capacity), the maximum over
                                the expert-parallel group's ranks, where S = tokens on the rank and
                                k_eff = routes / tokens (image tokens top-k_image, text top-k_text);
  dropless:                     C = the largest load of any expert on any rank: S·k/E when balanced,
                                up to S·k when every route picks one expert.

`python -m mmoe_ds.training.scaling` writes docs/scaling.md from this formula, the GPU recipes, published link
speeds, and the bytes measured on CPU (runs/scaling/measured.json, written by the test's workers).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MEASURED = Path("runs/scaling/measured.json")
DOC = Path("docs/scaling.md")

# Published figures the cluster table uses (per GPU, one direction).
NVLINK4_BYTES_PER_S = 450e9  # NVLink 4 (H100/H200 SXM): 900 GB/s per GPU both directions together
IB_NDR_BYTES_PER_S = 50e9  # one 400 Gb/s InfiniBand NDR adapter per GPU
GPUS_PER_NODE = 8
# Measured on one H100 (../shared/NOTES.md, bf16, d1024 f4096 E8 k2): the grouped expert GEMMs alone.
GROUPED_GEMM_FLOPS_PER_S = 543e12


def capacity(tokens: int, num_experts: int, capacity_factor: float, k_eff: float, min_capacity: int) -> int:
    """Slots per expert with a capacity limit: DeepSpeed's `_capacity` (ceil in fp32, then the minimum)."""
    import torch

    value = torch.ceil((tokens / num_experts) * torch.tensor(capacity_factor * k_eff)).to(torch.int64)
    return max(int(value), min_capacity)


@dataclass(frozen=True)
class AllToAll:
    """One MoE layer's all-to-all traffic per micro batch on one rank."""

    capacity: int  # C
    buffer_bytes: int  # E·C·d·bytes: what one all_to_all_single call sends from a rank (its own share included)
    calls: int = 4  # dispatch + combine, forward and backward
    ep_size: int = 1

    @property
    def bytes_per_layer(self) -> int:
        """Bytes a rank hands to all_to_all_single per layer and micro batch (all 4 calls)."""
        return self.calls * self.buffer_bytes

    @property
    def off_rank_bytes_per_layer(self) -> float:
        """Of those, the bytes that leave the rank: (EP-1)/EP."""
        return self.bytes_per_layer * (self.ep_size - 1) / self.ep_size


def all_to_all(capacity_slots: int, num_experts: int, hidden: int, dtype_bytes: int, ep_size: int) -> AllToAll:
    """The traffic of a layer whose buffer has `capacity_slots` slots per expert."""
    return AllToAll(capacity_slots, num_experts * capacity_slots * hidden * dtype_bytes, 4, ep_size)


# -- the GPU recipes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecipeTraffic:
    recipe: str
    tokens_per_gpu: int  # micro batch x max_length (padding is routed too)
    hidden: int
    moe_intermediate: int
    num_experts: int
    moe_layers: int
    k_eff: float
    capacity_factor: float
    capacity: int
    bytes_per_step: int  # per GPU, all MoE layers, one micro batch, all 4 calls


def recipe_traffic(path: Path) -> RecipeTraffic:
    """The all-to-all bytes of one micro batch of a GPU recipe (bf16), from its model section (or its
    init_from model's shape, written in `SHAPES` for the upcycled recipe, whose weights are not here)."""
    from ..config.recipe import Recipe
    from ..model import MmoeConfig

    recipe = Recipe.load(path)
    shape = {k: v for k, v in SHAPES.get(path.name, {}).items() if not k.startswith("_")}
    config = MmoeConfig(**dict(recipe.model, **shape))
    rc = config.router_config()
    image_tokens = SHAPES.get(path.name, {}).get("_image_tokens", config.num_patches)
    L, comp = recipe.data.max_length, recipe.data.composition
    samples = sum(comp.values())
    image_share = sum(n for kind, n in comp.items() if "image" in kind) * image_tokens / (samples * L)
    k = dict(zip(rc.modalities, rc.top_k_per_modality))
    k_eff = image_share * k["image"] + (1 - image_share) * k["text"]
    S = recipe.micro_batch_size * L
    cf = rc.capacity_factor_per_modality[0]
    C = capacity(S, config.num_local_experts, cf, k_eff, rc.min_capacity)
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    per_layer = all_to_all(C, config.num_local_experts, config.hidden_size, 2, recipe.train.expert_parallel_size)
    return RecipeTraffic(path.name, S, config.hidden_size, config.moe_intermediate_size, config.num_local_experts,
                         moe_layers, round(k_eff, 4), cf, C, per_layer.bytes_per_layer * moe_layers)


# recipes/upcycle_gpu.json trains an `mmoe-ds upcycle` folder (Qwen2-1.5B + SigLIP base, 8 experts every 2nd layer):
# its shape, since the weights are not here. SigLIP base 224/16: 196 image tokens.
SHAPES = {"upcycle_gpu.json": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                               "moe_intermediate_size": 8960, "num_local_experts": 8, "num_experts_per_tok": 2,
                               "moe_layer_frequency": 2, "max_position_embeddings": 32768, "image_size": 224,
                               "patch_size": 16, "_image_tokens": 196}}


def cluster_rows(traffic: RecipeTraffic, ep_sizes=(8, 16, 32)) -> list[dict]:
    """Per EP size: seconds per step of all-to-all (the slowest link decides) vs the expert GEMMs.

    Off-rank bytes split into the share to GPUs of the same node (NVLink) and to other nodes
    (InfiniBand), both sent at once: time = max(intra / NVLink, inter / IB). Expert GEMM time: the
    received E·C rows through the SwiGLU expert (3 matmuls of d·f), forward + backward (3x), at the
    grouped-GEMM rate measured on one H100."""
    rows = []
    for ep in ep_sizes:
        nodes = max(1, ep // GPUS_PER_NODE)
        if traffic.num_experts % ep:  # fewer experts than GPUs: expert parallelism stops at E
            rows.append({"ep": ep, "nodes": nodes, "impossible": True})
            continue
        sent = traffic.bytes_per_step
        intra = sent * (min(ep, GPUS_PER_NODE) - 1) / ep
        inter = sent * (ep - min(ep, GPUS_PER_NODE)) / ep
        comm = max(intra / NVLINK4_BYTES_PER_S, inter / IB_NDR_BYTES_PER_S)
        rows_received = traffic.num_experts * traffic.capacity
        gemm_flops = 3 * 2 * 3 * rows_received * traffic.hidden * traffic.moe_intermediate * traffic.moe_layers
        gemm = gemm_flops / GROUPED_GEMM_FLOPS_PER_S
        rows.append({"ep": ep, "nodes": nodes, "intra_gb": intra / 1e9, "inter_gb": inter / 1e9,
                     "comm_ms": comm * 1e3, "gemm_ms": gemm * 1e3, "ratio": comm / gemm})
    return rows


# -- the document ---------------------------------------------------------------------------------
def render(measured: dict, root: Path = Path(".")) -> str:
    """docs/scaling.md from the measured bytes and the recipes."""
    lines = ["# Scaling: what expert parallelism moves, and what it costs on a cluster", "",
             "<!-- Generated by `python -m mmoe_ds.training.scaling` from runs/scaling/measured.json and recipes/. "
             "Do not edit by hand. -->", "",
             "DeepSpeed's MoE layer (`moe_backend: \"deepspeed\"`) moves each rank's routed tokens as one capacity "
             "buffer of E·C·d elements per all-to-all: dispatch and combine in the forward, the same two on the "
             "gradients in the backward, so **4·E·C·d·bytes per MoE layer and micro batch per GPU**, of which "
             "(EP−1)/EP leaves the GPU. C, the slots per expert, is set by the router:", "",
             "- with a capacity limit: C = max(⌈S/E · cf · k_eff⌉, min_capacity), the maximum over the "
             "expert-parallel group (S: tokens on the GPU, cf: capacity factor, k_eff: routes per token — "
             "image tokens take top-k_image, text top-k_text);",
             "- dropless: C = the largest load of any expert on any GPU — S·k/E when balanced, up to S·k.", "",
             "The buffer does not shrink when routing is skewed or when most slots are empty: the bytes depend on "
             "S, d, E, cf and k, not on where the tokens go. Padding positions are routed and moved too.", "",
             "## The formula against the bytes actually moved (CPU, gloo)", "",
             "`tests/test_scaling.py` starts the real DeepSpeed launcher with 2 and 4 CPU processes, runs one "
             "forward and backward of `DeepSpeedMoE` (bf16 is not needed: bytes scale with the element size; "
             "fp32 here) with each rank's own modality mix, and counts what every `all_to_all_single` call "
             "receives (the collective wrapped in the worker). Measured = formula, to the byte:", "",
             "| processes | EP | rank | tokens (image) | E | d | drop_tokens | C (formula) | C (router) "
             "| bytes per layer, formula | bytes per layer, measured | calls |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in measured["rows"]:
        lines.append(f"| {row['world_size']} | {row['ep_size']} | {row['rank']} "
                     f"| {row['tokens']} ({row['image_tokens']}) "
                     f"| {row['experts']} | {row['hidden']} "
                     f"| {row['drop_tokens']} | {row['capacity_formula']} | {row['capacity_router']} "
                     f"| {row['bytes_formula']:,} | {row['bytes_measured']:,} | {row['calls']} |")
    lines += ["", f"Measured with: `{measured['command']}` ({measured['versions']}).", "",
              "## The GPU recipes on a cluster", "",
              "Per GPU, per micro batch, all MoE layers, bf16 (the recipes' micro batch × `max_length` tokens; "
              "k_eff from the recipe's batch composition):", "",
              "| recipe | tokens per GPU | d | E | MoE layers | k_eff | cf | C | all-to-all bytes per step |",
              "|---|---|---|---|---|---|---|---|---|"]
    traffic = [recipe_traffic(Path(root) / "recipes" / name) for name in ("gpu_node.json", "upcycle_gpu.json")]
    for t in traffic:
        lines.append(f"| {t.recipe} | {t.tokens_per_gpu:,} | {t.hidden} | {t.num_experts} | {t.moe_layers} | {t.k_eff} "
                     f"| {t.capacity_factor} | {t.capacity} | {t.bytes_per_step / 1e9:.2f} GB |")
    lines += ["", "Expected all-to-all time per step against the expert GEMMs it feeds, with the same expert count "
              f"spread over EP GPUs ({GPUS_PER_NODE} per node). Links, per GPU and direction: NVLink 4 "
              f"{NVLINK4_BYTES_PER_S / 1e9:.0f} GB/s (900 GB/s both ways, H100/H200 SXM) inside a node, one 400 Gb/s "
              f"InfiniBand NDR adapter ({IB_NDR_BYTES_PER_S / 1e9:.0f} GB/s) between nodes; intra- and inter-node "
              "parts go at once, the slower decides. Expert GEMMs: forward + backward of the E·C received rows at "
              f"{GROUPED_GEMM_FLOPS_PER_S / 1e12:.0f} TFLOP/s (the grouped GEMMs alone, measured on one H100, "
              "bf16, d1024 f4096 E8 k2). Ideal links, no overlap, no latency: read these as lower bounds for "
              "communication.", "",
              "| recipe | EP | nodes | to GPUs in the node | to other nodes | all-to-all | expert GEMMs | ratio | "
              "what it needs |", "|---|---|---|---|---|---|---|---|---|"]
    for t in traffic:
        for r in cluster_rows(t):
            if r.get("impossible"):
                best = max(e for e in (1, 2, 4, GPUS_PER_NODE) if t.num_experts % e == 0)
                lines.append(f"| {t.recipe} | {r['ep']} | {r['nodes']} | — | — | — | — | — | {t.num_experts} experts "
                             f"cannot spread over {r['ep']} GPUs: run EP {best} × DP {r['ep'] // best}; expert groups "
                             f"stay inside a node, so the EP {best} row applies |")
                continue
            need = ("fine as is" if r["ratio"] < 0.3 else "overlap all-to-all with compute" if r["ratio"] < 1
                    else "hierarchical all-to-all (gather per node over NVLink, one IB exchange) and overlap")
            lines.append(f"| {t.recipe} | {r['ep']} | {r['nodes']} | {r['intra_gb']:.2f} GB | {r['inter_gb']:.2f} GB | "
                         f"{r['comm_ms']:.1f} ms | {r['gemm_ms']:.1f} ms | {r['ratio']:.2f} | {need} |")
    lines += ["", "## What this does not show", "",
              "- No GPU run: the link speeds are published peaks and the GEMM rate one H100 measurement; real "
              "all-to-all reaches a fraction of the peak (message sizes, NCCL protocol, congestion), so the "
              "communication column is optimistic.",
              "- The table keeps the experts per layer fixed while EP grows: each GPU holds fewer experts and "
              "receives the same E·C rows, so the GEMM time per GPU stays and the inter-node share grows with EP. "
              "DeepSpeed forms expert-parallel groups from consecutive ranks, so with EP ≤ GPUs per node they stay "
              "inside a node and only the gradient all-reduce crosses nodes.",
              "- Gradient all-reduce (dense weights over all GPUs, experts within their expert-data-parallel group) "
              "is not counted here; `mmoe-ds plan` gives the bytes of each.",
              "- A dropless index dispatch (no capacity padding) moves only the routed rows: S·k_eff·d per call "
              "instead of E·C·d, a saving of cf× when balanced and more under skew.", ""]
    return "\n".join(lines)


def measure(root: Path, world_sizes=(2, 4)) -> dict:
    """Launch bench/a2a_bytes.py with the DeepSpeed launcher on `world_sizes` CPU processes; its rows."""
    from ..config.launch_env import free_port

    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    with tempfile.TemporaryDirectory() as tmp:
        for n in world_sizes:
            out = Path(tmp) / f"w{n}"
            subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port",
                            str(free_port()), "bench/a2a_bytes.py", "--out", str(out)], cwd=root, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            for rank in range(n):
                rows += [dict(row, rank=rank) for row in json.loads(Path(f"{out}.rank{rank}.json").read_text())]
    import deepspeed
    import torch

    return {"command": "python -m mmoe_ds.training.scaling --measure", "rows": rows,
            "versions": f"torch {torch.__version__.split('+')[0]}, deepspeed {deepspeed.__version__}, gloo"}


def main(argv: list[str] | None = None) -> int:
    """Write docs/scaling.md from runs/scaling/measured.json (`--measure`: measure first; `--check`:
    compare instead of writing), in the source checkout `--root` (default: the current directory)."""
    parser = argparse.ArgumentParser(prog="python -m mmoe_ds.training.scaling", description=main.__doc__)
    parser.add_argument("--measure", action="store_true", help="measure the bytes on 2 and 4 CPU processes first")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/scaling.md is not what it would write")
    parser.add_argument("--root", type=Path, default=Path("."), help="the source checkout (recipes/, bench/, docs/)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    root = args.root
    if not (root / "recipes").is_dir() or not (root / "bench" / "a2a_bytes.py").is_file():
        print(f"scaling: {root.resolve()} is not an mmoe-ds source checkout (no recipes/ or bench/a2a_bytes.py); "
              f"run it from the checkout or pass --root", file=sys.stderr)
        return 2
    if args.measure:
        (root / MEASURED).parent.mkdir(parents=True, exist_ok=True)
        (root / MEASURED).write_text(json.dumps(measure(root), indent=1) + "\n")
    measured = json.loads((root / MEASURED).read_text())
    text = render(measured, root)
    if args.check:
        same = (root / DOC).read_text() == text
        print("docs/scaling.md is up to date" if same
              else "docs/scaling.md differs: run python -m mmoe_ds.training.scaling")
        return 0 if same else 1
    (root / DOC).write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
