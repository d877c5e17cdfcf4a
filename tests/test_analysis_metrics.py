"""Routing metrics against hand-computed values (every expectation below is worked out in its comment)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmoe_ds.analysis import (
    effective_experts,
    entropy_bits,
    gini,
    mean_ci95,
    mutual_information_bits,
    nmi,
    permutation_null_mi,
    t_quantile_975,
    total_variation,
)

LN2 = math.log(2)


def test_experts_partition_modalities_gives_h_m():
    # Each modality on its own expert: I = H(M) = 1 bit for a 50/50 split, NMI = 1.
    assert mutual_information_bits([[10, 0], [0, 10]]) == pytest.approx(1.0, abs=1e-12)
    assert nmi([[10, 0], [0, 10]]) == pytest.approx(1.0, abs=1e-12)
    # 10 vs 30 routes: I = H(M) = H_b(1/4) = -(1/4)log2(1/4) - (3/4)log2(3/4) = 0.5 + 0.3112781245 = 0.8112781245.
    assert mutual_information_bits([[10, 0, 0], [0, 30, 0]]) == pytest.approx(0.8112781245, abs=1e-9)
    assert nmi([[10, 0, 0], [0, 30, 0]]) == pytest.approx(1.0, abs=1e-12)


def test_independent_counts_give_zero():
    # p(m, e) = p(m) p(e) exactly: rows are proportional (1:2 in both).
    assert mutual_information_bits([[10, 20], [30, 60]]) == pytest.approx(0.0, abs=1e-12)
    assert nmi([[10, 20], [30, 60]]) == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_2x2():
    # [[3,1],[1,3]], N = 8: p(m) = p(e) = (1/2, 1/2); p(m,e) = 3/8 on the diagonal, 1/8 off it.
    # I = 2·(3/8)·log2((3/8)/(1/4)) + 2·(1/8)·log2((1/8)/(1/4)) = (3/4)·log2(1.5) - 1/4
    #   = 0.75 · 0.5849625007 - 0.25 = 0.1887218755 bits; H(M) = 1 so NMI is the same number.
    assert mutual_information_bits([[3, 1], [1, 3]]) == pytest.approx(0.1887218755, abs=1e-9)
    assert nmi([[3, 1], [1, 3]]) == pytest.approx(0.1887218755, abs=1e-9)
    # Torch tensors are accepted and give the same number.
    assert mutual_information_bits(torch.tensor([[3, 1], [1, 3]])) == pytest.approx(0.1887218755, abs=1e-9)


def test_miller_madow_term():
    # Corrected = plug-in - (K_ME - K_M - K_E + 1) / (2 N ln 2).
    # [[3,1],[1,3]]: K_ME = 4, K_M = K_E = 2 -> term 1/(2·8·ln 2) = 1/(16 ln 2) = 0.0901684.
    assert mutual_information_bits([[3, 1], [1, 3]], miller_madow=True) == pytest.approx(
        0.1887218755 - 1 / (16 * LN2), abs=1e-9)
    assert 0.1887218755 - 1 / (16 * LN2) == pytest.approx(0.0985535, abs=1e-6)
    # [[10,0],[0,10]]: K_ME = 2, K_M = K_E = 2 -> term (2-2-2+1)/(2·20·ln 2) = -1/(40 ln 2): I = 1 + 0.0360674.
    assert mutual_information_bits([[10, 0], [0, 10]], miller_madow=True) == pytest.approx(1.0360674, abs=1e-6)
    # NMI with correction divides the corrected I by the plug-in H(M) = 1.
    assert nmi([[3, 1], [1, 3]], miller_madow=True) == pytest.approx(0.0985535, abs=1e-6)


def test_miller_madow_removes_the_bias_on_independent_routes():
    # M = 2, E = 4, N = 200 independent routes: plug-in bias ≈ (8 - 2 - 4 + 1)/(2·200·ln 2) = 0.0108 bits.
    rng = np.random.default_rng(0)
    plug, corrected = [], []
    for _ in range(300):
        m, e = rng.integers(0, 2, 200), rng.integers(0, 4, 200)
        counts = np.bincount(m * 4 + e, minlength=8).reshape(2, 4)
        plug.append(mutual_information_bits(counts))
        corrected.append(mutual_information_bits(counts, miller_madow=True))
    assert np.mean(plug) > 0.008
    assert abs(np.mean(corrected)) < 0.002


def test_total_variation():
    # 1/2 · (|0.5-0.1| + |0.3-0.3| + |0.2-0.6|) = 1/2 · 0.8 = 0.4
    assert total_variation([0.5, 0.3, 0.2], [0.1, 0.3, 0.6]) == pytest.approx(0.4, abs=1e-12)
    assert total_variation([1, 0], [0, 1]) == pytest.approx(1.0)
    assert total_variation([0.25] * 4, [0.25] * 4) == 0.0


def test_entropy_effective_experts_and_gini():
    assert entropy_bits([0.25] * 4) == pytest.approx(2.0)
    assert effective_experts([0.25] * 4) == pytest.approx(4.0)
    assert effective_experts([0, 1, 0, 0]) == pytest.approx(1.0)
    assert effective_experts([0.5, 0.5, 0, 0]) == pytest.approx(2.0)
    # Gini = sum_ij |p_i - p_j| / (2 n sum p). One-hot over 4: 6 ordered pairs differ by 1 -> 6/8 = 0.75.
    assert gini([0, 0, 1, 0]) == pytest.approx(0.75)
    assert gini([0.25] * 4) == pytest.approx(0.0)
    # [0.5,0.5,0,0]: 8 ordered pairs differ by 0.5 -> 4/8 = 0.5; loads (counts) give the same value.
    assert gini([0.5, 0.5, 0, 0]) == pytest.approx(0.5)
    assert gini([7, 7, 0, 0]) == pytest.approx(0.5)


def test_mean_ci95():
    # mean 2, sample std 1, t(0.975, 2) = 4.303 -> half width 4.303/sqrt(3) = 2.4843
    mean, half, n = mean_ci95([1, 2, 3])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert mean_ci95([5.0, 5.0, 5.0, 5.0]).half_width == 0.0
    # Table values and the large-df expansion: t(0.975, 1) = 12.706, t(0.975, 10) = 2.228, t(0.975, 60) = 2.000,
    # t(0.975, 120) = 1.980 (standard t tables).
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(10) == pytest.approx(2.228, abs=1e-3)
    assert t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)


def test_permutation_null_exactly_independent_gives_p_one():
    # 200 routes per modality, each with 50 of every expert: observed I = 0, every shuffle is >= 0 -> p = 1.
    result = permutation_null_mi(np.repeat([0, 1], 200), np.tile([0, 1, 2, 3], 100), n_perm=100, seed=0)
    assert result.observed == pytest.approx(0.0, abs=1e-12)
    assert result.p_value == 1.0 and result.null.shape == (100,) and (result.null >= 0).all()


def test_permutation_null_strong_dependence_gives_smallest_p():
    # 90% of routes go to the modality's own expert: no shuffle of 200 reaches that, so p = 1/(n_perm + 1).
    rng = np.random.default_rng(1)
    m = rng.integers(0, 2, 200)
    e = np.where(rng.random(200) < 0.9, m, 1 - m)
    observed, null, p = permutation_null_mi(m, e, n_perm=200, seed=3)
    assert p == pytest.approx(1 / 201) and p < 0.05
    assert observed > 0.4 and null.max() < 0.1
    again = permutation_null_mi(m, e, n_perm=200, seed=3)
    assert np.array_equal(again.null, null)  # seeded: reproducible


@pytest.mark.parametrize("call, match", [
    (lambda: mutual_information_bits([[-1, 2], [3, 4]]), "counts_ME: counts must be >= 0"),
    (lambda: mutual_information_bits([[0, 0], [0, 0]]), "counts_ME: all counts are zero"),
    (lambda: mutual_information_bits([1, 2, 3]), r"counts_ME: a \[modalities, experts\] table"),
    (lambda: nmi([[5, 5], [0, 0]]), "H\\(M\\) = 0"),
    (lambda: total_variation([0.5, 0.5], [0.2, 0.2]), "q: must be non-negative and sum to 1"),
    (lambda: total_variation([0.5, 0.5], [1.0, 0, 0]), "same number of experts"),
    (lambda: effective_experts([float("nan"), 1.0]), "NaN"),
    (lambda: gini([0, 0]), "positive total"),
    (lambda: mean_ci95([1.0]), "at least 2 seeds"),
    (lambda: mean_ci95([]), "values: empty"),
    (lambda: permutation_null_mi([0, 1], [0], n_perm=5), "equal, non-zero lengths"),
    (lambda: permutation_null_mi([0.5, 1.0], [0, 1], n_perm=5), "integer ids"),
    (lambda: permutation_null_mi([0, 1], [0, 1], n_perm=0), "n_perm"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
