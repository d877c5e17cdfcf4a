"""Started by tests/test_expert_parallel.py through the `deepspeed` launcher on 2 CPU processes.

For every routing mode it builds one reference `TorchMoE` (same seed on both ranks), copies its
weights into a `DeepSpeedMoE` at ep_size=2 (each rank keeps its half of the experts, DeepSpeed's
gloo all-to-all moves the tokens) and at ep_size=1 (all experts local), runs each rank's own
tokens through all three and records the largest relative differences of outputs and input
gradients. All three share `route()`, so each is also compared with `naive_moe`, an independent
per-token reference written in the tests: that comparison is the one that proves the routing.
It checks that an HF model built at ep_size=2 holds, on each rank, the experts that an ep_size=1
model holds under the same global ids (experts are seeded by global id). Then it trains a tiny
model with `deepspeed.initialize` and records the losses.
Results go to the JSON file named by --out (one per rank).
"""
from __future__ import annotations

import argparse
import json

import deepspeed
import torch
from naive_moe import naive_moe
from torch import nn

from mmoe_ds.moe import RouterConfig, TorchMoE
from mmoe_ds.moe.deepspeed_layer import DeepSpeedMoE
from mmoe_ds.moe.experts import to_per_expert
from mmoe_ds.training.teardown import exit_process

D, F, E = 16, 32, 4
POOLS = {"image": [0, 1, 2], "text": [2, 3]}
MODES = ("agnostic", "modality_bias", "masked_pools", "separate_routers")


def routing_fields(mode: str, dropless: bool) -> dict:
    """The RouterConfig fields that decide routes (shared with the naive reference)."""
    return dict(num_experts=E, mode=mode, top_k={"image": 1, "text": 2},
                capacity_factor=1.0 if not dropless else {"image": 1.0, "text": 1.5},
                drop_tokens=not dropless, min_capacity=2, pools=POOLS if mode == "masked_pools" else None)


def router_config(mode: str, ep_size: int, dropless: bool) -> RouterConfig:
    return RouterConfig(**routing_fields(mode, dropless), ep_size=ep_size, modality_load_balance_coef=0.1,
                        z_loss_coef=0.01, modality_bias_init_std=0.5 if mode == "modality_bias" else 0.0)


def local_state(full_state: dict, rank: int) -> dict:
    """The ep_size=2 state dict of `rank`: its half of the experts, renumbered from 0 (per-expert names,
    as DeepSpeed's layers and checkpoint files hold them)."""
    local = {}
    for key, value in to_per_expert(full_state).items():
        if ".deepspeed_experts." in key:
            prefix, rest = key.split(".deepspeed_experts.")
            global_id, name = rest.split(".", 1)
            if int(global_id) // 2 == rank:
                local[f"{prefix}.deepspeed_experts.{int(global_id) % 2}.{name}"] = value
        else:
            local[key] = value
    return local


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def run_layer(layer, x, m, upstream):
    x = x.clone().requires_grad_(True)
    out = layer(x, m)
    ((out.hidden_states * upstream).sum() + out.aux_loss).backward()
    return out.hidden_states.detach(), x.grad.detach(), out.routing.stats.dropped.sum().item()


def compare_modes(rank: int) -> dict:
    results = {}
    for mode in MODES:
        for dropless in (False, True):
            torch.manual_seed(0)
            reference = TorchMoE(router_config(mode, 1, dropless), D, F)
            full_state = reference.state_dict()
            ep1 = DeepSpeedMoE(router_config(mode, 1, dropless), D, F)
            ep2 = DeepSpeedMoE(router_config(mode, 2, dropless), D, F)
            for layer in (ep1, ep2):
                layer.set_deepspeed_parallelism()
            ep1.load_state_dict(full_state)
            ep2.load_state_dict(local_state(full_state, rank))
            g = torch.Generator().manual_seed(1000 + rank)
            x = torch.randn(6, 10, D, generator=g) * 2
            m = torch.randint(0, 2, (6, 10), generator=g)
            upstream = torch.randn(6, 10, D, generator=g)
            out_ref, grad_ref, drop_ref = run_layer(reference, x, m, upstream)
            out1, grad1, drop1 = run_layer(ep1, x, m, upstream)
            out2, grad2, drop2 = run_layer(ep2, x, m, upstream)
            naive = naive_moe(full_state, x.reshape(-1, D), m.reshape(-1), **routing_fields(mode, dropless))
            results[f"{mode}/{'dropless' if dropless else 'capacity'}"] = {
                "ep2_vs_naive_out": rel_diff(out2.reshape(-1, D).double(), naive.out), "naive_dropped": naive.dropped,
                "ep2_vs_ep1_out": rel_diff(out2, out1), "ep2_vs_ep1_grad": rel_diff(grad2, grad1),
                "deepspeed_vs_torch_out": rel_diff(out1, out_ref), "deepspeed_vs_torch_grad": rel_diff(grad1, grad_ref),
                "dropped": [drop_ref, drop1, drop2]}
    return results


