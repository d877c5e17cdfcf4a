"""Routing semantics in one process: DeepSpeed equivalence, modes, capacity, config errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmoe_ds.moe import RouterConfig, TorchMoE
from mmoe_ds.moe.router import ModalityRouter

D = 16


def _router(seed=0, **kw) -> ModalityRouter:
    torch.manual_seed(seed)
    return ModalityRouter(RouterConfig(**kw), D)


# -- 1. agnostic == DeepSpeed's stock TopKGate ---------------------------------------------------
@pytest.mark.parametrize("k,policy", [(1, "random"), (2, "position"), (3, "probs")])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 8.0])
def test_agnostic_matches_deepspeed_topk_gate(k, policy, capacity_factor):
    from deepspeed.moe.sharded_moe import TopKGate

    E, S = 8, 96
    ds_gate = TopKGate(D, E, k=k, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                       min_capacity=4, drop_tokens=True, use_rts=(k == 1), top2_2nd_expert_sampling=False)
    ours = ModalityRouter(RouterConfig(num_experts=E, mode="agnostic", top_k=k, capacity_factor=capacity_factor,
                                       eval_capacity_factor=capacity_factor, min_capacity=4, drop_policy=policy), D)
    ours.wg.weight.data.copy_(ds_gate.wg.weight.data)
    for trial in range(3):
        x, modality_ids = torch.randn(S, D), torch.randint(0, 2, (S,))
        torch.manual_seed(100 + trial)  # DeepSpeed's random token selection draws from the global RNG
        l_aux, capacity, _, indices, _, gates, counts = ds_gate(x, None, True)
        torch.manual_seed(100 + trial)
        r = ours.route(x, modality_ids)
        assert torch.equal(r.expert_index, indices.long())
        torch.testing.assert_close(r.combine_weight, gates, atol=1e-6, rtol=0)
        torch.testing.assert_close(r.aux_losses["load_balance"], l_aux, atol=1e-6, rtol=0)
        assert r.capacity == int(capacity)
        assert torch.equal(r.stats.routed.sum(0).long(), counts.long())
    if capacity_factor == 0.5:
        assert int(r.stats.dropped.sum()) > 0, "the low capacity factor should exercise dropping"


# -- 2. modes ------------------------------------------------------------------------------------
def test_modality_bias_zero_init_equals_agnostic_and_gets_gradients():
    torch.manual_seed(0)
    agnostic = TorchMoE(RouterConfig(num_experts=4, mode="agnostic", top_k=2), D, 32)
    biased = TorchMoE(RouterConfig(num_experts=4, mode="modality_bias", top_k=2), D, 32)
    missing = biased.load_state_dict(agnostic.state_dict(), strict=False).missing_keys
    assert missing == ["deepspeed_moe.gate.modality_bias"]
    x, m = torch.randn(40, D), torch.randint(0, 2, (40,))
    a, b = agnostic(x, m), biased(x, m)
    torch.testing.assert_close(a.hidden_states, b.hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=0, atol=0)
    (b.hidden_states.square().sum() + b.aux_loss).backward()
    grad = biased.deepspeed_moe.gate.modality_bias.grad
    assert grad is not None and bool((grad.abs().sum(-1) > 0).all()), "both modalities' bias rows need gradient"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k_image=st.integers(1, 3), k_text=st.integers(1, 2),
       shared=st.integers(0, 1), capacity=st.sampled_from([0.25, 1.0, 4.0]))
def test_masked_pools_never_leave_the_pool(seed, k_image, k_text, shared, capacity):
    pools = {"image": [0, 1, 2] + ([5] if shared else []), "text": [3, 4, 5]}
    r = _router(seed, num_experts=6, mode="masked_pools", pools=pools, top_k={"image": k_image, "text": k_text},
                capacity_factor=capacity)
    g = torch.Generator().manual_seed(seed)
    x, m = torch.randn(50, D, generator=g) * 3, torch.randint(0, 2, (50,), generator=g)
    routing = r.route(x, m)
    allowed = r.routing_tables(x.device)[0][m]  # [S, E]
    for k in range(routing.expert_index.shape[0]):
        idx = routing.expert_index[k]
        kept = idx >= 0
        assert bool(allowed[kept, idx[kept]].all())


def test_separate_routers_other_modality_gets_zero_gradient():
    r = _router(num_experts=4, mode="separate_routers", top_k=2, z_loss_coef=0.1, modality_load_balance_coef=0.1)
    x = torch.randn(30, D)
    image_only = torch.zeros(30, dtype=torch.long)
    out = r.route(x, image_only)
    (out.combine_weight.square().sum() + out.aux_loss).backward()
    grad = r.wg.weight.grad.view(2, 4, D)
    assert grad[0].abs().sum() > 0
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))


# -- 3. capacity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["probs", "position", "random"])
@pytest.mark.parametrize("mode", ["agnostic", "masked_pools"])
def test_per_modality_capacity_and_dropped_counts(policy, mode):
    pools = {"image": [0, 1, 2, 3], "text": [2, 3, 4, 5]} if mode == "masked_pools" else None
    cf = {"image": 0.5, "text": 1.0}
    r = _router(3, num_experts=6, mode=mode, pools=pools, top_k={"image": 1, "text": 2},
                capacity_factor=cf, min_capacity=1, drop_policy=policy)
    x = torch.randn(120, D) * 4  # sharp logits: heavy imbalance, many drops
    m = (torch.rand(120) < 0.3).long()
    routing = r.route(x, m)
    n = torch.bincount(m, minlength=2).tolist()
    pool_sizes = [4 if pools else 6] * 2
    expected_cap = [max(1, -(-int(n[i] * [1, 2][i] * cf[k]) // pool_sizes[i])) for i, k in enumerate(["image", "text"])]
    kept = torch.zeros(2, 6, dtype=torch.long)
    slots_seen = set()
    for k in range(routing.expert_index.shape[0]):
        for s in range(120):
            e = int(routing.expert_index[k, s])
            if e >= 0:
                kept[m[s], e] += 1
                slot = int(routing.slot[k, s])
                assert slot < routing.capacity and (e, slot) not in slots_seen
                slots_seen.add((e, slot))
    for i in range(2):
        assert int(kept[i].max()) <= expected_cap[i], f"modality {i} over its capacity"
    token_k = torch.tensor([1, 2])[m]
    valid = torch.arange(2)[:, None] < token_k[None]
    actually_dropped = [int(((routing.expert_index == -1) & valid & (m[None] == i)).sum()) for i in range(2)]
    assert routing.stats.dropped.long().tolist() == actually_dropped
    assert sum(actually_dropped) > 0
    assert torch.equal(routing.stats.kept.long(), kept)


def test_shared_capacity_bounds_each_expert():
    r = _router(1, num_experts=4, mode="modality_bias", top_k=2, capacity_factor=1.0, min_capacity=0)
    x, m = torch.randn(64, D) * 4, torch.randint(0, 2, (64,))
    routing = r.route(x, m)
    assert routing.capacity == 32  # ceil(64 * 2 / 4 * 1.0)
    counts = torch.bincount(routing.expert_index[routing.expert_index >= 0], minlength=4)
    assert int(counts.max()) <= 32
    assert int(routing.stats.dropped.sum()) == int((routing.expert_index == -1).sum())


def test_dropless_keeps_every_route():
    r = _router(2, num_experts=4, top_k={"image": 2, "text": 1}, drop_tokens=False, capacity_factor={"image": 0.1, "text": 0.1})
    x, m = torch.randn(64, D) * 4, torch.randint(0, 2, (64,))
    routing = r.route(x, m)
    assert int(routing.stats.dropped.sum()) == 0
    assert int((routing.expert_index >= 0).sum()) == int(torch.tensor([2, 1])[m].sum())


def test_eval_uses_eval_capacity_factor_and_no_jitter():
    r = _router(4, num_experts=4, top_k=1, capacity_factor=0.5, eval_capacity_factor=4.0, jitter_eps=0.1, min_capacity=0)
    x, m = torch.randn(64, D), torch.randint(0, 2, (64,))
    assert r.route(x, m).capacity == 8
    r.eval()
    a, b = r.route(x, m), r.route(x, m)
    assert a.capacity == 64 and torch.equal(a.logits, b.logits)


# -- 7. configuration errors ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,words", [
    (dict(num_experts=4, mode="masked_pools", pools={"image": [0, 1], "text": [2, 3]}, top_k=3), ["top_k", "pool"]),
    (dict(num_experts=4, mode="masked_pools", pools={"image": [0, 9], "text": [2, 3]}), ["pools['image']", "9"]),
    (dict(num_experts=6, ep_size=4), ["ep_size", "divisible"]),
    (dict(capacity_factor=0.0), ["capacity_factor", "> 0"]),
    (dict(eval_capacity_factor={"image": 1.0, "text": -1.0}), ["eval_capacity_factor", "> 0"]),
    (dict(mode="modality_gating"), ["mode", "modality_bias"]),
    (dict(mode="masked_pools"), ["pools"]),
    (dict(top_k={"image": 1, "audio": 2}), ["top_k", "audio"]),
    (dict(matched_utilization_coef=0.1), ["matched_utilization_target"]),
])
def test_bad_config_names_field_and_fix(kwargs, words):
    with pytest.raises(ValueError) as err:
        RouterConfig(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_modality_id_out_of_range_is_a_clear_error():
    layer = TorchMoE(RouterConfig(num_experts=4), D, 32)
    with pytest.raises(ValueError, match=r"modality_ids must be in \[0, 2\).*got \[2\]"):
        layer(torch.randn(5, D), torch.tensor([0, 1, 2, 1, 0]))
    with pytest.raises(ValueError, match="one modality id per token"):
        layer(torch.randn(5, D), torch.tensor([0, 1]))


def test_config_round_trips_through_dict():
    cfg = RouterConfig(num_experts=4, mode="masked_pools", pools={"image": [0, 1], "text": [1, 2, 3]},
                       top_k={"image": 1, "text": 2}, capacity_factor={"image": 1.0, "text": 2.0})
    again = RouterConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.pool_members == ((0, 1), (1, 2, 3))
    with pytest.raises(ValueError, match="unknown fields"):
        RouterConfig.from_dict({"num_expert": 4})
