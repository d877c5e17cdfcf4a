"""Representation similarity of experts: linear CKA (debiased and plain), weight CKA, and the
matching of experts between two runs.

Linear CKA compares two representations X [n, p] and Y [n, q] of the same n samples:
CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X Xᵀ, L = Y Yᵀ. It is invariant to
orthogonal transforms and isotropic scaling of either side, and X and Y may live in different
spaces (p ≠ q), which is what lets experts of two independently trained runs be compared.

`debiased=True` (default) uses the unbiased HSIC estimator of Song et al. (2012), as in Nguyen et
al. (2021): independent random features then give CKA ≈ 0 instead of a large positive value when
n is not much larger than the feature count. Everything is computed in feature space in
O(n·(p² + q²) + n·p·q): no n×n Gram matrix is formed, so tens of thousands of tokens are cheap.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
import torch


def _features(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().double().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: a [samples, features] matrix is needed, got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf.")
    return a


def _tensor(x, name: str, device) -> torch.Tensor:
    """[n, p] float64 on `device` (default: x's own device for a tensor, else the CPU)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device or x.device, torch.float64)
    else:
        t = torch.as_tensor(np.asarray(x, dtype=np.float64), device=device)
    if t.ndim != 2:
        raise ValueError(f"{name}: a [samples, features] matrix is needed, got shape {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or inf.")
    return t


class _Prepared(NamedTuple):
    """One representation, centred, with the per-sample terms of the HSIC precomputed: in feature
    space (x, diag, row, total) or, when samples are fewer than features, as its centred Gram matrix."""
    x: torch.Tensor | None    # [n, p] features centred over samples (feature mode)
    diag: torch.Tensor | None  # [n] K_ii = |x_i|²
    row: torch.Tensor | None  # [n] (K~ 1)_i: row sums of K with the diagonal removed
    total: float              # 1ᵀ K~ 1
    gram: torch.Tensor | None  # [n, n] U-centred (debiased) or double-centred (plain) Gram matrix (Gram mode)
    self_hsic: float          # HSIC(K, K)


def _centred_gram(x: torch.Tensor, debiased: bool) -> torch.Tensor:
    """Plain: H K H. Debiased: the U-centred K (Székely & Rizzo 2014), whose inner products divided
    by n(n-3) are the unbiased HSIC estimator of Song et al.:
    U_ij = K_ij - r_i/(n-2) - r_j/(n-2) + t/((n-1)(n-2)) off the diagonal, 0 on it (r: row sums of
    K with a zero diagonal, t: their total)."""
    k = x @ x.T
    n = k.shape[0]
    if not debiased:
        k = k - k.mean(0, keepdim=True)
        return k - k.mean(1, keepdim=True)
    k.fill_diagonal_(0.0)
    r = k.sum(1)
    u = k - r[:, None] / (n - 2) - r[None, :] / (n - 2) + r.sum() / ((n - 1) * (n - 2))
    return u.fill_diagonal_(0.0)


def _prepare(x: torch.Tensor, debiased: bool, gram: bool = False) -> _Prepared:
    x = x - x.mean(0)  # the plain estimator needs it; the debiased one is unchanged by it and better conditioned
    if gram:
        p = _Prepared(None, None, None, 0.0, _centred_gram(x, debiased), 0.0)
    else:
        diag = x.pow(2).sum(1)
        row = x @ x.sum(0) - diag
        p = _Prepared(x, diag, row, float(row.sum()), None, 0.0)
    return p._replace(self_hsic=_hsic(p, p, debiased))


def _hsic(a: _Prepared, b: _Prepared, debiased: bool) -> float:
    """HSIC of the linear kernels of two prepared representations (unnormalised: CKA cancels constants)."""
    if a.gram is not None:
        n = a.gram.shape[0]
        inner = float((a.gram * b.gram).sum())
        return inner / (n * (n - 3)) if debiased else inner
    cross = float((a.x.T @ b.x).pow(2).sum())  # tr(K L) = |Xᵀ Y|_F² for centred features
    if not debiased:
        return cross
    # Unbiased estimator with K~ = K - diag(K) (zero diagonal):
    # HSIC_1 = [tr(K~L~) + (1ᵀK~1)(1ᵀL~1) / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK~L~1] / (n(n-3))
    n = a.x.shape[0]
    trace = cross - float(a.diag @ b.diag)  # Σ_{i≠j} K_ij L_ij
    return (trace + a.total * b.total / ((n - 1) * (n - 2)) - 2.0 * float(a.row @ b.row) / (n - 2)) / (n * (n - 3))


def _cka(a: _Prepared, b: _Prepared, debiased: bool) -> float:
    if a.self_hsic <= 0 or b.self_hsic <= 0:
        return float("nan")
    return float(_hsic(a, b, debiased) / np.sqrt(a.self_hsic * b.self_hsic))


def _check_samples(n: int, debiased: bool) -> None:
    if n < (4 if debiased else 2):
        raise ValueError(f"x: at least {4 if debiased else 2} samples are needed, got {n}.")


def linear_cka(x, y, debiased: bool = True, device=None) -> float:
    """Linear CKA between two representations of the same samples.

    Args:
        x: [n, p] features (numpy or torch).
        y: [n, q] features of the same n samples, in the same order.
        debiased: use the unbiased HSIC estimator (needs n >= 4).
        device: where to compute (default: x's device for a tensor, else the CPU); float64 throughout.
    Returns:
        CKA in [0, 1] for the plain estimator; the debiased one can dip slightly below 0 for
        unrelated features. NaN when either side has no variance (a constant representation).
    """
    tx = _tensor(x, "x", device)
    ty = _tensor(y, "y", tx.device)
    if tx.shape[0] != ty.shape[0]:
        raise ValueError(f"x and y: the same samples are needed, got {tx.shape[0]} and {ty.shape[0]} rows.")
    _check_samples(tx.shape[0], debiased)
    return _cka(_prepare(tx, debiased), _prepare(ty, debiased), debiased)


def _pairwise(prep_a: list[_Prepared], prep_b: list[_Prepared] | None, debiased: bool) -> np.ndarray:
    same = prep_b is None
    prep_b = prep_a if same else prep_b
    out = np.full((len(prep_a), len(prep_b)), np.nan)
    for i, a in enumerate(prep_a):
        for j, b in enumerate(prep_b):
            out[i, j] = out[j, i] if same and j < i else _cka(a, b, debiased)
    return out


def cka_matrix(features: list, others: list | None = None, debiased: bool = True, device=None,
               gram: bool | None = None) -> np.ndarray:
    """Pairwise CKA: [A, B] with entry (a, b) = CKA(features[a], others[b]).

    Each representation is centred and its self-similarity computed once, so the cost is one
    [p, q] product per pair in feature space, or one n×n inner product per pair in Gram mode.

    Args:
        features: A representations of the same samples (e.g. each expert's outputs on the probe tokens).
        others: B more (default: `features` itself, giving a symmetric matrix with 1 on the diagonal).
        debiased: as in `linear_cka`.
        device: where to compute (see `linear_cka`).
        gram: work with n×n Gram matrices (cheaper when samples are fewer than features, e.g. weights);
            default: when n is at most the largest feature count. Both give the same values.
    """
    every = list(features) + list(others or [])
    shapes = [tuple(np.shape(f)) for f in every]
    if any(len(sh) != 2 for sh in shapes):
        raise ValueError(f"features: [samples, features] matrices are needed, got shapes {sorted(set(shapes))}.")
    n = {sh[0] for sh in shapes}
    if len(n) > 1:
        raise ValueError(f"features: the same samples are needed in every representation, got {sorted(n)} rows.")
    n_samples = n.pop() if n else 4
    _check_samples(n_samples, debiased)
    if gram is None:
        gram = n_samples <= max((sh[1] for sh in shapes), default=0)
    if device is None and every and isinstance(every[0], torch.Tensor):
        device = every[0].device  # one device for every representation

    def prepare(items, name):  # one at a time: a float64 copy lives only until its Gram matrix exists
        return [_prepare(_tensor(f, f"{name}[{i}]", device), debiased, gram) for i, f in enumerate(items)]

    return _pairwise(prepare(features, "features"), None if others is None else prepare(others, "others"), debiased)


def expert_weight_features(w1, w3, w2) -> torch.Tensor:
    """One expert's SwiGLU weights as a representation of the model's hidden dimensions.

    Experts of one layer read from and write to the same hidden space, so hidden dimensions are
    the samples ([d] rows) and the expert's neurons are features: [d, 3f] = [w1ᵀ | w3ᵀ | w2] with
    w1, w3 [f, d] and w2 [d, f]. CKA over it ignores how the neurons are ordered.
    """
    w1, w3, w2 = (torch.as_tensor(w).detach() for w in (w1, w3, w2))
    return torch.cat([w1.T, w3.T, w2], dim=1)


def weight_cka(experts, debiased: bool = True) -> np.ndarray:
    """[E, E] CKA between the experts' weights (see `expert_weight_features`), in Gram mode on the
    weights' device (d×d per expert, one expert's float64 copy at a time).

    Args:
        experts: a `LocalExperts` (its 3-D w13 / w2, read per expert through `expert(e)`), or a
            sequence of experts, each a {"w1", "w3", "w2"} mapping of tensors (`expert_slices`) or a
            module with `w1`, `w3`, `w2` linear layers (`ExpertFFN`).
    """
    if hasattr(experts, "expert") and hasattr(experts, "num_local_experts"):
        experts = [experts.expert(e) for e in range(experts.num_local_experts)]
    with torch.no_grad():
        prep = [_prepare(_tensor(expert_weight_features(*_expert_weights(e)), f"experts[{i}]", None), debiased,
                         gram=True) for i, e in enumerate(experts)]
    if prep:
        _check_samples(prep[0].gram.shape[0], debiased)
    return _pairwise(prep, None, debiased)


def _expert_weights(expert) -> tuple:
    """(w1, w3, w2) of one expert given as a mapping of tensors or a module of linear layers."""
    if isinstance(expert, dict):
        return expert["w1"], expert["w3"], expert["w2"]
    return expert.w1.weight, expert.w3.weight, expert.w2.weight


class ExpertMatching(NamedTuple):
    """Result of `match_experts`: expert a of run A is matched to expert `partner[a]` of run B."""
    partner: list[int]
    similarity: list[float]  # similarity[a] = S[a, partner[a]]
    mean_similarity: float


def _assignment(similarity: np.ndarray) -> list[int]:
    n = similarity.shape[0]
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        if n > 8:
            raise ValueError(f"matching {n} experts needs scipy (pip install scipy); without it up to 8 are "
                             "matched exactly by enumeration.") from None
        best = max(itertools.permutations(range(n)), key=lambda p: sum(similarity[i, p[i]] for i in range(n)))
        return list(best)
    rows, cols = linear_sum_assignment(-similarity)
    partner = [0] * n
    for r, c in zip(rows, cols):
        partner[int(r)] = int(c)
    return partner


def match_experts(similarity) -> ExpertMatching:
    """Hungarian matching of the experts of two runs: the one-to-one pairing maximising total similarity.

    Args:
        similarity: [E, E] similarity (e.g. cross-run CKA), rows run A's experts, columns run B's.
            NaN entries count as the lowest similarity.
    Returns:
        ExpertMatching(partner, similarity of each matched pair, their mean).
    """
    s = _features(np.nan_to_num(np.asarray(similarity, dtype=np.float64), nan=-1.0), "similarity")
    if s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"similarity: a square [E, E] matrix is needed, got shape {s.shape}.")
    partner = _assignment(s)
    values = [float(np.asarray(similarity, dtype=np.float64)[a, b]) for a, b in enumerate(partner)]
    return ExpertMatching(partner, values, float(np.nanmean(values)) if not all(np.isnan(values)) else float("nan"))
