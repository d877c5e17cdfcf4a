"""Routing at the edges: exact zero probabilities, extreme logits, empty and one-token batches.

Every expectation here is independent of the router: literal values, or properties checked
against the configuration the test itself wrote down (the pools dict, a capacity computed by the
formula in the test), never against the router's own tables.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive_moe import naive_capacity

from mmoe_ds.moe import RouterConfig, TorchMoE
from mmoe_ds.moe.router import ModalityRouter

MODES = ("agnostic", "modality_bias", "masked_pools", "separate_routers")
ALL_LOSSES = dict(load_balance_coef=0.01, modality_load_balance_coef=0.01, z_loss_coef=0.001,
                  local_entropy_coef=0.02, global_entropy_coef=0.02, entropy_floor_coef=0.02,
                  min_utilization_coef=0.02)


def _identity_router(cfg: RouterConfig) -> ModalityRouter:
    """A router whose logits are the token vectors themselves (wg = I), so tests write logits."""
    router = ModalityRouter(cfg, cfg.num_experts)
    with torch.no_grad():
        router.wg.weight.copy_(torch.eye(cfg.num_experts))
    return router


def _finite_grads(module: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Names of x and parameters whose gradient holds a NaN or inf."""
    bad = [] if x.grad is None or bool(torch.isfinite(x.grad).all()) else ["x"]
    return bad + [n for n, p in module.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]  # noqa: E501


# -- issue 11 item 2: entropy losses and exact zero probabilities --------------------------------
@pytest.mark.parametrize("coef", ["local_entropy_coef", "global_entropy_coef", "entropy_floor_coef"])
@pytest.mark.parametrize("image_only", [False, True])
def test_entropy_losses_finite_gradients_with_masked_pools(coef, image_only):
    """The issue's repro: masked pools give exact zeros in every token's probabilities (and an
    image-only batch gives expert 3 a mean probability of exactly 0)."""
    torch.manual_seed(0)
    layer = TorchMoE(RouterConfig(num_experts=4, mode="masked_pools", pools={"image": [0, 1, 2], "text": [1, 2, 3]},
                                  top_k=1, **{coef: 0.02}), 8, 16)
    x = torch.randn(10, 8, requires_grad=True)
    out = layer(x, torch.zeros(10, dtype=torch.long) if image_only else torch.arange(10) % 2)
    (out.hidden_states.sum() + out.aux_loss).backward()
    assert _finite_grads(layer, x) == []
    assert bool(torch.isfinite(out.aux_loss))


@pytest.mark.parametrize("coef", ["local_entropy_coef", "global_entropy_coef", "entropy_floor_coef"])
def test_entropy_losses_finite_when_sharp_logits_underflow(coef):
    """Agnostic mode, no masks: a logit 200 above the rest gives probabilities of exactly 0."""
    router = _identity_router(RouterConfig(num_experts=4, mode="agnostic", top_k=1, **{coef: 1.0}))
    x = torch.tensor([[200.0, 0.0, 0.0, 0.0], [0.0, 200.0, 0.0, 0.0]], requires_grad=True)
    routing = router.route(x, torch.tensor([0, 1]))
    assert float(torch.softmax(routing.logits.detach(), -1)[0, 1]) == 0.0  # the edge this test is about
    (routing.combine_weight.sum() + routing.aux_loss).backward()
    assert _finite_grads(router, x) == []


def test_entropy_values_with_exact_zeros_by_hand():
    from mmoe_ds.moe.losses import _entropy
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]], requires_grad=True)
    h = _entropy(p)
    assert h.tolist() == pytest.approx([math.log(2), 0.0, 1.5 * math.log(2)])
    h.sum().backward()
    assert bool(torch.isfinite(p.grad).all())


# -- issue 11 item 3: masked pools under extreme logits ------------------------------------------
def test_masked_pools_extreme_logit_stays_in_pool():
    """The issue's repro: image pool [1, 2]; logits [0, 200, 0] underflow expert 2's probability."""
    cfg = RouterConfig(num_experts=3, mode="masked_pools", pools={"image": [1, 2], "text": [0, 1, 2]},
                       top_k={"image": 2, "text": 1}, drop_tokens=False)
    routing = _identity_router(cfg).route(torch.tensor([[0.0, 200.0, 0.0]]), torch.tensor([0]))
    assert sorted(routing.expert_index[:, 0].tolist()) == [1, 2]
    assert routing.stats.routed.tolist() == [[0, 1, 1], [0, 0, 0]]
    assert routing.stats.kept.tolist() == [[0, 1, 1], [0, 0, 0]]


