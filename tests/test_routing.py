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
# What is equal (and what is not) is stated in the README; these tests are that statement:
#   * top-1 with use_rts=True <-> drop_policy "random", top-2 with top2_2nd_expert_sampling=False
#     <-> "position", top-k (k >= 3) <-> "probs";
#   * equal: expert of every route, kept/dropped, combine weights, capacity, l_aux, exp_counts;
#     slots too for "position"; for "probs"/"random" only each expert's set of used slots
#     (DeepSpeed numbers kept routes in token order, we in priority order; outputs are equal);
#   * not equal: routes whose probabilities tie exactly (k >= 3 at logit spreads where fp32
#     probabilities saturate to 0 or 1): DeepSpeed's torch.topk keeps an arbitrary one of the tied
#     routes, we the lower logit rank / earlier token. There each expert still receives the same
#     multiset of positive combine weights.
GATES = [(1, "random"), (2, "position"), (3, "probs"), (4, "probs")]
CAPACITIES = [0.25, 0.5, 1.0, 1.25, 2.0, 8.0, "dropless"]


def _ds_and_ours(k, policy, capacity, seed, E=8):
    from deepspeed.moe.sharded_moe import TopKGate

    factor, drop = (1.0, False) if capacity == "dropless" else (capacity, True)
    torch.manual_seed(seed)
    ds_gate = TopKGate(D, E, k=k, capacity_factor=factor, eval_capacity_factor=factor, min_capacity=4,
                       drop_tokens=drop, use_rts=(k == 1), top2_2nd_expert_sampling=False)
    ours = ModalityRouter(RouterConfig(num_experts=E, mode="agnostic", top_k=k, capacity_factor=factor,
                                       eval_capacity_factor=factor, min_capacity=4, drop_policy=policy,
                                       drop_tokens=drop), D)
    ours.wg.weight.data.copy_(ds_gate.wg.weight.data)
    return ds_gate, ours


def _tokens_at_logit_scale(w: torch.Tensor, S: int, scale: float, seed: int) -> torch.Tensor:
    """S random tokens whose router logits W·x have standard deviation `scale`."""
    x = torch.randn(S, D, generator=torch.Generator().manual_seed(seed))
    return x / (x @ w.t()).std() * scale


def _assert_same_positive_gates_per_expert(index, gates, ds_index, ds_gates, E, where):
    """Every expert keeps routes with the same positive combine weights (as multisets)."""
    for e in range(E):
        ours = gates[(index == e) & (gates > 0)].sort().values
        theirs = ds_gates[(ds_index == e) & (ds_gates > 0)].sort().values
        assert ours.shape == theirs.shape, f"{where}: expert {e} keeps {len(ours)} vs {len(theirs)} routes"
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0, msg=where)


@pytest.mark.parametrize("k,policy", GATES)
@pytest.mark.parametrize("capacity", CAPACITIES)
def test_agnostic_matches_deepspeed_topk_gate(k, policy, capacity):
    E = 8
    ds_gate, ours = _ds_and_ours(k, policy, capacity, seed=k)
    tied_batches = 0
    for trial, (S, scale, training) in enumerate([(5, 1.0, True), (37, 10.0, False), (96, 1.0, True),
                                                   (300, 10.0, True), (300, 50.0, True), (211, 50.0, False)]):
        ds_gate.train(training), ours.train(training)
        x = _tokens_at_logit_scale(ds_gate.wg.weight.data, S, scale, seed=trial)
        modality_ids = torch.randint(0, 2, (S,), generator=torch.Generator().manual_seed(trial))
        torch.manual_seed(100 + trial)  # DeepSpeed's random token selection draws from the global RNG
        l_aux, ds_capacity, _, indices, locations, gates, counts = ds_gate(x, None, True)
        torch.manual_seed(100 + trial)
        r = ours.route(x, modality_ids)
        indices = indices.long()
        where = f"k={k} {policy} capacity={capacity} S={S} scale={scale} training={training}"
        probs = torch.softmax(x @ ds_gate.wg.weight.data.t(), -1)
        ranked = probs.sort(-1, descending=True).values[:, :k + 1]
        tied = k >= 3 and bool((ranked[:, 1:] == ranked[:, :-1]).any() or (probs == 1.0).any())
        if capacity != "dropless":
            assert r.capacity == int(ds_capacity), where
        _assert_same_positive_gates_per_expert(r.expert_index, r.combine_weight, indices, gates, E, where)
        if tied:
            assert scale > 1, f"{where}: unexpected tie at logit scale 1"
            tied_batches += 1
            continue
        assert torch.equal(r.expert_index, indices), where
        torch.testing.assert_close(r.combine_weight, gates, atol=1e-6, rtol=0, msg=where)
        torch.testing.assert_close(r.aux_losses["load_balance"], l_aux, atol=1e-6, rtol=1e-5, msg=where)
        assert r.capacity == int(ds_capacity), where
        assert torch.equal(r.stats.routed.sum(0).long(), counts.long()), where
        kept = r.expert_index >= 0
        if policy == "position":
            assert torch.equal(r.slot[kept], locations.long()[kept]), where
        else:  # same slots used in every expert, numbered in another order
            for e in range(E):
                assert sorted(r.slot[r.expert_index == e].tolist()) == sorted(locations.long()[indices == e].tolist()), where  # noqa: E501
    if capacity == 0.25:
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


def test_modality_bias_adds_the_tokens_own_row():
    r = _router(0, num_experts=4, mode="modality_bias")
    with torch.no_grad():
        r.wg.weight.zero_()
        r.modality_bias.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]]))
    logits = r.route(torch.randn(3, D), torch.tensor([1, 0, 1])).logits
    assert logits.tolist() == [[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]]


