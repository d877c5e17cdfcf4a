"""Soft MI, per-modality routing summaries, compute share and the aware router's logit split
against hand-computed values (each expectation is worked out in its comment)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmoe_ds.analysis.routing import (
    compute_share,
    expert_ffn_flops,
    logit_variance_split,
    modality_routing,
    route_arrays,
    router_logit_split,
    soft_mutual_information_bits,
)
from mmoe_ds.moe.config import RouterConfig
from mmoe_ds.moe.router import ModalityRouter

H_QUARTER = 0.8112781244591328  # H_b(1/4) = 0.5 + 0.75·log2(4/3) bits


def test_soft_mi_hand_values():
    # One-hot and disjoint, equal token counts: I = H(M) = 1 bit.
    assert soft_mutual_information_bits([[1, 0], [1, 0], [0, 1], [0, 1]], [0, 0, 1, 1]) == pytest.approx(1.0)
    # p(e|image) = (3/4, 1/4), p(e|text) = (1/4, 3/4), p(m) = 1/2: p(e) = (1/2, 1/2), I = 1 - H_b(1/4) = 0.188722.
    probs = [[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.25, 0.75]]
    assert soft_mutual_information_bits(probs, [0, 0, 1, 1]) == pytest.approx(1 - H_QUARTER, abs=1e-9)
    # 3 image tokens on expert 0, 1 text token on expert 1: I = H(M) = H_b(1/4).
    assert soft_mutual_information_bits([[1, 0], [1, 0], [1, 0], [0, 1]], [0, 0, 0, 1]) == pytest.approx(H_QUARTER)
    # The same mean probabilities for both modalities: 0, although single tokens lean differently.
    assert soft_mutual_information_bits([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5], [0.5, 0.5]], [0, 0, 1, 1]) == \
        pytest.approx(0.0, abs=1e-12)


def test_soft_mi_rejects_rows_that_are_not_probabilities():
    with pytest.raises(ValueError, match="probs_SE: each row"):
        soft_mutual_information_bits([[0.5, 0.6], [1, 0]], [0, 1])


def hand_routing():
    """3 image tokens (k=1) and 2 text tokens (k=2) over 4 experts, K = 2 route slots per token.

    image: t0 -> e0 kept, t1 -> e0 dropped, t2 -> e1 kept  (second slots unused)
    text:  t3 -> e2 kept, e3 kept; t4 -> e3 kept, e2 dropped
    """
    modality = np.array([0, 0, 0, 1, 1])
    chosen = np.array([[0, 1], [0, 2], [1, 0], [2, 3], [3, 2]])
    valid = np.array([[1, 0], [1, 0], [1, 0], [1, 1], [1, 1]], bool)
    kept = np.array([[1, 0], [0, 0], [1, 0], [1, 1], [1, 0]], bool)
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.3, 0.5, 0.1, 0.1],
                      [0.0, 0.0, 0.6, 0.4], [0.1, 0.1, 0.2, 0.6]])
    return modality, probs, chosen, valid, kept


def test_modality_routing_on_a_hand_built_routing():
    image, text = modality_routing(*hand_routing(), num_modalities=2, num_experts=4)
    # image: routes e0, e0, e1 -> utilization (2/3, 1/3, 0, 0); kept e0, e1 -> drop 1/3
    assert image.tokens == 3 and image.routed == [2, 1, 0, 0] and image.kept == [1, 1, 0, 0]
    assert image.utilization == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert image.drop_rate == pytest.approx(1 / 3)
    # effective experts 2^H(2/3, 1/3) = 2^0.9182958 = 1.8898816; Gini Σ|pi-pj|/(2n) = (2·(1/3+2/3+2/3+1/3+1/3))/8
    assert image.effective_experts == pytest.approx(1.8898816, abs=1e-6)
    assert image.gini == pytest.approx(2 * (1 / 3 + 2 / 3 + 2 / 3 + 1 / 3 + 1 / 3 + 0) / 8)
    # mean top-1 probability: (0.7 + 0.4 + 0.5) / 3
    assert image.mean_top1_prob == pytest.approx(1.6 / 3)
    # text: routes e2, e3, e3, e2 -> (0, 0, 1/2, 1/2), 2 effective experts; kept 3 of 4 -> drop 1/4
    assert text.routed == [0, 0, 2, 2] and text.kept == [0, 0, 1, 2]
    assert text.effective_experts == pytest.approx(2.0) and text.drop_rate == pytest.approx(0.25)
    assert text.mean_top1_prob == pytest.approx(0.6)


def test_route_arrays_count_each_valid_route():
    m, e = route_arrays(*[hand_routing()[i] for i in (0, 2, 3)])
    assert m.tolist() == [0, 0, 0, 1, 1, 1, 1] and e.tolist() == [0, 0, 1, 2, 3, 3, 2]


def test_compute_share_on_the_hand_built_routing():
    image, text = modality_routing(*hand_routing(), num_modalities=2, num_experts=4)
    # one token through one expert with d = 4, f = 8: 3 GEMMs of 4·8 multiply-adds, 2 FLOPs each = 192
    assert expert_ffn_flops(4, 8) == 192
    share = compute_share([image.kept, text.kept], [image.tokens, text.tokens], expert_ffn_flops(4, 8))
    # kept routes: image 2, text 3 (dropped routes cost nothing, top-2 counts both routes)
    assert share.flops == [2 * 192, 3 * 192]
    assert share.share == pytest.approx([0.4, 0.6])
    assert share.token_share == pytest.approx([0.6, 0.4])
    # nothing computed: shares are 0, not NaN
    assert compute_share([[0, 0], [0, 0]], [0, 0], 10).share == [0.0, 0.0]


def test_logit_variance_split_hand_values():
    # W·x centred per token: rows (1,-1), (-1,1): variance across experts 1 each -> S_wx = 1.
    # E[m] = (2,-2) for both tokens: S_bias = 4 -> share 4 / (1 + 4) = 0.8; cross term 2·mean(a·b) = 0.
    split = logit_variance_split([[1, -1], [-1, 1]], [[2, -2], [2, -2]])
    assert split.modality_share == pytest.approx(0.8)
    assert (split.wx, split.bias, split.cross) == pytest.approx((1.0, 4.0, 0.0))
    # a constant added to a token's logits changes no routing decision and no share
    assert logit_variance_split([[6, 4], [-1, 1]], [[12, 8], [2, -2]]).modality_share == pytest.approx(0.8)
    # both constant across experts: undefined
    assert np.isnan(logit_variance_split([[1, 1]], [[2, 2]]).modality_share)


def aware_router(w, bias) -> ModalityRouter:
    cfg = RouterConfig(num_experts=2, mode="modality_bias", top_k=1)
    router = ModalityRouter(cfg, hidden_size=2)
    with torch.no_grad():
        router.wg.weight.copy_(torch.tensor(w, dtype=torch.float32))
        router.modality_bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return router.eval()


def test_router_logit_split_on_a_hand_built_aware_router():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ids = torch.tensor([0, 1, 1])
    # W = identity: W·x rows (1,0), (0,1), (1,1) -> centred (.5,-.5), (-.5,.5), (0,0): S_wx = (.25+.25+.25+.25)/6 = 1/6
    # E = [[1,-1], [-1,1]]: rows (1,-1), (-1,1), (-1,1): S_bias = 1 -> share 1 / (1 + 1/6) = 6/7
    router = aware_router([[1, 0], [0, 1]], [[1, -1], [-1, 1]])
    split = router_logit_split(router, x, ids)
    assert split.modality_share == pytest.approx(6 / 7, abs=1e-6)
    # the split's parts add up to the router's own logits
    wx = x @ router.wg.weight.t()
    assert torch.allclose(wx + router.modality_bias[ids], router.compute_logits(x, ids))
    # no bias: nothing from E[m]; no W: everything from it
    assert router_logit_split(aware_router([[1, 0], [0, 1]], [[0, 0], [0, 0]]), x, ids).modality_share == 0.0
    assert router_logit_split(aware_router([[0, 0], [0, 0]], [[1, -1], [-1, 1]]), x, ids).modality_share == 1.0
    # an agnostic router has no E[m]
    agnostic = ModalityRouter(RouterConfig(num_experts=2, mode="agnostic", top_k=1), hidden_size=2)
    assert router_logit_split(agnostic, x, ids) is None
