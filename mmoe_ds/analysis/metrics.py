"""Pure routing metrics over counts and probabilities (numpy; torch tensors are accepted too).

Conventions: a contingency table `counts_ME` has one row per modality M and one column per expert E
(how many routes of modality m went to expert e). Information is in bits, `0·log 0 = 0`.
Bad input (negative counts, empty tables, vectors that are not distributions) raises a one-line
ValueError naming the argument.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30 (standard tables, 4 decimals).
# Above 30 the Cornish-Fisher expansion around the normal quantile is used (error < 1e-4 there).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959963984540054


class PermutationTest(NamedTuple):
    """Result of `permutation_null_mi` (also unpacks as `observed, null, p_value`)."""
    observed: float      # plug-in I(M;E) in bits of the real assignment
    null: np.ndarray     # [n_perm] plug-in I(M;E) with modality labels shuffled
    p_value: float       # (1 + #{null >= observed}) / (n_perm + 1)


class MeanCI(NamedTuple):
    """Result of `mean_ci95` (also unpacks as `mean, half_width, n`)."""
    mean: float
    half_width: float    # the 95% interval is mean ± half_width
    n: int


def _as_array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ValueError(f"{name}: empty; give at least one value.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf; clean the input first.")
    return a


def _counts(counts_ME) -> np.ndarray:
    c = _as_array(counts_ME, "counts_ME")
    if c.ndim != 2:
        raise ValueError(f"counts_ME: a [modalities, experts] table is needed, got shape {c.shape}.")
    if (c < 0).any():
        raise ValueError("counts_ME: counts must be >= 0.")
    if c.sum() <= 0:
        raise ValueError("counts_ME: all counts are zero; no routes to measure.")
    return c


def _distribution(p, name: str) -> np.ndarray:
    a = _as_array(p, name)
    if a.ndim != 1:
        raise ValueError(f"{name}: a 1-D probability vector is needed, got shape {a.shape}.")
    if (a < 0).any() or abs(a.sum() - 1.0) > 1e-6:
        raise ValueError(f"{name}: must be non-negative and sum to 1 (sums to {a.sum():.6g}); normalise counts first.")
    return a


def entropy_bits(p) -> float:
    """Shannon entropy of a distribution.

    Args:
        p: 1-D probabilities summing to 1.
    Returns:
        H(p) in bits (0·log 0 = 0).
    """
    p = _distribution(p, "p")
    nz = p[p > 0]
    return float(-(nz * np.log2(nz)).sum())


def _plugin_entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def mutual_information_bits(counts_ME, miller_madow: bool = False) -> float:
    """I(M;E) of a modality x expert contingency table.

    Args:
        counts_ME: [M, E] non-negative route counts (rows: modalities, columns: experts).
        miller_madow: apply the Miller-Madow bias correction. Each entropy gets (K - 1) / (2N ln 2) bits added,
            K its number of non-empty cells, so I_MM = I_plugin - (K_ME - K_M - K_E + 1) / (2N ln 2): the plug-in
            estimate overstates I by about that much. The corrected value may be slightly negative for
            independent data; it is not clipped, so averages over seeds stay unbiased.
    Returns:
        Mutual information in bits.
    """
    c = _counts(counts_ME)
    n = c.sum()
    h_m, h_e, h_me = _plugin_entropy_bits(c.sum(1)), _plugin_entropy_bits(c.sum(0)), _plugin_entropy_bits(c)
    mi = max(h_m + h_e - h_me, 0.0)  # the plug-in I is >= 0; this clears float round-off
    if miller_madow:
        k_me, k_m, k_e = int((c > 0).sum()), int((c.sum(1) > 0).sum()), int((c.sum(0) > 0).sum())
        mi -= (k_me - k_m - k_e + 1) / (2 * n * math.log(2))
    return float(mi)


def nmi(counts_ME, miller_madow: bool = False) -> float:
    """Normalised mutual information I(M;E) / H(M): the share of the modality's uncertainty the expert choice removes.

    Args:
        counts_ME: [M, E] non-negative route counts.
        miller_madow: correct I(M;E) as in `mutual_information_bits` (H(M) stays plug-in).
    Returns:
        NMI in [0, 1] for the plug-in estimate (1: experts partition the modalities).
    """
    c = _counts(counts_ME)
    h_m = _plugin_entropy_bits(c.sum(1))
    if h_m <= 0:
        raise ValueError("counts_ME: only one modality has routes, so H(M) = 0 and NMI is undefined; "
                         "measure on a probe set holding every modality.")
    return mutual_information_bits(c, miller_madow) / h_m


def total_variation(p, q) -> float:
    """Total variation distance between two distributions over the same experts.

    Args:
        p, q: 1-D probabilities of equal length, each summing to 1 (e.g. p(e | image), p(e | text)).
    Returns:
        TV = 1/2 · sum |p - q|, in [0, 1].
    """
    p, q = _distribution(p, "p"), _distribution(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q: same number of experts needed, got {p.shape[0]} and {q.shape[0]}.")
    return float(0.5 * np.abs(p - q).sum())


def effective_experts(p) -> float:
    """Effective number of experts in use: the perplexity of the routing distribution.

    Args:
        p: 1-D probabilities over experts (e.g. p(e | m)).
    Returns:
        exp(H(p)) with H in nats: 1 for one-hot, E for uniform over E experts.
    """
    return float(2.0 ** entropy_bits(p))


def gini(p) -> float:
    """Gini coefficient of expert load (inequality of use).

    Args:
        p: 1-D non-negative loads or probabilities over n experts (not all zero).
    Returns:
        sum_ij |p_i - p_j| / (2 n sum p): 0 for uniform load, (n - 1) / n for all load on one expert.
    """
    a = _as_array(p, "p")
    if a.ndim != 1 or (a < 0).any() or a.sum() <= 0:
        raise ValueError("p: a 1-D non-negative load vector with a positive total is needed.")
    return float(np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size * a.sum()))


def _contingency(modality_ids: np.ndarray, expert_ids: np.ndarray, m: int, e: int) -> np.ndarray:
    return np.bincount(modality_ids * e + expert_ids, minlength=m * e).reshape(m, e).astype(np.float64)


def permutation_null_mi(modality_ids, expert_ids, n_perm: int = 1000, seed: int = 0) -> PermutationTest:
    """Is I(M;E) above chance? Shuffle the modality labels n_perm times and compare.

    Args:
        modality_ids: [N] integer modality of each route.
        expert_ids: [N] integer expert of each route (same length).
        n_perm: number of label shuffles (>= 1).
        seed: seed of the shuffles (the result is deterministic given it).
    Returns:
        PermutationTest(observed, null, p_value) with plug-in MI in bits and the add-one p-value
        (1 + #{null >= observed}) / (n_perm + 1), which is never 0.
    """
    m_ids = np.asarray(modality_ids.detach().cpu() if hasattr(modality_ids, "detach") else modality_ids).ravel()
    e_ids = np.asarray(expert_ids.detach().cpu() if hasattr(expert_ids, "detach") else expert_ids).ravel()
    if m_ids.shape != e_ids.shape or m_ids.size == 0:
        raise ValueError(f"modality_ids and expert_ids: equal, non-zero lengths needed, "
                         f"got {m_ids.size} and {e_ids.size}.")
    if not (np.issubdtype(m_ids.dtype, np.integer) and np.issubdtype(e_ids.dtype, np.integer)) \
            or m_ids.min() < 0 or e_ids.min() < 0:
        raise ValueError("modality_ids and expert_ids: non-negative integer ids needed.")
    if n_perm < 1:
        raise ValueError(f"n_perm: at least 1 shuffle needed, got {n_perm}.")
    m, e = int(m_ids.max()) + 1, int(e_ids.max()) + 1
    m_ids, e_ids = m_ids.astype(np.int64), e_ids.astype(np.int64)
    observed = mutual_information_bits(_contingency(m_ids, e_ids, m, e))
    rng = np.random.default_rng(seed)
    null = np.array([mutual_information_bits(_contingency(rng.permutation(m_ids), e_ids, m, e))
                     for _ in range(n_perm)])
    p_value = (1 + int((null >= observed - 1e-12).sum())) / (n_perm + 1)
    return PermutationTest(observed, null, p_value)


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the two-sided 95% Student t quantile (no scipy needed).

    Args:
        df: degrees of freedom (>= 1).
    Returns:
        The table value for df <= 30, else the Cornish-Fisher expansion z + (z³+z)/(4df) + (5z⁵+16z³+3z)/(96df²).
    """
    if df < 1:
        raise ValueError(f"df: at least 1 degree of freedom needed, got {df}.")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci95(values: Sequence[float]) -> MeanCI:
    """Mean over seeds with a 95% Student t confidence interval.

    Args:
        values: one number per seed (at least 2).
    Returns:
        MeanCI(mean, half_width, n) with half_width = t(0.975, n-1) · s / sqrt(n), s the sample (n-1) std.
    """
    a = _as_array(values, "values").ravel()
    if a.size < 2:
        raise ValueError(f"values: a confidence interval needs at least 2 seeds, got {a.size}.")
    n = int(a.size)
    return MeanCI(float(a.mean()), float(t_quantile_975(n - 1) * a.std(ddof=1) / math.sqrt(n)), n)