def expert_seeding(rank: int) -> dict:
    """Max |difference| between this rank's experts at ep_size=2 and the ep_size=1 model's experts
    of the same global id (rank * 2 + local id), and of the same local id (should differ on rank 1)."""
    from mmoe_ds.model import MmoeConfig, MmoeForCausalLM

    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                moe_intermediate_size=32, num_local_experts=E, moe_layer_frequency=1)
    full = to_per_expert(MmoeForCausalLM(MmoeConfig(**base, moe_backend="torch", ep_size=1)).state_dict())
    sharded = MmoeForCausalLM(MmoeConfig(**base, moe_backend="deepspeed", ep_size=2)).state_dict()
    by_global, by_local = 0.0, 0.0
    for key, value in sharded.items():
        if ".deepspeed_experts." not in key:
            continue
        prefix, rest = key.split(".deepspeed_experts.")
        local_id, name = rest.split(".", 1)
        global_key = f"{prefix}.deepspeed_experts.{rank * (E // 2) + int(local_id)}.{name}"
        by_global = max(by_global, float((value - full[global_key]).abs().max()))
        by_local = max(by_local, float((value - full[key]).abs().max()))
    return {"vs_same_global_id": by_global, "vs_same_local_id": by_local}


class TinyMoEModel(nn.Module):
    """Regression through one MoE block: enough to see DeepSpeed's optimizer steps lower the loss."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = DeepSpeedMoE(router_config("modality_bias", 2, False), D, F)
        self.out = nn.Linear(D, D)

    def forward(self, x, m):
        h = self.moe(torch.relu(self.inp(x)), m)
        return self.out(h.hidden_states), h.aux_loss


def tiny_engine():
    """A DeepSpeed engine (ZeRO-1, Adam, micro batch 8) around a seeded TinyMoEModel."""
    torch.manual_seed(0)
    model = TinyMoEModel()
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": 1}, "steps_per_print": 1000}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    return engine


def train_steps(rank: int) -> list[float]:
    engine = tiny_engine()
    g = torch.Generator().manual_seed(7 + rank)
    target_map = torch.randn(D, D, generator=g)
    x, m = torch.randn(8, 12, D, generator=g), torch.randint(0, 2, (8, 12), generator=g)
    y = torch.tanh(x @ target_map)
    losses = []
    for _ in range(30):
        pred, aux = engine(x, m)
        loss = nn.functional.mse_loss(pred, y)
        engine.backward(loss + aux)
        engine.step()
        losses.append(loss.item())
    return losses


def start_worker() -> tuple[str, int]:
    """Parse the launcher's arguments and join the gloo group. Returns (--out prefix, rank)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 30 s JIT build unused here
    deepspeed.init_distributed(dist_backend="gloo")
    return args.out, torch.distributed.get_rank()


def finish_worker(out: str, rank: int, result: dict) -> None:
    """Write this rank's result as `<out>.rank<r>.json` and exit."""
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    exit_process(0)  # tear gloo down before the interpreter does (see mmoe_ds/training/teardown.py)


def main() -> None:
    out, rank = start_worker()
    finish_worker(out, rank, {"modes": compare_modes(rank), "expert_seeding": expert_seeding(rank),
                              "losses": train_steps(rank)})


if __name__ == "__main__":
    main()
