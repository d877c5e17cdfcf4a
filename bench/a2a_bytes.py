"""Count the bytes DeepSpeed's MoE all-to-all moves, against mmoe_ds.training.scaling's formula.

Started by the DeepSpeed launcher (`deepspeed --num_gpus N bench/a2a_bytes.py --out PREFIX`, CPU,
gloo). For each expert-parallel size that divides N and each of capacity / dropless routing, every
rank runs one forward and backward of a `DeepSpeedMoE` layer on its own tokens, each rank with a
different modality mix (image top-1, text top-2), while `deepspeed.comm.all_to_all_single` is
wrapped to record the bytes of every call. Each rank writes PREFIX.rank<r>.json: one row per case
with the capacity the router chose, the capacity the formula predicts from the ranks' token counts,
and the bytes measured vs predicted. `python -m mmoe_ds.training.scaling --measure` runs it at 2 and 4.
"""
from __future__ import annotations

import argparse
import json

import deepspeed
import deepspeed.comm
import torch
import torch.distributed as dist

from mmoe_ds.moe import RouterConfig
from mmoe_ds.moe.deepspeed_layer import DeepSpeedMoE
from mmoe_ds.training.scaling import all_to_all, capacity
from mmoe_ds.training.teardown import exit_process

D, F, E, TOKENS = 32, 64, 8, 96
TOP_K = {"image": 1, "text": 2}
CF, MIN_CAPACITY = 1.25, 2


class CountingAllToAll:
    """Wraps deepspeed.comm.all_to_all_single: records each call's input bytes and group size."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []
        self.inner = deepspeed.comm.all_to_all_single

    def __call__(self, output, tensor, *args, group=None, **kwargs):
        self.calls.append((tensor.numel() * tensor.element_size(), dist.get_world_size(group)))
        return self.inner(output, tensor, *args, group=group, **kwargs)


def case(rank: int, world: int, ep: int, drop_tokens: bool, counter: CountingAllToAll) -> dict:
    cfg = RouterConfig(num_experts=E, mode="modality_bias", top_k=TOP_K, capacity_factor=CF, drop_tokens=drop_tokens,
                       min_capacity=MIN_CAPACITY, ep_size=ep)
    torch.manual_seed(0)
    layer = DeepSpeedMoE(cfg, D, F)
    layer.set_deepspeed_parallelism()
    g = torch.Generator().manual_seed(100 + rank)
    images = TOKENS * (rank + 1) // (world + 1)  # a different modality mix on every rank
    m = torch.cat([torch.zeros(images, dtype=torch.long), torch.ones(TOKENS - images, dtype=torch.long)])
    x = torch.randn(TOKENS, D, generator=g, requires_grad=True)
    counter.calls.clear()
    out = layer(x[None], m[None])
    (out.hidden_states.square().sum() + out.aux_loss).backward()
    router_capacity = int(out.routing.capacity)
    # The formula's capacity: with a limit, from every rank of this expert-parallel group's token counts;
    # dropless, the largest expert load on any rank of the group (what the router agrees on).
    counts = torch.tensor([images, TOKENS - images, int(out.routing.stats.routed.sum(0).max())])
    gathered = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts)
    group = [r for r in range(world) if r // ep == rank // ep]  # DeepSpeed's expert-parallel group of this rank
    if drop_tokens:
        formula_c = max(capacity(TOKENS, E, CF, (int(gathered[r][0]) * TOP_K["image"]
                                                 + int(gathered[r][1]) * TOP_K["text"]) / TOKENS, MIN_CAPACITY)
                        for r in group)
    else:
        formula_c = max(int(gathered[r][2]) for r in group)
    expected = all_to_all(formula_c, E, D, x.element_size(), ep)
    return {"world_size": world, "ep_size": ep, "tokens": TOKENS, "image_tokens": images, "experts": E, "hidden": D,
            "drop_tokens": drop_tokens, "capacity_formula": formula_c, "capacity_router": router_capacity,
            "bytes_formula": expected.bytes_per_layer, "bytes_measured": sum(b for b, _ in counter.calls),
            "calls": len(counter.calls), "group_sizes": sorted({s for _, s in counter.calls})}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = CountingAllToAll()
    deepspeed.comm.all_to_all_single = counter
    rows = [case(rank, world, ep, drop, counter) for ep in (2, 4, 8) if ep <= world and world % ep == 0
            for drop in (True, False)]
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(rows, f)
    exit_process(0)


if __name__ == "__main__":
    main()