def test_separate_routers_use_the_tokens_own_weights():
    r = _router(0, num_experts=2, mode="separate_routers")
    with torch.no_grad():
        r.wg.weight.zero_()
        r.wg.weight[:, 0] = torch.tensor([1.0, 2.0, 30.0, 40.0])  # rows: image e0, e1, text e0, e1
    x = torch.zeros(2, D)
    x[:, 0] = 1.0
    assert r.route(x, torch.tensor([1, 0])).logits.tolist() == [[30.0, 40.0], [1.0, 2.0]]


def test_jitter_scales_the_router_input_in_training_only():
    r = _router(0, num_experts=4, mode="agnostic", jitter_eps=0.1)
    with torch.no_grad():
        r.wg.weight.zero_()
        r.wg.weight[:, :4] = torch.eye(4)
    x = torch.zeros(50, D)
    x[:, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = torch.zeros(50, dtype=torch.long)
    logits = r.route(x, m).logits.detach()  # training: each input feature times U(0.9, 1.1)
    ratio = logits / x[:, :4]
    assert bool((ratio >= 0.9 - 1e-6).all() and (ratio <= 1.1 + 1e-6).all())
    assert float(ratio.std()) > 0.02, "jitter must be applied in training"
    r.eval()
    assert r.route(x, m).logits.tolist() == [[1.0, 2.0, 3.0, 4.0]] * 50


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
    for k in range(routing.expert_index.shape[0]):  # checked against the pools written above
        for s, e in enumerate(routing.expert_index[k].tolist()):
            assert e == -1 or e in pools[["image", "text"][int(m[s])]], (s, e)


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
@pytest.mark.parametrize("mode,capacity", [("agnostic", [7, 12]), ("masked_pools", [11, 18])])
def test_per_modality_capacity_and_dropped_counts(policy, mode, capacity):
    """84 image tokens (k=1, factor 0.5) and 36 text tokens (k=2, factor 1.0), by hand:
    agnostic, 6 experts: image ceil(84·1·0.5/6) = 7, text ceil(36·2·1.0/6) = 12;
    pools of 4 experts:  image ceil(84·1·0.5/4) = 11, text ceil(36·2·1.0/4) = 18.
    Each (modality, expert) keeps exactly min(routes chosen, its capacity), chosen computed here.
    """
    pools = {"image": [0, 1, 2, 3], "text": [2, 3, 4, 5]} if mode == "masked_pools" else None
    r = _router(3, num_experts=6, mode=mode, pools=pools, top_k={"image": 1, "text": 2},
                capacity_factor={"image": 0.5, "text": 1.0}, min_capacity=1, drop_policy=policy)
    x = torch.randn(120, D) * 4  # sharp logits: heavy imbalance, many drops
    m = (torch.arange(120) % 10 < 3).long()  # 36 text, 84 image, interleaved
    routing = r.route(x, m)
    assert routing.capacity == sum(capacity)
    logits = x @ r.wg.weight.detach().t()
    wanted = torch.zeros(2, 6, dtype=torch.long)  # routes chosen per (modality, expert), before capacity
    for s in range(120):
        allowed = pools[["image", "text"][int(m[s])]] if pools else list(range(6))
        for e in sorted(allowed, key=lambda e: -float(logits[s, e]))[:int(m[s]) + 1]:
            wanted[m[s], e] += 1
    kept = torch.zeros(2, 6, dtype=torch.long)
    slots_seen = set()
    for k in range(routing.expert_index.shape[0]):
        for s in range(120):
            e = int(routing.expert_index[k, s])
            if e >= 0:
                kept[m[s], e] += 1
                slot = int(routing.slot[k, s])
                block = range(0, capacity[0]) if m[s] == 0 else range(capacity[0], sum(capacity))
                assert slot in block and (e, slot) not in slots_seen, (k, s, e, slot)
                slots_seen.add((e, slot))
    assert torch.equal(kept, torch.minimum(wanted, torch.tensor(capacity)[:, None]))
    assert torch.equal(routing.stats.routed.long(), wanted)
    assert torch.equal(routing.stats.kept.long(), kept)
    assert routing.stats.dropped.long().tolist() == (wanted - kept).sum(1).tolist()
    assert int((wanted - kept).sum()) > 0


def test_shared_capacity_bounds_each_expert():
    r = _router(1, num_experts=4, mode="modality_bias", top_k=2, capacity_factor=1.0, min_capacity=0)
    x, m = torch.randn(64, D) * 4, torch.randint(0, 2, (64,))
    routing = r.route(x, m)
    assert routing.capacity == 32  # ceil(64 * 2 / 4 * 1.0)
    counts = torch.bincount(routing.expert_index[routing.expert_index >= 0], minlength=4)
    assert int(counts.max()) <= 32
    assert int(routing.stats.dropped.sum()) == int((routing.expert_index == -1).sum())


def test_dropless_keeps_every_route():
    r = _router(2, num_experts=4, top_k={"image": 2, "text": 1}, drop_tokens=False, capacity_factor={"image": 0.1, "text": 0.1})  # noqa: E501
    x, m = torch.randn(64, D) * 4, torch.randint(0, 2, (64,))
    routing = r.route(x, m)
    assert int(routing.stats.dropped.sum()) == 0
    assert int((routing.expert_index >= 0).sum()) == int(torch.tensor([2, 1])[m].sum())


def test_eval_uses_eval_capacity_factor_and_no_jitter():
    r = _router(4, num_experts=4, top_k=1, capacity_factor=0.5, eval_capacity_factor=4.0, jitter_eps=0.1, min_capacity=0)  # noqa: E501
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
