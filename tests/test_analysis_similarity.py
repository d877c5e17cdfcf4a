"""CKA, weight CKA, expert matching and the linear probe against hand-computed values and invariants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmoe_ds.analysis.cka import cka_matrix, linear_cka, match_experts, weight_cka
from mmoe_ds.analysis.probe import linear_probe
from mmoe_ds.moe.experts import ExpertFFN, LocalExperts


def gram_debiased_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC written out on the n×n Gram matrices (the reference)."""
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return float((np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3)))


def test_cka_of_1d_features_is_squared_correlation():
    # Linear CKA of one feature each is corr²: x = [1,2,3], y = [1,2,4]; centred x = [-1,0,1],
    # y = [-4/3,-1/3,5/3]; xᵀy = 3, |x|² = 2, |y|² = 42/9 -> 9 / (2 · 42/9) = 81/84.
    assert linear_cka([[1.0], [2.0], [3.0]], [[1.0], [2.0], [4.0]], debiased=False) == pytest.approx(81 / 84, abs=1e-12)


def test_cka_of_x_with_itself_is_one():
    x = np.random.default_rng(0).normal(size=(300, 20))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, debiased=False) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(1.0, abs=1e-6)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 16))
    y = x @ rng.normal(size=(16, 8)) + rng.normal(size=(400, 8))  # related to x, not a rotation of it
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert np.allclose(q.T @ q, np.eye(16))
    for debiased in (True, False):
        base = linear_cka(x, y, debiased)
        assert 0.2 < base < 0.99  # a value that could move
        assert linear_cka(3.7 * x @ q, y, debiased) == pytest.approx(base, abs=1e-10)
        assert linear_cka(x, 0.01 * y, debiased) == pytest.approx(base, abs=1e-10)
        assert linear_cka(x @ q, x, debiased) == pytest.approx(1.0, abs=1e-10)


def test_debiased_cka_of_independent_features_is_near_zero_where_plain_cka_is_not():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(200, 100)), rng.normal(size=(200, 100))
    assert abs(linear_cka(x, y)) < 0.05
    # the plain estimator is biased upward when features are many compared with samples
    assert linear_cka(x, y, debiased=False) > 0.3


def test_feature_space_debiased_hsic_matches_the_gram_formula():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 7))
    y[:, 0] += 2 * x[:, 0]
    ref = gram_debiased_hsic(x, y) / np.sqrt(gram_debiased_hsic(x, x) * gram_debiased_hsic(y, y))
    assert linear_cka(x, y) == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("debiased", [True, False])
def test_gram_mode_gives_the_feature_space_values(debiased):
    rng = np.random.default_rng(8)
    feats = [rng.normal(size=(40, 6)), rng.normal(size=(40, 60))]
    feats[1][:, :6] += feats[0]
    by_features = cka_matrix(feats, debiased=debiased, gram=False)
    by_gram = cka_matrix(feats, debiased=debiased, gram=True)
    assert np.allclose(by_features, by_gram, atol=1e-10)
    assert 0.05 < by_features[0, 1] < 0.95
    assert cka_matrix(feats, debiased=debiased)[0, 1] == pytest.approx(by_gram[0, 1], abs=1e-10)  # auto picks Gram


def test_cka_matrix_is_symmetric_with_unit_diagonal_and_nan_for_constant():
    rng = np.random.default_rng(4)
    feats = [rng.normal(size=(50, 4)) for _ in range(3)] + [np.ones((50, 4))]
    m = cka_matrix(feats)
    assert np.allclose(np.diag(m)[:3], 1.0) and np.isnan(m[3, 3])
    assert np.allclose(m[:3, :3], m[:3, :3].T)


def test_bad_cka_input_names_the_argument():
    with pytest.raises(ValueError, match="x and y: the same samples"):
        linear_cka(np.zeros((5, 2)), np.zeros((6, 2)))
    with pytest.raises(ValueError, match="at least 4 samples"):
        linear_cka(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="x: contains NaN"):
        linear_cka(np.full((5, 2), np.nan), np.ones((5, 2)))


