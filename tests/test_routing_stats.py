"""Routing statistics count real tokens only, and sum over ranks in one collective.

Padding is routed like any token (the routing, the outputs and the losses do not change) but never
counted: every routing mode, each MoE block (TorchMoE, DeepSpeed's gate, DroplessMoE) and the HF
model, which passes its attention mask down. `RoutingStats.sum_over_ranks` is checked with two
simulated ranks here; tests/test_routing_stats_ranks.py checks it through the real launcher.
"""
from __future__ import annotations

import pytest
import torch
from routing_by_hand import count_real_routes

from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
from mmoe_ds.moe import RouterConfig, RoutingStats, TorchMoE
from mmoe_ds.moe.deepspeed_layer import DeepSpeedMoE
from mmoe_ds.moe.dropless import DroplessMoE

D, F, E = 8, 16, 4
MODES = ("agnostic", "modality_bias", "masked_pools", "separate_routers")
BLOCKS = {"torch": TorchMoE, "deepspeed": DeepSpeedMoE, "dropless": DroplessMoE}
LENGTHS = (5, 3, 7)  # real tokens per sample
PADDED = 9  # the batch's length: sample 0 left-padded, 1 right-padded, 2 left-padded
IMAGE, TEXT = 0, 1


def router_config(mode: str, drop_tokens: bool, capacity_factor: float) -> RouterConfig:
    return RouterConfig(num_experts=E, mode=mode, top_k={"image": 1, "text": 2}, capacity_factor=capacity_factor,
                        eval_capacity_factor=capacity_factor, drop_tokens=drop_tokens, min_capacity=1,
                        pools={"image": [0, 1, 2], "text": [2, 3]} if mode == "masked_pools" else None,
                        modality_bias_init_std=0.5 if mode == "modality_bias" else 0.0)


def make_block(kind: str, cfg: RouterConfig):
    torch.manual_seed(0)
    return BLOCKS[kind](cfg, D, F).eval()


def samples(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden states [n, D], modality ids [n]) of each sample, images first then text."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.full((n,), TEXT)
        ids[: n // 2] = IMAGE
        out.append((torch.randn(n, D, generator=g), ids))
    return out


def padded_batch(parts, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, PADDED] batch of `parts` with left and right padding: padding positions get large random
    hidden states and both modalities, so that they would be counted if they were."""
    g = torch.Generator().manual_seed(seed)
    B = len(parts)
    x = torch.randn(B, PADDED, D, generator=g) * 5
    ids = torch.randint(0, 2, (B, PADDED), generator=g)
    mask = torch.zeros(B, PADDED, dtype=torch.long)
    for b, (xs, ms) in enumerate(parts):
        n = len(ms)
        at = slice(0, n) if b == 1 else slice(PADDED - n, PADDED)
        x[b, at], ids[b, at], mask[b, at] = xs, ms, 1
    return x, ids, mask


def assert_same_stats(got: RoutingStats, want: RoutingStats) -> None:
    assert torch.equal(got.tokens, want.tokens)
    assert torch.equal(got.routed, want.routed)
    assert torch.equal(got.kept, want.kept)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-6, atol=1e-7)


def block_cases():
    for kind in BLOCKS:
        for mode in MODES:
            yield pytest.param(kind, mode, id=f"{kind}-{mode}")


@pytest.mark.parametrize("kind,mode", list(block_cases()))
def test_padding_is_never_counted_and_changes_no_route(kind, mode):
    """Counts of a padded batch (mask given) equal those of the same samples unpadded; with room for
    every route, so that the padding takes no slot the real tokens would need."""
    cfg = router_config(mode, drop_tokens=kind != "dropless", capacity_factor=8.0)
    block = make_block(kind, cfg)
    parts = samples()
    x, ids, mask = padded_batch(parts)
    with torch.no_grad():
        masked = block(x, ids, mask)
        unmasked = block(x, ids)
        alone = block(torch.cat([p[0] for p in parts])[None], torch.cat([p[1] for p in parts])[None])
    assert_same_stats(masked.routing.stats, alone.routing.stats)
    real = int(mask.sum())
    assert masked.routing.stats.tokens.sum() == real < unmasked.routing.stats.tokens.sum() == mask.numel()
    assert masked.routing.stats.tokens[IMAGE] > 0 and masked.routing.stats.tokens[TEXT] > 0
    # the routing itself is the mask's business nowhere else: same routes, gates, outputs, losses
    assert torch.equal(masked.hidden_states, unmasked.hidden_states)
    for field in ("expert_index", "slot", "combine_weight", "logits", "aux_loss"):
        assert torch.equal(getattr(masked.routing, field), getattr(unmasked.routing, field)), field


@pytest.mark.parametrize("kind", ["torch", "deepspeed"])
@pytest.mark.parametrize("mode", MODES)
def test_drops_are_counted_for_real_tokens_only(kind, mode):
    """Tight capacity (padding competes for slots, as it always did): the counts equal a count by
    hand of the real positions' chosen and kept routes."""
    cfg = router_config(mode, drop_tokens=True, capacity_factor=0.5)
    block = make_block(kind, cfg)
    x, ids, mask = padded_batch(samples(seed=2), seed=3)
    with torch.no_grad():
        routing = block(x, ids, mask).routing
    stats = routing.stats
    want = count_real_routes(routing, ids.reshape(-1).tolist(), mask.reshape(-1).tolist(), cfg.top_k_per_modality, E)
    assert stats.tokens.tolist() == want["tokens"]
    assert stats.routed.tolist() == want["routed"]
    assert stats.kept.tolist() == want["kept"]
    assert (stats.routed - stats.kept).sum() > 0  # the case has drops


def test_a_mask_of_the_wrong_size_is_refused():
    block = make_block("torch", router_config("agnostic", True, 2.0))
    x, ids, mask = padded_batch(samples())
    with pytest.raises(ValueError, match="token_mask has 9 entries for 27 tokens"):
        block(x, ids, mask[0])


def test_the_model_passes_its_attention_mask_to_every_moe_layer():
    """A left- and right-padded text batch through the HF model: each MoE layer counts the tokens
    the attention mask marks, with k routes each, and none of the padding."""
    torch.manual_seed(0)
    config = MmoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, moe_intermediate_size=32, num_local_experts=4, moe_layer_frequency=1,
                        num_experts_per_tok={"image": 1, "text": 2}, router={"mode": "modality_bias"})
    model = MmoeForCausalLM(config).eval()
    input_ids = torch.randint(4, 64, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 5:] = 0  # right padding
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask)
        unmasked = model(input_ids=input_ids)
    assert len(out.routing_stats) == 2
    for stats in out.routing_stats:
        assert stats.tokens.tolist() == [0, int(mask.sum())]
        assert stats.routed.sum(1).tolist() == [0, 2 * int(mask.sum())]
    assert [s.tokens.tolist() for s in unmasked.routing_stats] == [[0, 24], [0, 24]]