def test_masked_pools_phantom_route_takes_no_capacity():
    """Token 0 (image, pool [1, 2]) must not take expert 0's only slot from token 1 (text).

    Shared capacity ceil(2 tokens / 3 experts * 0.5 * 2 routes) = 1 slot per expert; position
    policy: first choices first, then token order. Image [0, 200, 0] -> experts 1, then 2 (p = 0);
    text [5, 0, 10] -> experts 2, then 0. Expert 2: text's first choice wins its slot over image's
    second; expert 0: text's second choice, alone.
    """
    cfg = RouterConfig(num_experts=3, mode="masked_pools", pools={"image": [1, 2], "text": [0, 1, 2]},
                       top_k=2, capacity_factor=0.5, min_capacity=0, drop_policy="position")
    routing = _identity_router(cfg).route(torch.tensor([[0.0, 200.0, 0.0], [5.0, 0.0, 10.0]]), torch.tensor([0, 1]))
    assert routing.capacity == 1
    assert routing.expert_index.t().tolist() == [[1, -1], [2, 0]]
    assert routing.stats.kept.tolist() == [[0, 1, 0], [1, 0, 1]]
    assert routing.stats.routed.tolist() == [[0, 1, 1], [1, 0, 1]]


# -- issue 11 item 4: empty batches --------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_gives_zero_loss_and_finite_gradients(mode, training):
    torch.manual_seed(0)
    pools = {"image": [0, 1], "text": [1, 2, 3]} if mode == "masked_pools" else None
    layer = TorchMoE(RouterConfig(num_experts=4, mode=mode, pools=pools, top_k={"image": 1, "text": 2},
                                  matched_utilization_coef=0.1, matched_utilization_target={
                                      "image": [0.25] * 4, "text": [0.25] * 4}, **ALL_LOSSES), 8, 16)
    layer.train(training)
    x = torch.randn(0, 8, requires_grad=True)
    out = layer(x, torch.zeros(0, dtype=torch.long))
    assert out.hidden_states.shape == (0, 8)
    assert out.aux_loss.item() == 0.0 and all(v.item() == 0.0 for v in out.routing.aux_losses.values())
    assert len(out.routing.aux_losses) == 8
    (out.hidden_states.sum() + out.aux_loss).backward()
    assert _finite_grads(layer, x) == []
    assert out.routing.stats.tokens.tolist() == [0, 0] and out.routing.stats.routed.sum() == 0


# -- issue 11 item 7: properties at the edges, every mode ----------------------------------------
NAMES = ("image", "text")


@st.composite
def edge_configs(draw, mode: str):
    """A RouterConfig the validator accepts, and the batch shape, drawn toward the edges."""
    E = draw(st.integers(2, 6))
    pools = None
    if mode == "masked_pools":
        pools = {m: sorted(draw(st.sets(st.integers(0, E - 1), min_size=1, max_size=E))) for m in NAMES}
    sizes = [len(pools[m]) if pools else E for m in NAMES]
    top_k = {m: draw(st.integers(1, min(3, n))) for m, n in zip(NAMES, sizes)}
    capacity = draw(st.sampled_from(["shared", "per_modality", "dropless"]))
    factors = [0.25, 0.5, 1.0, 1.25, 2.0]
    cf = ({m: draw(st.sampled_from(factors)) for m in NAMES} if capacity == "per_modality"
          else draw(st.sampled_from(factors)))
    kwargs = dict(num_experts=E, mode=mode, pools=pools, top_k=top_k, capacity_factor=cf, eval_capacity_factor=cf,
                  min_capacity=draw(st.integers(0, 3)), drop_tokens=capacity != "dropless",
                  drop_policy=draw(st.sampled_from(["probs", "position", "random"])))
    batch = dict(S=draw(st.sampled_from([1, 2, 3, 9, 40])), modalities=draw(st.sampled_from(["image", "text", "mixed"])),  # noqa: E501
                 scale=draw(st.sampled_from([0.01, 1.0, 10.0, 50.0, 200.0])), seed=draw(st.integers(0, 2**16)),
                 training=draw(st.booleans()))
    return kwargs, batch