def test_weight_cka_ignores_neuron_order_and_is_near_zero_for_independent_experts():
    torch.manual_seed(0)
    experts = LocalExperts(3, 64, 96)  # expert 1 becomes expert 0 with its neurons permuted; 2 is independent
    perm = torch.randperm(96)
    with torch.no_grad():
        a, same = experts.expert(0), experts.expert(1)
        same["w1"].copy_(a["w1"][perm])
        same["w3"].copy_(a["w3"][perm])
        same["w2"].copy_(a["w2"][:, perm])
    x = torch.randn(10, 64)
    y = experts(x.repeat(2, 1), torch.tensor([10, 10, 0]))
    assert torch.allclose(y[10:], y[:10], atol=1e-6)  # the same function
    m = weight_cka(experts)
    assert m[0, 1] == pytest.approx(1.0, abs=1e-9)
    assert abs(m[0, 2]) < 0.1 and abs(m[1, 2]) < 0.1
    views = [experts.expert(e) for e in range(3)]  # per-expert views and modules give the same matrix
    assert np.array_equal(weight_cka(views), m)
    modules = [ExpertFFN(64, 96) for _ in range(3)]
    with torch.no_grad():
        for module, view in zip(modules, views):
            for name in ("w1", "w3", "w2"):
                getattr(module, name).weight.copy_(view[name])
    assert np.allclose(weight_cka(modules), m, atol=1e-12)


def test_matching_recovers_a_permutation_and_beats_greedy():
    s = np.array([[0.1, 0.9, 0.2], [0.8, 0.3, 0.1], [0.2, 0.1, 0.7]])
    m = match_experts(s)
    assert m.partner == [1, 0, 2]
    assert m.similarity == pytest.approx([0.9, 0.8, 0.7])
    assert m.mean_similarity == pytest.approx(0.8)
    # greedy would take (0,0)=0.9 then (1,1)=0.1 (total 1.0); the optimum is 0.8 + 0.85 = 1.65
    assert match_experts([[0.9, 0.8], [0.85, 0.1]]).partner == [1, 0]
    with pytest.raises(ValueError, match="square"):
        match_experts(np.zeros((2, 3)))


def test_probe_separates_separable_data():
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 300)
    x = rng.normal(size=(600, 8))
    x[:, 3] += np.where(y == 1, 4.0, -4.0)  # 8 sigma apart along one axis
    r = linear_probe(x, y, seed=0)
    assert r.accuracy >= 0.99 and r.balanced_accuracy >= 0.99
    assert r.n_train + r.n_test == 600 and r.n_test == 180
    assert 0.35 < r.chance < 0.65


def test_probe_is_at_chance_on_shuffled_labels():
    rng = np.random.default_rng(6)
    y = np.repeat([0, 1], 500)
    x = rng.normal(size=(1000, 8))
    x[:, 3] += np.where(y == 1, 4.0, -4.0)
    r = linear_probe(x, rng.permutation(y), seed=0)
    assert abs(r.accuracy - 0.5) < 0.1
    assert abs(r.balanced_accuracy - 0.5) < 0.1


def test_probe_holds_out_whole_groups():
    # Each group (sample) has one random code shared by its 10 tokens and one random label. A row
    # split lets the probe memorise codes it saw in training (leakage); a group split cannot.
    rng = np.random.default_rng(7)
    codes, labels = rng.normal(size=(60, 80)), rng.integers(0, 2, 60)
    groups = np.repeat(np.arange(60), 10)
    x = codes[groups] + 0.01 * rng.normal(size=(600, 80))
    leaky = linear_probe(x, labels[groups], seed=0)
    held = linear_probe(x, labels[groups], groups=groups, seed=0)
    assert leaky.accuracy > 0.95
    assert held.accuracy < 0.8


def test_probe_bad_input():
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(np.zeros((10, 2)), np.zeros(10, dtype=int))
    with pytest.raises(ValueError, match="groups: one per row"):
        linear_probe(np.zeros((10, 2)), np.arange(10) % 2, groups=np.arange(5))
