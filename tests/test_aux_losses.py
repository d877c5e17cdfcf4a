"""Every aux loss against a hand-computed value, and the invariances each should have."""
from __future__ import annotations

import math

import pytest
import torch

from mmoe_ds.moe import RouterConfig
from mmoe_ds.moe import losses as L
from mmoe_ds.moe.router import ModalityRouter

P = torch.tensor([[0.75, 0.25], [0.4, 0.6], [0.25, 0.75], [0.9, 0.1]])
MOD = torch.tensor([0, 0, 1, 1])


def test_load_balance_by_hand():
    chosen = torch.tensor([[0], [1], [0], [0]])
    # mean p = [0.575, 0.425]; f = [0.75, 0.25]; 2 * (0.575*0.75 + 0.425*0.25)
    assert L.load_balance(P, chosen, torch.ones(4, dtype=torch.long)).item() == pytest.approx(1.075)
    chosen2 = torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1]])  # top-2 counts first choices (DeepSpeed)
    assert L.load_balance(P, chosen2, torch.full((4,), 2)).item() == pytest.approx(1.0)


def test_modality_load_balance_by_hand():
    chosen = torch.tensor([[0], [1], [0], [0]])
    total, per = L.modality_load_balance(P, chosen, torch.ones(4, dtype=torch.long), MOD, torch.tensor([2.0, 2.0]))
    # image: mean p [0.575, 0.425], f [0.5, 0.5] -> 1.0; text: mean p [0.575, 0.425], f [1, 0] -> 1.15
    assert per.tolist() == pytest.approx([1.0, 1.15])
    assert total.item() == pytest.approx(1.075)


def test_z_loss_by_hand():
    # 3 tokens x 2 experts, rows and columns with different sums; a masked (-inf) logit counts as 0 mass.
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [math.log(7), math.log(2)], [math.log(5), float("-inf")]])
    # logsumexp per token: ln 2, ln 4, ln 9, ln 5
    expected = (math.log(2) ** 2 + math.log(4) ** 2 + math.log(9) ** 2 + math.log(5) ** 2) / 4
    assert L.z_loss(logits).item() == pytest.approx(expected)


def test_entropy_losses_by_hand():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mod = torch.tensor([0, 0, 1, 1])
    total, per = L.local_entropy(p, mod, 2)
    assert per.tolist() == pytest.approx([math.log(2) / 2, 0.0])
    assert total.item() == pytest.approx(math.log(2) / 4)
    # global: image mean [0.75, 0.25]; text mean [0.5, 0.5] -> H = ln 2, at the threshold
    h_image = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    total, per = L.global_entropy(p, mod, torch.tensor([math.log(2), math.log(2)]))
    assert per.tolist() == pytest.approx([math.log(2) - h_image, 0.0])
    assert L.entropy_floor(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 0.5).item() == pytest.approx(0.5)


def test_agnostic_regularizers_by_hand():
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    # u/E = 0.25; only expert 1 is short, by 0.15; times E
    assert L.min_utilization(p, 0.5).item() == pytest.approx(0.3)
    target = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    # both image tokens route to expert 0 (top-1): f_image = [1, 0], TV to [0.5, 0.5] = 0.5 (text absent: 0)
    p = p.clone().requires_grad_(True)
    total, per = L.matched_utilization(p, torch.tensor([[0], [0]]), torch.tensor([1, 1]), torch.tensor([0, 0]), target)
    assert per.tolist() == pytest.approx([0.5, 0.0]) and total.item() == pytest.approx(0.5)
    # straight-through gradient: d TV / d mean p = 0.5 * sign(f - target), shared by the 2 tokens
    total.backward()
    assert p.grad.flatten().tolist() == pytest.approx([0.25, -0.25, 0.25, -0.25])


def _all_losses_cfg(**kw):
    return RouterConfig(num_experts=4, mode="modality_bias", top_k={"image": 1, "text": 2},
                        load_balance_coef=0.5, modality_load_balance_coef=0.25, z_loss_coef=0.125,
                        local_entropy_coef=0.0625, global_entropy_coef=1.0, entropy_floor_coef=2.0,
                        min_utilization_coef=4.0, matched_utilization_coef=8.0,
                        matched_utilization_target={"image": [0.7, 0.1, 0.1, 0.1], "text": [0.1, 0.1, 0.1, 0.7]}, **kw)


