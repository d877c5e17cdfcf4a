"""Routing metrics that need more than a contingency table: soft MI from router probabilities, the
share of expert compute each modality gets, the aware router's logit split, and per-modality
summaries (utilization, effective experts, Gini, drop rate, confidence).

Arrays follow the router's conventions (`mmoe_ds.moe.router`): per token t a modality id m_t,
router probabilities [S, E], the chosen experts [S, K] (best first, before capacity), `valid`
[S, K] (False beyond the token's own k) and `kept` [S, K] (the route got a slot of its expert).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import effective_experts, gini


def _np(x, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def soft_mutual_information_bits(probs_SE, modality_ids, num_modalities: int | None = None) -> float:
    """I(M;E) in bits from mean router probabilities instead of hard choices.

    p(e | m) = mean of the router's probability vector over the tokens of modality m, p(m) = the
    modalities' token shares, p(e) = Σ_m p(m) p(e | m); I = Σ_m p(m) Σ_e p(e|m) log2(p(e|m) / p(e)).
    Unlike the hard estimate it sees how far the router leans, not only where it lands.

    Args:
        probs_SE: [S, E] router probabilities (rows sum to 1).
        modality_ids: [S] integer modality of each token.
        num_modalities: M (default: the largest id + 1).
    Returns:
        The soft mutual information in bits (0 when every modality has the same mean probabilities).
    """
    p = _np(probs_SE)
    m = _np(modality_ids, np.int64).ravel()
    if p.ndim != 2 or p.shape[0] != m.size or m.size == 0:
        raise ValueError(f"probs_SE and modality_ids: [S, E] and [S] with S > 0 needed, got {p.shape} and {m.shape}.")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError("probs_SE: each row must be a probability vector (softmax output).")
    M = int(m.max()) + 1 if num_modalities is None else num_modalities
    counts = np.bincount(m, minlength=M).astype(np.float64)
    sums = np.zeros((M, p.shape[1]))
    np.add.at(sums, m, p)
    present = counts > 0
    p_m = counts[present] / counts.sum()
    p_e_m = sums[present] / counts[present, None]
    p_e = p_m @ p_e_m
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_e_m > 0, p_e_m * np.log2(p_e_m / p_e[None]), 0.0)
    return float(max((p_m[:, None] * terms).sum(), 0.0))


def expert_ffn_flops(hidden_size: int, intermediate_size: int) -> int:
    """FLOPs of one token through one SwiGLU expert: three d×f GEMMs, 2 FLOPs per multiply-add."""
    return 2 * 3 * hidden_size * intermediate_size


@dataclass
class ComputeShare:
    """Result of `compute_share`: expert FLOPs actually spent, per modality."""
    flops: list[float]       # [M] kept routes × expert FLOPs
    share: list[float]       # [M] flops / total (0 when nothing was computed)
    token_share: list[float]  # [M] the modalities' share of tokens, to compare with `share`


def compute_share(kept_ME, tokens_M, flops_per_route: float) -> ComputeShare:
    """Share of the expert compute each modality received: only routes that reached their expert
    cost FLOPs (dropped routes cost none), and a token with top-k counts each of its k routes.

    Args:
        kept_ME: [M, E] routes that reached their expert.
        tokens_M: [M] tokens of each modality.
        flops_per_route: FLOPs of one token through one expert (`expert_ffn_flops`; all experts of a
            layer have the same size).
    Returns:
        ComputeShare(flops, share, token_share).
    """
    kept = _np(kept_ME)
    tokens = _np(tokens_M).ravel()
    if kept.ndim != 2 or kept.shape[0] != tokens.size or (kept < 0).any() or (tokens < 0).any():
        raise ValueError(f"kept_ME [M, E] and tokens_M [M]: non-negative, matching M needed, got {kept.shape} and "
                         f"{tokens.shape}.")
    flops = kept.sum(1) * float(flops_per_route)
    total, n_tokens = flops.sum(), tokens.sum()
    share = flops / total if total > 0 else np.zeros_like(flops)
    token_share = tokens / n_tokens if n_tokens > 0 else np.zeros_like(tokens)
    return ComputeShare(flops.tolist(), share.tolist(), token_share.tolist())


@dataclass
class LogitSplit:
    """Result of `logit_variance_split`."""
    modality_share: float  # S_bias / (S_wx + S_bias)
    wx: float              # S_wx: mean over tokens of the variance across experts of W·x
    bias: float            # S_bias: the same for E[m]
    cross: float           # 2 · mean covariance across experts of the two (how much they reinforce, + , or cancel, -)


def logit_variance_split(wx_SE, bias_SE) -> LogitSplit:
    """How much of the aware router's decision comes from the modality bias E[m] versus W·x.

    The softmax only sees differences between a token's logits, so each component is centred
    across experts per token; its size is the variance across experts, averaged over tokens:
    S_c = mean_t mean_e (c_te - mean_e c_t)². The modality share is S_bias / (S_wx + S_bias).

    Args:
        wx_SE: [S, E] the W·x part of each token's logits.
        bias_SE: [S, E] the E[m_t] part (the bias row of each token's modality).
    Returns:
        LogitSplit(modality_share, wx, bias, cross); modality_share is NaN when both parts are constant.
    """
    a, b = _np(wx_SE), _np(bias_SE)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"wx_SE and bias_SE: the same [S, E] shape with S > 0 needed, got {a.shape} and {b.shape}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("wx_SE and bias_SE: finite logits needed (masked pools have -inf; this split is for the "
                         "modality_bias router).")
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    s_a, s_b = float(np.square(a).mean()), float(np.square(b).mean())
    cross = float(2 * (a * b).mean())
    share = s_b / (s_a + s_b) if s_a + s_b > 0 else float("nan")
    return LogitSplit(share, s_a, s_b, cross)


def router_logit_split(gate, x, modality_ids) -> LogitSplit | None:
    """`logit_variance_split` of an aware router (`ModalityRouter` in mode "modality_bias") on inputs x.

    Args:
        gate: the router (its `wg` weight is W, its `modality_bias` rows are E[m]).
        x: [S, d] router inputs.
        modality_ids: [S] modality of each token.
    Returns:
        LogitSplit, or None for a router of another mode (it has no E[m]).
    """
    import torch

    if gate.cfg.mode != "modality_bias":
        return None
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        wx = x @ gate.wg.weight.detach().float().cpu().t()
        bias = gate.modality_bias.detach().float().cpu()[torch.as_tensor(_np(modality_ids, np.int64))]
    return logit_variance_split(wx.numpy(), bias.numpy())


@dataclass
class ModalityRouting:
    """Per-modality summary of one layer's routing on the probe set."""
    tokens: int
    utilization: list[float]    # p(e | m) over the modality's routes chosen by the router (before capacity)
    effective_experts: float    # exp(H(E | m)) of the utilization
    gini: float                 # of the utilization
    drop_rate: float            # routes dropped by capacity / routes chosen
    mean_top1_prob: float       # mean over tokens of the router's largest probability
    routed: list[int]           # [E] routes chosen
    kept: list[int]             # [E] routes that reached their expert


def modality_routing(modality_ids, probs_SE, chosen_SK, valid_SK, kept_SK, num_modalities: int,
                     num_experts: int) -> list[ModalityRouting | None]:
    """Per-modality summaries of one layer (None for a modality without tokens).

    Args:
        modality_ids: [S] modality of each token.
        probs_SE: [S, E] router probabilities.
        chosen_SK: [S, K] chosen experts before capacity.
        valid_SK: [S, K] route within the token's own k.
        kept_SK: [S, K] route reached its expert.
        num_modalities, num_experts: M and E.
    """
    m = _np(modality_ids, np.int64).ravel()
    probs = _np(probs_SE)
    chosen = _np(chosen_SK, np.int64)
    valid, kept = _np(valid_SK, bool), _np(kept_SK, bool)
    if not (probs.shape[0] == chosen.shape[0] == valid.shape[0] == kept.shape[0] == m.size):
        raise ValueError("modality_ids, probs_SE, chosen_SK, valid_SK, kept_SK: one row per token needed.")
    if (kept & ~valid).any():
        raise ValueError("kept_SK: a route beyond the token's k (valid_SK False) cannot be kept.")
    out: list[ModalityRouting | None] = []
    for mod in range(num_modalities):
        rows = m == mod
        n = int(rows.sum())
        if n == 0:
            out.append(None)
            continue
        c = chosen[rows]
        routed = np.bincount(c[valid[rows]], minlength=num_experts)[:num_experts]
        kept_counts = np.bincount(c[kept[rows]], minlength=num_experts)[:num_experts]
        total = routed.sum()
        util = routed / total if total > 0 else np.full(num_experts, 1.0 / num_experts)
        out.append(ModalityRouting(
            tokens=n, utilization=util.tolist(),
            effective_experts=effective_experts(util) if total > 0 else float("nan"),
            gini=gini(util) if total > 0 else float("nan"),
            drop_rate=float(1.0 - kept_counts.sum() / total) if total > 0 else 0.0,
            mean_top1_prob=float(probs[rows].max(1).mean()),
            routed=[int(v) for v in routed], kept=[int(v) for v in kept_counts]))
    return out


def route_arrays(modality_ids, chosen_SK, valid_SK) -> tuple[np.ndarray, np.ndarray]:
    """(modality of each route, expert of each route) over the valid routes: the input of
    `permutation_null_mi` (a token with top-k gives k routes)."""
    m = _np(modality_ids, np.int64).ravel()
    chosen, valid = _np(chosen_SK, np.int64), _np(valid_SK, bool)
    rows = np.broadcast_to(m[:, None], chosen.shape)
    return rows[valid], chosen[valid]
