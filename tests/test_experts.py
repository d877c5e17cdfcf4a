"""Grouped-GEMM expert paths equal the per-expert loop, forward and backward (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmoe_ds.moe import LocalExperts, RouterConfig, TorchMoE
from mmoe_ds.moe import experts as experts_mod


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def run(experts, x, counts, grouped):
    for p in experts.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    y = experts.forward_sorted(x, counts, use_grouped=grouped)
    upstream = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * upstream).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in experts.parameters()]


@pytest.mark.parametrize("counts", [
    [5, 0, 7, 3, 0, 9, 1, 0],      # empty experts in the middle and at the end
    [0, 0, 0, 20, 0, 0, 0, 0],     # everything on one expert
    [0, 4, 4, 4, 4, 4, 4, 0],      # first and last empty
    [3, 1, 2, 5, 8, 13, 2, 1],
])
def test_grouped_equals_loop_forward_and_backward(counts):
    torch.manual_seed(0)
    experts = LocalExperts(8, 16, 32)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 16)
    y_loop, gx_loop, gw_loop = run(experts, x, counts, grouped=False)
    y_grp, gx_grp, gw_grp = run(experts, x, counts, grouped=True)
    assert rel(y_grp, y_loop) <= 1e-5 and rel(gx_grp, gx_loop) <= 1e-5
    for name_grad, (a, b) in zip(experts.named_parameters(), zip(gw_grp, gw_loop)):
        if b.abs().max() == 0:  # experts with no tokens get exactly zero gradient on both paths
            assert torch.equal(a, b), name_grad[0]
        else:
            assert rel(a, b) <= 1e-5, name_grad[0]


def test_grouped_kernel_is_really_used_on_cpu_fp32():
    x, w = torch.randn(10, 16), torch.randn(3, 8, 16)
    assert experts_mod._grouped_mm_fn() is not None and experts_mod._grouped_mm_supported(x, w)
    assert not experts_mod._grouped_mm_supported(torch.randn(10, 10), torch.randn(3, 8, 10))  # unaligned rows


@pytest.mark.parametrize("why", ["unavailable", "unaligned"])
def test_fallback_loop_when_grouped_mm_cannot_run(monkeypatch, why):
    torch.manual_seed(1)
    d = 10 if why == "unaligned" else 16
    if why == "unavailable":
        monkeypatch.setattr(experts_mod, "_grouped_mm_fn", lambda: None)
    experts = LocalExperts(4, d, 24)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, d)
    a, ga, _ = run(experts, x, counts, grouped=True)
    b, gb, _ = run(experts, x, counts, grouped=False)
    assert rel(a, b) <= 1e-6 and rel(ga, gb) <= 1e-6


def test_padded_bmm_equals_deepspeed_style_loop():
    torch.manual_seed(2)
    experts = LocalExperts(4, 16, 32)
    x = torch.randn(2, 4, 5, 16)  # [ep groups, local experts, capacity, d]
    x[:, 1, 3:] = 0  # empty capacity slots
    fast, slow = experts(x), experts.forward_loop(x)
    assert rel(fast, slow) <= 1e-5
    assert torch.equal(fast[:, 1, 3:], torch.zeros_like(fast[:, 1, 3:]))


@pytest.mark.parametrize("mode", ["agnostic", "modality_bias", "masked_pools"])
def test_moe_layer_grouped_equals_loop(mode):
    torch.manual_seed(3)
    cfg = RouterConfig(num_experts=8, mode=mode, top_k={"image": 1, "text": 2}, capacity_factor=0.75,
                       pools={"image": [0, 1, 2, 3], "text": [3, 4, 5]} if mode == "masked_pools" else None)
    grouped, loop = TorchMoE(cfg, 16, 32, use_grouped=True), TorchMoE(cfg, 16, 32, use_grouped=False)
    loop.load_state_dict(grouped.state_dict())
    x, m = torch.randn(64, 16) * 3, torch.randint(0, 2, (64,))
    outs = []
    for layer in (grouped, loop):
        xi = x.clone().requires_grad_(True)
        out = layer(xi, m)
        (out.hidden_states.square().sum() + out.aux_loss).backward()
        outs.append((out.hidden_states.detach(), xi.grad, layer.deepspeed_moe.gate.wg.weight.grad))
    assert int(out.routing.stats.dropped.sum()) > 0  # capacity drops are exercised too
    for a, b in zip(*outs):
        assert rel(a, b) <= 1e-5
