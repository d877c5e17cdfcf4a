"""Started by tests/test_expert_parallel.py on 2 CPU processes: one rank receives zero tokens.

For every routing mode, with capacity and dropless, rank 1 calls the expert-parallel layer with
an empty batch while rank 0 has tokens (then both ranks empty): the all-to-all and the capacity
all-reduce must still match up (no hang), rank 1's aux loss must be 0 with finite gradients, and
rank 0's output must equal the naive reference on its own tokens. Then a few DeepSpeed engine
steps where rank 1's micro batch is empty. Results go to the JSON file named by --out.
"""
from __future__ import annotations

import math

import torch
from ep_worker import (
    MODES,
    D,
    F,
    finish_worker,
    local_state,
    rel_diff,
    router_config,
    routing_fields,
    start_worker,
    tiny_engine,
)
from naive_moe import naive_moe
from torch import nn

from mmoe_ds.moe import TorchMoE
from mmoe_ds.moe.deepspeed_layer import DeepSpeedMoE


def finite(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.isfinite(t).all())


def empty_rank_layers(rank: int) -> dict:
    results = {}
    for mode in MODES:
        for dropless in (False, True):
            torch.manual_seed(0)
            full_state = TorchMoE(router_config(mode, 1, dropless), D, F).state_dict()
            layer = DeepSpeedMoE(router_config(mode, 2, dropless), D, F)
            layer.set_deepspeed_parallelism()
            layer.load_state_dict(local_state(full_state, rank))
            record = {}
            for case, sizes in (("one_empty", (30, 0)), ("both_empty", (0, 0))):
                g = torch.Generator().manual_seed(rank)
                n = sizes[rank]
                x = (torch.randn(n, D, generator=g) * 2).requires_grad_(True)
                m = torch.randint(0, 2, (n,), generator=g)
                layer.zero_grad(set_to_none=True)
                out = layer(x, m)
                (out.hidden_states.sum() + out.aux_loss).backward()
                grads_finite = finite(x.grad) and all(finite(p.grad) for p in layer.parameters())
                entry = {"tokens": n, "out_shape": list(out.hidden_states.shape), "aux_loss": out.aux_loss.item(),
                         "grads_finite": grads_finite}
                if n:
                    naive = naive_moe(full_state, x.detach(), m, **routing_fields(mode, dropless))
                    entry["vs_naive_out"] = rel_diff(out.hidden_states.detach().double(), naive.out)
                record[case] = entry
            results[f"{mode}/{'dropless' if dropless else 'capacity'}"] = record
    return results


def engine_steps_with_an_empty_rank(rank: int) -> list[float]:
    """DeepSpeed steps where rank 1's micro batch holds no tokens: must neither hang nor go NaN."""
    engine = tiny_engine()
    g = torch.Generator().manual_seed(7 + rank)
    tokens = 12 if rank == 0 else 0
    x, m = torch.randn(8, tokens, D, generator=g), torch.randint(0, 2, (8, tokens), generator=g)
    losses = []
    for _ in range(3):
        pred, aux = engine(x, m)
        loss = nn.functional.mse_loss(pred, torch.tanh(x)) if tokens else pred.sum() * 0.0
        engine.backward(loss + aux)
        engine.step()
        losses.append(loss.item() + aux.item())
    return losses


def main() -> None:
    out, rank = start_worker()
    losses = engine_steps_with_an_empty_rank(rank)
    finish_worker(out, rank, {"layers": empty_rank_layers(rank), "engine_losses": losses,
                              "engine_losses_finite": all(math.isfinite(v) for v in losses)})


if __name__ == "__main__":
    main()
