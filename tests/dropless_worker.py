"""Started by tests/test_dropless_ep.py through the `deepspeed` launcher on 2 CPU processes (gloo).

One launch checks `DroplessMoE` (index dispatch, variable all-to-all splits) in many cases:

* layers: for every routing mode and every routing case (balanced; skewed so that rank 1's
  experts receive no rows at all; rank 1 with zero tokens; one k for every token), the layer at
  ep_size 2 against the same layer at ep_size 1, against `TorchMoE` (the dropless torch path)
  and against a naive float64 per-token reference built on `naive_moe`'s routing decisions:
  outputs, input gradients, gate gradients (per rank) and expert gradients (summed over the
  ranks, as DeepSpeed's expert-data-parallel all-reduce does at ep_size 1). With
  TRITON_INTERPRET=1 in the environment the Triton kernels (interpreted) run too.
* engine: a tiny model trained with `deepspeed.initialize` at ep_size 2 with DroplessMoE and with
  DeepSpeed's own dispatch (`DeepSpeedMoE`, dropless) from the same weights: same losses. Its
  checkpoint (one file per expert) is loaded into an ep_size 1 engine: same outputs.

Results go to `<--out>.rank<r>.json`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F_
from ep_worker import MODES, D, E, F, finish_worker, local_state, rel_diff, routing_fields, start_worker
from naive_moe import MODALITIES, naive_moe, per_modality
from torch import nn

from mmoe_ds.moe import RouterConfig, TorchMoE
from mmoe_ds.moe.deepspeed_layer import DeepSpeedMoE
from mmoe_ds.moe.dropless import DroplessMoE
from mmoe_ds.moe.experts import to_per_expert

CASES = ("balanced", "skewed", "empty_rank", "uniform_k")
GATE_KEYS = ("deepspeed_moe.gate.wg.weight", "deepspeed_moe.gate.modality_bias")


def config(mode: str, ep_size: int, case: str, backend: str = "dropless") -> RouterConfig:
    fields = routing_fields(mode, dropless=True)
    if case == "uniform_k":
        fields["top_k"] = 2
    return RouterConfig(**fields, ep_size=ep_size, moe_backend=backend, modality_load_balance_coef=0.1,
                        z_loss_coef=0.01, modality_bias_init_std=0.5 if mode == "modality_bias" else 0.0)


def skew(state: dict) -> dict:
    """Gate rows of experts 0 and 1 (rank 0's) get +0.5 on every input: with inputs around +2 every
    token ranks them first, so rank 1's experts receive no rows (masked pools: text keeps 2, 3)."""
    state = dict(state)
    wg = state["deepspeed_moe.gate.wg.weight"].clone()
    rows = torch.arange(wg.shape[0]) % E < 2
    wg[rows] += 0.5
    state["deepspeed_moe.gate.wg.weight"] = wg
    return state


def tokens(case: str, rank: int):
    """(x [n, D], modality ids [n], upstream gradient [n, D]): unequal counts per rank."""
    n = 0 if case == "empty_rank" and rank == 1 else (30 if rank == 0 else 24)
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(n, D, generator=g) * 2 + (2.0 if case == "skewed" else 0.0)
    return x, torch.randint(0, 2, (n,), generator=g), torch.randn(n, D, generator=g)


def run_layer(layer, x, m, upstream, with_aux: bool = True):
    """(output, input gradient, {parameter name: gradient}) of sum(out · upstream) (+ aux loss)."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x, m)
    loss = (out.hidden_states * upstream).sum()
    (loss + out.aux_loss if with_aux else loss).backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()}
    grads = to_per_expert(grads)  # w13 / w2 gradients per expert and projection, named like DeepSpeed's files
    layer.last_dropped = int(out.routing.stats.dropped.sum())
    return out.hidden_states.detach(), x.grad, grads


def naive_reference(state: dict, x, m, upstream, fields: dict):
    """float64 output and gradients of sum(out · upstream), token by token, over the routes that
    `naive_moe` keeps (its independent routing): softmax over the token's pool, gates renormalised
    over the kept routes when k > 1, SwiGLU experts."""
    kept = naive_moe(state, x, m, **fields).kept
    params = {k: v.double().clone().requires_grad_(True) for k, v in state.items()}
    xs = x.double().clone().requires_grad_(True)
    W, Ex = params["deepspeed_moe.gate.wg.weight"], fields["num_experts"]
    rows = []
    for s, mod in enumerate(m.tolist()):
        logits = (W[mod * Ex:(mod + 1) * Ex] if fields["mode"] == "separate_routers" else W) @ xs[s]
        if fields["mode"] == "modality_bias":
            logits = logits + params["deepspeed_moe.gate.modality_bias"][mod]
        allowed = sorted(fields["pools"][MODALITIES[mod]]) if fields["mode"] == "masked_pools" else list(range(Ex))
        prob = dict(zip(allowed, torch.softmax(logits[allowed], 0)))
        mine = [e for t, e in kept if t == s]
        total = sum(prob[e] for e in mine)
        row = xs.new_zeros(D)
        for e in mine:
            gate = prob[e] if per_modality(fields["top_k"], mod) == 1 else prob[e] / total
            w = {n: params[f"deepspeed_moe.experts.deepspeed_experts.{e}.{n}.weight"] for n in ("w1", "w2", "w3")}
            row = row + gate * (w["w2"] @ (F_.silu(w["w1"] @ xs[s]) * (w["w3"] @ xs[s])))
        rows.append(row)
    out = torch.stack(rows) if rows else xs.new_zeros(0, D)
    if rows:
        (out * upstream.double()).sum().backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
    return out.detach(), xs.grad if xs.grad is not None else torch.zeros_like(xs), grads


def summed(grads: dict) -> dict:
    """Gradients summed over the ranks (DeepSpeed's expert-data-parallel all-reduce at ep_size 1)."""
    out = {}
    for k, v in grads.items():
        v = v.clone()
        dist.all_reduce(v)
        out[k] = v
    return out


def worst(pairs) -> float:
    """Largest relative difference over (actual, expected) pairs; 0 for empty tensors."""
    return max([rel_diff(a.double(), b.double()) for a, b in pairs if b.numel()] + [0.0])


def expert_pairs(local: dict, full: dict, rank: int) -> list:
    """(ep2 local expert gradient, the full model's gradient of the same global expert) pairs."""
    renamed = local_state(full, rank)
    return [(v, renamed[k]) for k, v in local.items() if ".deepspeed_experts." in k]


def gate_pairs(a: dict, b: dict) -> list:
    return [(a[k], b[k]) for k in GATE_KEYS if k in a]


def compare_case(mode: str, case: str, rank: int, fused: bool) -> dict:
    torch.manual_seed(0)
    reference = TorchMoE(config(mode, 1, case), D, F)
    full_state = to_per_expert(reference.state_dict())
    if case == "skewed":
        full_state = skew(full_state)
        reference.load_state_dict(full_state)
    ep1, ep2 = DroplessMoE(config(mode, 1, case), D, F), DroplessMoE(config(mode, 2, case), D, F)
    for layer in (ep1, ep2):
        layer.set_deepspeed_parallelism()
    ep1.load_state_dict(full_state)
    ep2.load_state_dict(local_state(full_state, rank))
    x, m, upstream = tokens(case, rank)
    out_ref, gx_ref, g_ref = run_layer(reference, x, m, upstream)
    out1, gx1, g1 = run_layer(ep1, x, m, upstream)
    out2, gx2, g2 = run_layer(ep2, x, m, upstream)
    g1_sum, gref_sum = summed(g1), summed(g_ref)
    result = {
        "tokens": x.shape[0], "out_shape": list(out2.shape),
        "dropped": ep2.last_dropped,
        "ep2_vs_ep1": {"out": worst([(out2, out1)]), "input_grad": worst([(gx2, gx1)]),
                       "gate_grad": worst(gate_pairs(g2, g1)), "expert_grad": worst(expert_pairs(g2, g1_sum, rank))},
        "ep1_vs_torch": {"out": worst([(out1, out_ref)]), "input_grad": worst([(gx1, gx_ref)]),
                         "grads": worst((g1_sum[k], gref_sum[k]) for k in g1_sum)},
    }
    # Rows each rank's experts received from everybody (skewed: rank 1's experts get none).
    rows = torch.stack([g2[k].abs().sum() for k in g2 if ".deepspeed_experts." in k]).sum()
    result["local_expert_grad_abs_sum"] = float(rows)
    # The naive float64 reference (no aux loss: it has none).
    fields = routing_fields(mode, dropless=True) | ({"top_k": 2} if case == "uniform_k" else {})
    out64, gx64, g64 = naive_reference(full_state, x, m, upstream, fields)
    out2n, gx2n, g2n = run_layer(ep2, x, m, upstream, with_aux=False)
    g64_sum = summed(g64)
    result["ep2_vs_naive64"] = {"out": worst([(out2n, out64)]), "input_grad": worst([(gx2n, gx64)]),
                                "gate_grad": worst(gate_pairs(g2n, g64)),
                                "expert_grad": worst(expert_pairs(g2n, g64_sum, rank))}
    if fused:  # the interpreted Triton kernels inside the same layer
        ep2.fused = True
        out2f, gx2f, g2f = run_layer(ep2, x, m, upstream)
        result["fused_vs_reference"] = {"out": worst([(out2f, out2)]), "input_grad": worst([(gx2f, gx2)]),
                                        "grads": worst((g2f[k], g2[k]) for k in g2)}
    return result


class TinyModel(nn.Module):
    """Regression through one MoE block (the layer class and ep_size chosen by the caller)."""

    def __init__(self, layer_cls, cfg: RouterConfig):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = layer_cls(cfg, D, F)
        self.out = nn.Linear(D, D)

    def forward(self, x, m):
        h = self.moe(torch.relu(self.inp(x)), m)
        return self.out(h.hidden_states), h.aux_loss


def engine_of(model: nn.Module):
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": 1}, "steps_per_print": 1000}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    return engine


def engine_checks(rank: int, out_prefix: str) -> dict:
    """DroplessMoE vs DeepSpeedMoE engines at ep_size 2 (same weights, same data): same losses;
    then the DroplessMoE checkpoint loads into an ep_size 1 engine with the same outputs."""
    cfg = dict(mode="modality_bias", case="balanced")
    torch.manual_seed(0)
    ours = TinyModel(DroplessMoE, config(cfg["mode"], 2, cfg["case"]))
    stock = TinyModel(DeepSpeedMoE, config(cfg["mode"], 2, cfg["case"], backend="deepspeed"))
    stock.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(7 + rank)
    x, m = torch.randn(8, 12, D, generator=g), torch.randint(0, 2, (8, 12), generator=g)
    y = torch.tanh(x @ torch.randn(D, D, generator=g))
    losses = {}
    engines = {}
    for name, model in (("dropless", ours), ("deepspeed", stock)):
        engine = engines[name] = engine_of(model)
        losses[name] = []
        for _ in range(6):
            pred, aux = engine(x, m)
            loss = nn.functional.mse_loss(pred, y)
            engine.backward(loss + aux)
            engine.step()
            losses[name].append(loss.item())
    ckpt = Path(os.path.dirname(out_prefix)) / "ckpt"
    engines["dropless"].save_checkpoint(str(ckpt), tag="t")
    dist.barrier()
    with torch.no_grad():
        before = engines["dropless"](x, m)[0]
    torch.manual_seed(123)  # different initial weights: only the checkpoint can make the outputs equal
    reloaded = engine_of(TinyModel(DroplessMoE, config(cfg["mode"], 1, cfg["case"])))
    reloaded.load_checkpoint(str(ckpt), tag="t", load_optimizer_states=False, load_lr_scheduler_states=False)
    with torch.no_grad():
        after = reloaded(x, m)[0]
    files = sorted(p.name for p in (ckpt / "t").iterdir())
    return {"losses": losses, "loss_diff": max(abs(a - b) / abs(b) for a, b in zip(*losses.values())),
            "reloaded_ep1_vs_ep2_out": rel_diff(after, before), "checkpoint_files": files}


def main() -> None:
    out, rank = start_worker()
    fused = os.environ.get("TRITON_INTERPRET") == "1"
    layers = {f"{mode}/{case}": compare_case(mode, case, rank, fused) for mode in MODES for case in CASES}
    result = {"layers": layers, "fused_checked": fused, "engine": engine_checks(rank, out)}
    assert all(math.isfinite(v) for v in result["engine"]["losses"]["dropless"])
    finish_worker(out, rank, result)


if __name__ == "__main__":
    main()