def _check_edges(kwargs: dict, batch: dict) -> None:
    E, pools, top_k = kwargs["num_experts"], kwargs["pools"], kwargs["top_k"]
    cfg = RouterConfig(**kwargs, modality_bias_init_std=0.5 if kwargs["mode"] == "modality_bias" else 0.0,
                       matched_utilization_coef=0.01,
                       matched_utilization_target={m: [1.0 / E] * E for m in NAMES}, **ALL_LOSSES)
    torch.manual_seed(batch["seed"])
    layer = TorchMoE(cfg, 8, 16).train(batch["training"])
    S = batch["S"]
    g = torch.Generator().manual_seed(batch["seed"])
    m = {"image": torch.zeros(S, dtype=torch.long), "text": torch.ones(S, dtype=torch.long),
         "mixed": torch.randint(0, 2, (S,), generator=g)}[batch["modalities"]]
    x = torch.randn(S, 8, generator=g)
    w = layer.deepspeed_moe.gate.wg.weight.detach()
    x = (x / (x @ w.t()).std().clamp(min=1e-6) * batch["scale"]).requires_grad_(True)
    out = layer(x, m)
    (out.hidden_states.sum() + out.aux_loss).backward()
    where = f"{kwargs} {batch}"
    assert bool(torch.isfinite(out.aux_loss)) and bool(torch.isfinite(out.hidden_states).all()), where
    assert _finite_grads(layer, x) == [], where

    routing = out.routing
    logits = routing.logits.detach()
    allowed = [pools[n] if pools else list(range(E)) for n in NAMES]
    ks = [top_k[n] for n in NAMES]
    counts = [int((m == i).sum()) for i in range(2)]
    per_group = isinstance(kwargs["capacity_factor"], dict)
    groups = 2 if per_group else 1
    # Routes the rules choose, before capacity: the k best logits inside the configured pool.
    wanted = torch.zeros(2, E, dtype=torch.long)
    for s in range(S):
        mi = int(m[s])
        for e in sorted(allowed[mi], key=lambda e: -float(logits[s, e]))[:ks[mi]]:
            wanted[mi, e] += 1
    kept = torch.zeros(2, E, dtype=torch.long)
    slots = set()
    if kwargs["drop_tokens"]:
        caps = naive_capacity(counts, num_experts=E, top_k=top_k, capacity_factor=kwargs["capacity_factor"],
                              min_capacity=kwargs["min_capacity"], pools=pools)
    else:  # dropless: each group's buffer fits its busiest expert
        load = wanted if per_group else wanted.sum(0, keepdim=True)
        caps = load.max(1).values.tolist()
    offsets = [0, caps[0]] if per_group else [0]
    assert routing.capacity == max(sum(caps), 1), where
    for k in range(routing.expert_index.shape[0]):
        for s, e in enumerate(routing.expert_index[k].tolist()):
            if e < 0:
                continue
            mi = int(m[s])
            assert e in allowed[mi], f"{where}: token {s} routed to {e} outside its pool {allowed[mi]}"
            assert k < ks[mi]
            kept[mi, e] += 1
            slot, grp = int(routing.slot[k, s]), mi if per_group else 0
            assert offsets[grp] <= slot < offsets[grp] + caps[grp] and (e, slot) not in slots, where
            slots.add((e, slot))
    for s in range(S):  # a token never routes twice to one expert
        chosen = [e for e in routing.expert_index[:, s].tolist() if e >= 0]
        assert len(chosen) == len(set(chosen)), where
    if per_group:
        assert torch.equal(kept, torch.minimum(wanted, torch.tensor(caps)[:, None])), where
    else:
        assert torch.equal(kept.sum(0), torch.minimum(wanted.sum(0), torch.tensor(caps[0]))), where
    # Statistics equal the routing.
    stats = routing.stats
    assert stats.tokens.tolist() == counts, where
    assert torch.equal(stats.routed.long(), wanted), where
    assert torch.equal(stats.kept.long(), kept), where
    assert stats.dropped.long().tolist() == (wanted - kept).sum(1).tolist(), where
    p = torch.softmax(logits.double(), -1)
    entropy = -(torch.where(p > 0, p * p.clamp(min=1e-300).log(), 0.0)).sum(-1)
    for i in range(2):
        want = float(entropy[m == i].mean()) if counts[i] else 0.0
        assert float(stats.entropy[i]) == pytest.approx(want, abs=1e-4), where
    assert groups == len(caps)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_routing_properties_at_the_edges(mode, data):
    _check_edges(*data.draw(edge_configs(mode)))


@pytest.mark.parametrize("mode", MODES)
def test_single_token_at_logit_scale_200(mode):
    """The extreme corner, always run (hypothesis may not draw it): one token, scale 200."""
    for modalities in ("image", "text"):
        pools = {"image": [1, 2], "text": [0, 1, 2]} if mode == "masked_pools" else None
        _check_edges(dict(num_experts=3, mode=mode, pools=pools, top_k={"image": 2, "text": 1}, capacity_factor=0.25,
                          eval_capacity_factor=0.25, min_capacity=0, drop_tokens=True, drop_policy="probs"),
                     dict(S=1, modalities=modalities, scale=200.0, seed=3, training=True))
