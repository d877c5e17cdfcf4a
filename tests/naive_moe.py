"""An independent, deliberately naive reference of the routing semantics, for the tests.

Written from the documented rules (README, `RouterConfig`'s docstring), not from the router:
per-token Python loops in float64, pools read from the configuration's `pools` dict, capacity
by DeepSpeed's fp32 formula written out with numpy, the "probs" drop policy as a plain sort.
Slow and obvious on purpose, so a test comparing the real layer with it proves something about
routing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mmoe_ds.moe.experts import to_per_expert

MODALITIES = ("image", "text")


@dataclass
class NaiveResult:
    out: torch.Tensor  # [S, d] float64
    kept: list[tuple[int, int]]  # (token, expert) of every route that reached its expert
    dropped: int  # routes chosen but dropped by capacity
    capacity: list[int]  # per slot group: one shared group, or one per modality


def per_modality(value, m: int):
    return value[MODALITIES[m]] if isinstance(value, dict) else value


def capacity_rule(tokens: int, experts: int, factor: float, min_capacity: int) -> int:
    """DeepSpeed's documented rule: ceil(tokens / experts · factor) in fp32, at least `min_capacity`."""
    return max(math.ceil(float(np.float32(tokens / experts) * np.float32(factor))), min_capacity)


def naive_capacity(counts: list[int], *, num_experts: int, top_k, capacity_factor, min_capacity: int,
                   pools: dict | None) -> list[int]:
    """Slots per expert for each slot group.

    Per-modality factors (a dict) give every modality its own budget over its pool's experts,
    ceil(n_m / |pool_m| · factor_m · k_m), modalities without tokens get 0; one factor gives one
    budget for all routes over all experts, ceil(S / E · factor · routes / S).
    """
    if isinstance(capacity_factor, dict):
        return [capacity_rule(n, len(pools[MODALITIES[m]]) if pools else num_experts,
                              capacity_factor[MODALITIES[m]] * per_modality(top_k, m), min_capacity) if n else 0
                for m, n in enumerate(counts)]
    tokens = sum(counts)
    routes = sum(n * per_modality(top_k, m) for m, n in enumerate(counts))
    k_mean = routes / tokens if tokens else 1
    return [capacity_rule(tokens, num_experts, capacity_factor * k_mean, min_capacity)]


def _ffn(state: dict, e: int, v: torch.Tensor) -> torch.Tensor:
    w = {n: state[f"deepspeed_moe.experts.deepspeed_experts.{e}.{n}.weight"].double() for n in ("w1", "w2", "w3")}
    h = torch.nn.functional.silu(w["w1"] @ v) * (w["w3"] @ v)
    return w["w2"] @ h


def naive_moe(state: dict, x: torch.Tensor, modality_ids: torch.Tensor, *, num_experts: int, mode: str, top_k,
              capacity_factor=1.25, min_capacity: int = 4, drop_tokens: bool = True,
              pools: dict | None = None) -> NaiveResult:
    """The layer's output for tokens x [S, d] ("probs" drop policy, training capacity factor).

    `state` is a `TorchMoE` state dict (3-D w13 / w2, or per-expert names as DeepSpeed's layers
    and files hold them); the other arguments are the `RouterConfig` fields they name.
    """
    state = to_per_expert(state)
    E = num_experts
    xs, ms = x.double(), modality_ids.reshape(-1).tolist()
    W = state["deepspeed_moe.gate.wg.weight"].double()
    routes = []  # (token, rank among its choices, expert, probability)
    for s, m in enumerate(ms):
        if mode == "separate_routers":
            logits = W[m * E:(m + 1) * E] @ xs[s]
        else:
            logits = W @ xs[s]
        if mode == "modality_bias":
            logits = logits + state["deepspeed_moe.gate.modality_bias"].double()[m]
        allowed = sorted(pools[MODALITIES[m]]) if mode == "masked_pools" else list(range(E))
        z = [float(logits[e]) for e in allowed]
        top = max(z)
        weights = [math.exp(v - top) for v in z]
        prob = {e: w / sum(weights) for e, w in zip(allowed, weights)}
        ranked = sorted(allowed, key=lambda e: -float(logits[e]))[:per_modality(top_k, m)]
        routes += [(s, rank, e, prob[e]) for rank, e in enumerate(ranked)]

    counts = [ms.count(i) for i in range(len(MODALITIES))]
    by_modality = isinstance(capacity_factor, dict)
    if drop_tokens:
        capacity = naive_capacity(counts, num_experts=E, top_k=top_k, capacity_factor=capacity_factor,
                                  min_capacity=min_capacity, pools=pools if mode == "masked_pools" else None)
    else:
        capacity = [len(routes)] * (len(MODALITIES) if by_modality else 1)
    kept_routes = []
    for e in range(E):
        for g in range(len(capacity)):
            mine = [r for r in routes if r[2] == e and (not by_modality or ms[r[0]] == g)]
            mine.sort(key=lambda r: (-r[3], r[0], r[1]))  # most probable first, then token order
            kept_routes += mine[:capacity[g]]

    out = torch.zeros_like(xs)
    for s, m in enumerate(ms):
        mine = [r for r in kept_routes if r[0] == s]
        total = sum(r[3] for r in mine)
        for _, _, e, p in mine:
            gate = p if per_modality(top_k, m) == 1 else (p / total if total > 0 else 0.0)
            out[s] += gate * _ffn(state, e, xs[s])
    return NaiveResult(out, sorted((r[0], r[2]) for r in kept_routes), len(routes) - len(kept_routes), capacity)
