"""Started by tests/test_expert_parallel.py through the `deepspeed` launcher on 2 CPU processes.

For every routing mode it builds one reference `TorchMoE` (same seed on both ranks), copies its
weights into a `DeepSpeedMoE` at ep_size=2 (each rank keeps its half of the experts, DeepSpeed's
gloo all-to-all moves the tokens) and at ep_size=1 (all experts local), runs each rank's own
tokens through all three and records the largest relative differences of outputs and input
gradients. Then it trains a tiny model with `deepspeed.initialize` and records the losses.
Results go to the JSON file named by --out (one per rank).
"""
from __future__ import annotations

import argparse
import json

import deepspeed
import torch
from torch import nn

from mmoe_ds.moe import RouterConfig, TorchMoE
from mmoe_ds.moe.deepspeed_layer import DeepSpeedMoE

D, F, E = 16, 32, 4
POOLS = {"image": [0, 1, 2], "text": [2, 3]}


def router_config(mode: str, ep_size: int, dropless: bool) -> RouterConfig:
    return RouterConfig(num_experts=E, mode=mode, ep_size=ep_size, top_k={"image": 1, "text": 2},
                        capacity_factor=1.0 if not dropless else {"image": 1.0, "text": 1.5},
                        drop_tokens=not dropless, min_capacity=2, modality_load_balance_coef=0.1, z_loss_coef=0.01,
                        pools=POOLS if mode == "masked_pools" else None,
                        modality_bias_init_std=0.5 if mode == "modality_bias" else 0.0)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def run_layer(layer, x, m, upstream):
    x = x.clone().requires_grad_(True)
    out = layer(x, m)
    ((out.hidden_states * upstream).sum() + out.aux_loss).backward()
    return out.hidden_states.detach(), x.grad.detach(), out.routing.stats.dropped.sum().item()


def compare_modes(rank: int) -> dict:
    results = {}
    for mode in ("agnostic", "modality_bias", "masked_pools", "separate_routers"):
        for dropless in (False, True):
            torch.manual_seed(0)
            reference = TorchMoE(router_config(mode, 1, dropless), D, F)
            full_state = reference.state_dict()
            ep1 = DeepSpeedMoE(router_config(mode, 1, dropless), D, F)
            ep2 = DeepSpeedMoE(router_config(mode, 2, dropless), D, F)
            for layer in (ep1, ep2):
                layer.set_deepspeed_parallelism()
            ep1.load_state_dict(full_state)
            local = {}
            for key, value in full_state.items():
                if ".deepspeed_experts." in key:
                    prefix, rest = key.split(".deepspeed_experts.")
                    global_id, name = rest.split(".", 1)
                    if int(global_id) // 2 == rank:
                        local[f"{prefix}.deepspeed_experts.{int(global_id) % 2}.{name}"] = value
                else:
                    local[key] = value
            ep2.load_state_dict(local)
            g = torch.Generator().manual_seed(1000 + rank)
            x = torch.randn(6, 10, D, generator=g) * 2
            m = torch.randint(0, 2, (6, 10), generator=g)
            upstream = torch.randn(6, 10, D, generator=g)
            out_ref, grad_ref, drop_ref = run_layer(reference, x, m, upstream)
            out1, grad1, drop1 = run_layer(ep1, x, m, upstream)
            out2, grad2, drop2 = run_layer(ep2, x, m, upstream)
            results[f"{mode}/{'dropless' if dropless else 'capacity'}"] = {
                "ep2_vs_ep1_out": rel_diff(out2, out1), "ep2_vs_ep1_grad": rel_diff(grad2, grad1),
                "deepspeed_vs_torch_out": rel_diff(out1, out_ref), "deepspeed_vs_torch_grad": rel_diff(grad1, grad_ref),
                "dropped": [drop_ref, drop1, drop2]}
    return results


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


def train_steps(rank: int) -> list[float]:
    torch.manual_seed(0)
    model = TinyMoEModel()
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": 1}, "steps_per_print": 1000}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 30 s JIT build unused here
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    result = {"modes": compare_modes(rank), "losses": train_steps(rank)}
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