def _losses(router, x, m):
    r = router.route(x, m)
    return r.aux_loss, r.aux_losses


def test_total_is_the_weighted_sum():
    cfg = _all_losses_cfg()
    router = ModalityRouter(cfg, 8)
    total, parts = _losses(router, torch.randn(30, 8), torch.randint(0, 2, (30,)))
    coefs = {name: getattr(cfg, f"{name}_coef") for name in parts}
    assert len(parts) == 8
    assert total.item() == pytest.approx(sum(coefs[n] * v.item() for n, v in parts.items()), rel=1e-6)


def test_all_losses_invariant_to_token_order():
    torch.manual_seed(0)
    router = ModalityRouter(_all_losses_cfg(), 8)
    x, m = torch.randn(40, 8), torch.randint(0, 2, (40,))
    perm = torch.randperm(40)
    total, parts = _losses(router, x, m)
    total_p, parts_p = _losses(router, x[perm], m[perm])
    for name in parts:
        assert parts_p[name].item() == pytest.approx(parts[name].item(), rel=1e-5, abs=1e-7), name


def test_per_modality_losses_ignore_other_modalities_tokens():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(20, 4), -1)
    chosen = probs.topk(2, -1).indices
    k = torch.full((20,), 2)
    image = torch.zeros(20, dtype=torch.long)
    extra_p = torch.softmax(torch.randn(13, 4) * 3, -1)
    probs2, chosen2 = torch.cat([probs, extra_p]), torch.cat([chosen, extra_p.topk(2, -1).indices])
    k2, mod2 = torch.full((33,), 2), torch.cat([image, torch.ones(13, dtype=torch.long)])
    target = torch.full((2, 4), 0.25)
    pairs = [
        (L.modality_load_balance(probs, chosen, k, image, torch.tensor([4.0, 4.0]))[1],
         L.modality_load_balance(probs2, chosen2, k2, mod2, torch.tensor([4.0, 4.0]))[1]),
        (L.local_entropy(probs, image, 2)[1], L.local_entropy(probs2, mod2, 2)[1]),
        (L.global_entropy(probs, image, torch.tensor([1.3, 1.3]))[1],
         L.global_entropy(probs2, mod2, torch.tensor([1.3, 1.3]))[1]),
        (L.matched_utilization(probs, chosen, k, image, target)[1],
         L.matched_utilization(probs2, chosen2, k2, mod2, target)[1]),
    ]
    for alone, mixed in pairs:
        assert mixed[0].item() == pytest.approx(alone[0].item(), rel=1e-6)


def test_balanced_router_has_minimal_load_balance():
    probs = torch.full((8, 4), 0.25)
    chosen = torch.arange(8).remainder(4)[:, None]
    assert L.load_balance(probs, chosen, torch.ones(8, dtype=torch.long)).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, 1, dtype=torch.long)
    one_hot = torch.tensor([[1.0, 0, 0, 0]]).repeat(8, 1)
    assert L.load_balance(one_hot, collapsed, torch.ones(8, dtype=torch.long)).item() == pytest.approx(4.0)


def test_router_scales_pool_losses_by_the_configured_pool_sizes():
    """Uniform probabilities over each pool (zero router weights), pools of 2 and 3 of 4 experts:
    modality balance |P_m| · Σ_e p_e f_e = |P_m| · 1/|P_m| = 1 for each modality, whichever expert
    is picked; mean probabilities uniform over the pool have entropy log |P_m|, exactly the
    default threshold, so the global-entropy loss is 0; local entropy is (log 2 + log 3) / 2."""
    cfg = RouterConfig(num_experts=4, mode="masked_pools", pools={"image": [0, 1], "text": [1, 2, 3]}, top_k=1,
                       modality_load_balance_coef=1.0, global_entropy_coef=1.0, local_entropy_coef=1.0)
    router = ModalityRouter(cfg, 8)
    with torch.no_grad():
        router.wg.weight.zero_()
    _, parts = _losses(router, torch.randn(10, 8), torch.tensor([0, 1] * 5))
    assert parts["modality_load_balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert parts["global_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["local_entropy"].item() == pytest.approx((math.log(2) + math.log(3)) / 2, abs=1e-6)