def fake_stats(seed: int, M: int = 2) -> RoutingStats:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (M,), generator=g).float()
    routed = torch.randint(0, 40, (M, E), generator=g).float()
    return RoutingStats(tokens, routed, (routed - torch.randint(0, 3, (M, E), generator=g)).clamp(min=0),
                        torch.rand(M, generator=g))


def test_sum_over_ranks_is_one_collective_summing_counts_and_weighting_entropy_by_tokens():
    """Two simulated ranks: rank 1's packed tensor is captured, then added in rank 0's all_reduce."""
    rank0, rank1 = [fake_stats(0), fake_stats(1)], [fake_stats(2), fake_stats(3)]
    rank1[1].tokens[0] = 0.0  # a modality one rank did not see
    captured, calls = [], []
    RoutingStats.sum_over_ranks(rank1, lambda t: captured.append(t.clone()))
    before = [s.tokens.clone() for s in rank0]
    summed = RoutingStats.sum_over_ranks(rank0, lambda t: calls.append(t.add_(captured[0])))
    assert len(calls) == 1 and calls[0].dtype == torch.float64
    assert all(torch.equal(a, s.tokens) for a, s in zip(before, rank0))  # the inputs stay as they were
    for got, a, b in zip(summed, rank0, rank1):
        assert torch.equal(got.tokens, (a.tokens + b.tokens).double())
        assert torch.equal(got.routed, (a.routed + b.routed).double())
        assert torch.equal(got.kept, (a.kept + b.kept).double())
        want = (a.entropy.double() * a.tokens + b.entropy.double() * b.tokens) / (a.tokens + b.tokens)
        torch.testing.assert_close(got.entropy, want)
        assert torch.equal(got.dropped, (a.dropped + b.dropped).double())


def test_sum_over_ranks_on_one_process_returns_the_same_statistics():
    stats = [fake_stats(4)]
    (same,) = RoutingStats.sum_over_ranks(stats)  # torch.distributed not initialised: nothing to reduce
    assert same.to_dict(("image", "text")) == stats[0].to_dict(("image", "text"))
    assert RoutingStats.sum_over_ranks([]) == []
