"""Auxiliary router losses, as pure functions of one routing call.

All take fp32 router probabilities `probs` [S, E] and the per-token modality ids [S]. Losses
that look at routing decisions use the choices *before* capacity drops (as DeepSpeed does), so
they do not depend on batch order. Per-modality losses are returned per modality too, so their
invariances (token permutation, adding tokens of another modality) can be checked directly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import RouterConfig


def _entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last dim; 0·log 0 = 0, with a finite gradient there.

    `xlogy(p, p)` has the right value but the gradient log(p) + 1 = -inf at p = 0, and the
    softmax backward multiplies it by p = 0: NaN. Clamping inside the log keeps the value
    (p·log(tiny) = 0 at p = 0) and makes the gradient log(tiny), finite.
    """
    return -(p * torch.log(p.clamp(min=torch.finfo(p.dtype).tiny))).sum(-1)


def _sum_by_modality(values: Tensor, modality_ids: Tensor, num_modalities: int) -> Tensor:
    """[S, ...] -> [M, ...]: sums of rows grouped by modality."""
    out = values.new_zeros((num_modalities,) + tuple(values.shape[1:]))
    return out.index_add_(0, modality_ids, values)


def _mean_over_present(per_modality: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """(mean over modalities with tokens, per-modality values with absent modalities at 0)."""
    present = counts > 0
    per_modality = per_modality * present
    return per_modality.sum() / present.sum().clamp(min=1), per_modality


def route_fractions(chosen: Tensor, route_weight: Tensor, num_experts: int) -> Tensor:
    """[S, E] one-hot of the chosen experts, each route weighted (invalid routes have weight 0)."""
    dense = chosen.new_zeros((chosen.shape[0], num_experts), dtype=route_weight.dtype)
    return dense.scatter_add_(1, chosen.clamp(min=0), route_weight)


def load_balance(probs: Tensor, chosen: Tensor, top_k: Tensor) -> Tensor:
    """Switch/GShard balance loss over all tokens, equal to DeepSpeed's gate loss.

    E · Σ_e mean_s(p_se) · f_e, with f_e the fraction of routes to e divided by k. DeepSpeed's
    top-2 gate counts first choices only, so tokens with k = 2 do too (compatibility).
    """
    num_tokens, num_experts = probs.shape
    k_slots = torch.arange(chosen.shape[1], device=chosen.device)
    first_only = (top_k == 2)[:, None] & (k_slots[None] > 0)
    weight = (k_slots[None] < top_k[:, None]) & ~first_only
    per_route = torch.where(top_k[:, None] == 2, 1.0, 1.0 / top_k[:, None].float()) * weight
    f = route_fractions(chosen, per_route, num_experts).sum(0) / num_tokens
    return num_experts * (probs.mean(0) * f).sum()


def modality_load_balance(probs: Tensor, chosen: Tensor, top_k: Tensor, modality_ids: Tensor,
                          pool_sizes: Tensor) -> tuple[Tensor, Tensor]:
    """Balance within each modality's own pool: |P_m| · Σ_e mean_{s∈m}(p_se) · f_me.

    Returns (mean over modalities present, per-modality values [M]). A modality's value only
    depends on that modality's tokens, so adding tokens of another modality leaves it unchanged.
    """
    num_modalities = pool_sizes.shape[0]
    num_experts = probs.shape[1]
    valid = torch.arange(chosen.shape[1], device=chosen.device)[None] < top_k[:, None]
    f_token = route_fractions(chosen, valid / top_k[:, None].float(), num_experts)
    counts = torch.bincount(modality_ids, minlength=num_modalities).float()
    mean_p = _sum_by_modality(probs, modality_ids, num_modalities) / counts.clamp(min=1)[:, None]
    mean_f = _sum_by_modality(f_token, modality_ids, num_modalities) / counts.clamp(min=1)[:, None]
    per_modality = pool_sizes * (mean_p * mean_f).sum(-1)
    return _mean_over_present(per_modality, counts)


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean_s logsumexp(logits_s)²; keeps logits small (masked -inf ignored)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def local_entropy(probs: Tensor, modality_ids: Tensor, num_modalities: int) -> tuple[Tensor, Tensor]:
    """LIMoE local entropy: mean per-token routing entropy, per modality (low = confident)."""
    counts = torch.bincount(modality_ids, minlength=num_modalities).float()
    per_modality = _sum_by_modality(_entropy(probs), modality_ids, num_modalities) / counts.clamp(min=1)
    return _mean_over_present(per_modality, counts)


def global_entropy(probs: Tensor, modality_ids: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """LIMoE thresholded global entropy: relu(τ_m − H(mean_{s∈m} p_s)) per modality.

    Penalises a modality that collapses onto few experts, but only below τ_m nats.
    """
    num_modalities = thresholds.shape[0]
    counts = torch.bincount(modality_ids, minlength=num_modalities).float()
    mean_p = _sum_by_modality(probs, modality_ids, num_modalities) / counts.clamp(min=1)[:, None]
    per_modality = torch.relu(thresholds - _entropy(mean_p))
    return _mean_over_present(per_modality, counts)


def entropy_floor(probs: Tensor, floor: float) -> Tensor:
    """Modality-agnostic: relu(floor − H(mean_s p_s)), the batch's expert usage kept spread out."""
    return torch.relu(floor - _entropy(probs.mean(0)))


def min_utilization(probs: Tensor, fraction: float) -> Tensor:
    """Modality-agnostic: E · Σ_e relu(u/E − mean_s p_se); every expert keeps ≥ u of its fair share."""
    num_experts = probs.shape[1]
    return num_experts * torch.relu(fraction / num_experts - probs.mean(0)).sum()


def routed_fractions(chosen: Tensor, top_k: Tensor, modality_ids: Tensor, num_modalities: int,
                     num_experts: int) -> Tensor:
    """[M, E]: each modality's share of its routes (before capacity) that go to each expert, i.e. the
    trainer's logged `routed_per_expert` counts normalised per modality (rows of absent modalities are 0)."""
    valid = (torch.arange(chosen.shape[1], device=chosen.device)[None] < top_k[:, None]).float()
    routes = _sum_by_modality(route_fractions(chosen, valid, num_experts), modality_ids, num_modalities)
    return routes / routes.sum(-1, keepdim=True).clamp(min=1)


def matched_utilization(probs: Tensor, chosen: Tensor, top_k: Tensor, modality_ids: Tensor,
                        target: Tensor) -> tuple[Tensor, Tensor]:
    """TV(f_m, target_m) per modality, f_m the modality's routed fractions (`routed_fractions`).

    The loss lives in the space the matched experiments measure in: the routes chosen, as the
    trainer logs them, and total variation. Its value is that TV; its gradient is straight-through,
    through the modality's mean router probabilities (f + p̄ − sg(p̄)), since the choices themselves
    have none. The router never sees the modality; only this loss does: it tests whether
    modality-specific routing can be reached by a loss alone.
    """
    num_modalities, num_experts = target.shape
    counts = torch.bincount(modality_ids, minlength=num_modalities).float()
    mean_p = _sum_by_modality(probs, modality_ids, num_modalities) / counts.clamp(min=1)[:, None]
    f = routed_fractions(chosen, top_k, modality_ids, num_modalities, num_experts)
    f = f + mean_p - mean_p.detach()
    tv = 0.5 * (f - target).abs().sum(-1)
    return _mean_over_present(tv, counts)


def router_aux_losses(cfg: RouterConfig, logits: Tensor, probs: Tensor, chosen: Tensor, top_k: Tensor,
                      modality_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """All enabled aux losses: (weighted total, {name: unweighted value}).

    `chosen` [S, K] holds the experts picked before capacity drops; `top_k` [S] each token's k.
    The global load balance is always computed (DeepSpeed reports it as l_aux); the others only
    when their coefficient is non-zero.
    """
    M = cfg.num_modalities
    if probs.shape[0] == 0:  # no tokens on this rank: no loss, but still a graph for backward
        return _no_tokens_losses(cfg, logits)
    terms: dict[str, tuple[float, Tensor]] = {
        "load_balance": (cfg.load_balance_coef, load_balance(probs, chosen, top_k))}
    if cfg.modality_load_balance_coef:
        pool_sizes = probs.new_tensor([len(p) for p in cfg.pool_members])
        value, per = modality_load_balance(probs, chosen, top_k, modality_ids, pool_sizes)
        terms["modality_load_balance"] = (cfg.modality_load_balance_coef, value)
    if cfg.z_loss_coef:
        terms["z_loss"] = (cfg.z_loss_coef, z_loss(logits))
    if cfg.local_entropy_coef:
        terms["local_entropy"] = (cfg.local_entropy_coef, local_entropy(probs, modality_ids, M)[0])
    if cfg.global_entropy_coef:
        tau = [cfg.global_entropy_threshold if cfg.global_entropy_threshold is not None else math.log(len(p))
               for p in cfg.pool_members]
        terms["global_entropy"] = (cfg.global_entropy_coef,
                                   global_entropy(probs, modality_ids, probs.new_tensor(tau))[0])
    if cfg.entropy_floor_coef:
        floor = cfg.entropy_floor if cfg.entropy_floor is not None else 0.9 * math.log(cfg.num_experts)
        terms["entropy_floor"] = (cfg.entropy_floor_coef, entropy_floor(probs, floor))
    if cfg.min_utilization_coef:
        terms["min_utilization"] = (cfg.min_utilization_coef, min_utilization(probs, cfg.min_utilization))
    if cfg.matched_utilization_coef:
        if cfg.matched_targets_per_layer:
            raise ValueError("RouterConfig.matched_utilization_target holds one target per MoE layer: bind each "
                             "router to its layer's (RouterConfig.for_moe_layer, done by mmoe_ds.train) first.")
        target = probs.new_tensor([cfg.matched_utilization_target[m] for m in cfg.modalities])
        terms["matched_utilization"] = (cfg.matched_utilization_coef,
                                        matched_utilization(probs, chosen, top_k, modality_ids, target)[0])
    total = sum(coef * value for coef, value in terms.values())
    return total, {name: value for name, (_, value) in terms.items()}


def _no_tokens_losses(cfg: RouterConfig, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Zero for every enabled loss when a call has no tokens (means over zero tokens are NaN).

    The zeros hang off `logits` (logits.sum() over zero rows is 0), so backward reaches the
    router weights with zero gradient, as it does on ranks that have tokens.
    """
    zero = logits.sum() * 0.0
    names = ["load_balance"] + [name for name in ("modality_load_balance", "z_loss", "local_entropy",
                                                  "global_entropy", "entropy_floor", "min_utilization",
                                                  "matched_utilization") if getattr(cfg, f"{name}_coef")]
    return zero, {name: zero for name in names}
