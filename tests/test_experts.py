"""Grouped-GEMM expert paths equal the per-expert loop, forward and backward (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmoe_ds.moe import LocalExperts, RouterConfig, TorchMoE
from mmoe_ds.moe import experts as experts_mod

E, D, FF = 8, 16, 32


def rel(a, b):
    """Max abs difference relative to the reference's max abs value."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the grouped GEMM kernel that `experts` picks (the real one, wrapped)."""
    real, calls = experts_mod._grouped_mm_fn(), []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(experts_mod, "_grouped_mm_fn", lambda: spy)
    assert experts_mod._kernel_works(spy, torch.device("cpu"), torch.float32)  # the one-off probe
    calls.clear()
    return calls


def run(experts, x, counts, grouped, upstream="ramp"):
    """(y, dL/dx, dL/dparams in named_parameters order) of forward_sorted."""
    experts.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = experts.forward_sorted(x, counts, use_grouped=grouped)
    if upstream == "ramp":
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    else:  # y.sum(): an expanded (stride-0) gradient reaches the last GEMM's backward
        y.sum().backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in experts.parameters()]
    return y.detach(), x.grad, grads


def assert_same(experts, got, want, tol=1e-5):
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = got, want
    assert y.shape == y_ref.shape
    assert rel(y, y_ref) <= tol and rel(gx, gx_ref) <= tol
    for (name, _), a, b in zip(experts.named_parameters(), gw, gw_ref):
        if b.abs().max() == 0:  # an expert without tokens gets exactly zero gradient on both paths
            assert torch.equal(a, b), name
        else:
            assert rel(a, b) <= tol, name


def random_counts(seed: int, empty: list[int], tokens: int = 40) -> list[int]:
    """Random routing of `tokens` rows over E experts, none to the experts in `empty`."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    chosen = allowed[torch.randint(len(allowed), (tokens,), generator=g)]
    return torch.bincount(chosen, minlength=E).tolist()


COUNTS = [
    [5, 0, 7, 3, 0, 9, 1, 0],      # empty experts in the middle and at the end
    [0, 0, 0, 20, 0, 0, 0, 0],     # everything on one expert
    [0, 4, 4, 4, 4, 4, 4, 0],      # first and last empty
    [37, 0, 0, 0, 0, 0, 0, 0],     # everything on the first expert
    [0, 0, 0, 0, 0, 0, 0, 11],     # everything on the last expert
    random_counts(0, empty=[0, 7]),
    random_counts(1, empty=[2, 3, 5]),
    random_counts(2, empty=[]),
]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("upstream", ["ramp", "sum"])
def test_grouped_equals_loop_forward_and_backward(counts, upstream, kernel_calls):
    torch.manual_seed(0)
    experts = LocalExperts(E, D, FF)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), D)
    want = run(experts, x, counts, grouped=False, upstream=upstream)
    assert not kernel_calls
    got = run(experts, x, counts, grouped=True, upstream=upstream)
    assert len(kernel_calls) == 3  # w1, w3, w2 each one grouped GEMM: the kernel really ran
    assert_same(experts, got, want)


def test_grouped_path_has_no_host_sync_when_the_kernel_applies(monkeypatch, kernel_calls):
    experts = LocalExperts(E, D, FF)
    counts = torch.tensor(COUNTS[0])
    x = torch.randn(int(counts.sum()), D)

    def no_tolist(self):
        raise AssertionError("host sync: Tensor.tolist() in the grouped path")

    monkeypatch.setattr(torch.Tensor, "tolist", no_tolist)
    experts.forward_sorted(x, counts)
    assert len(kernel_calls) == 3


@pytest.mark.parametrize("why", ["unavailable", "refuses", "unaligned", "torch._grouped_mm only"])
def test_fallbacks_equal_loop(monkeypatch, why):
    torch.manual_seed(1)
    d = 10 if why == "unaligned" else D  # 10 fp32 = 40-byte rows: the kernel wants 16-byte multiples
    used = []
    if why == "unavailable":
        monkeypatch.setattr(experts_mod, "_grouped_mm_fn", lambda: None)
    elif why == "refuses":
        def refuse(*args, **kwargs):
            used.append(1)
            raise RuntimeError("grouped_mm: unsupported")
        monkeypatch.setattr(experts_mod, "_grouped_mm_fn", lambda: refuse)
    elif why == "torch._grouped_mm only":
        real = torch._grouped_mm
        monkeypatch.delattr(F, "grouped_mm", raising=False)
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: used.append(1) or real(*a, **k))
    experts = LocalExperts(4, d, 24)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, d)
    want = run(experts, x, counts, grouped=False)
    got = run(experts, x, counts, grouped=True)
    assert_same(experts, got, want, tol=1e-6 if why != "torch._grouped_mm only" else 1e-5)
    if why == "refuses":
        assert used == [1]  # probed once, then the loop
    if why == "torch._grouped_mm only":
        assert len(used) > 3  # the probe, then the three GEMMs


def test_kernel_probe_is_not_fooled_by_inference_mode():
    real = experts_mod._grouped_mm_fn()
    fresh = lambda *a, **k: real(*a, **k)  # noqa: E731 - a new function: not in the probe's cache
    with torch.inference_mode():
        assert experts_mod._kernel_works(fresh, torch.device("cpu"), torch.float32)


def test_grouped_linear_loop_reads_sizes_from_offsets(monkeypatch):
    monkeypatch.setattr(experts_mod, "_grouped_mm_fn", lambda: None)
    x, w = torch.randn(7, 16), torch.randn(3, 8, 16)
    y = experts_mod.grouped_linear(x, w, torch.tensor([2, 2, 7], dtype=torch.int32))
    want = torch.cat([x[:2] @ w[0].t(), x[2:] @ w[2].t()])
    assert torch.allclose(y, want, atol=1e-6)
    assert experts_mod.grouped_linear(x[:0], w, torch.zeros(3, dtype=torch.int32)).shape == (0, 8)


def test_padded_bmm_equals_deepspeed_style_loop():
    torch.manual_seed(2)
    experts = LocalExperts(4, D, FF)
    x = torch.randn(2, 4, 5, D)  # [ep groups, local experts, capacity, d]
    x[:, 1, 3:] = 0  # empty capacity slots
    upstream = torch.randn(2, 4, 5, D)
    results = []
    for fn in (experts.forward, experts.forward_loop):
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        (y * upstream).sum().backward()
        results.append((y.detach(), xi.grad, [p.grad for p in experts.parameters()]))
    assert_same(experts, *results)
    fast = results[0][0]
    assert torch.equal(fast[:, 1, 3:], torch.zeros_like(fast[:, 1, 3:]))


def test_state_dict_layout_is_deepspeeds_per_expert_naming():
    keys = list(LocalExperts(3, D, FF).state_dict())
    assert keys == [f"deepspeed_experts.{i}.{w}.weight" for i in range(3) for w in ("w1", "w3", "w2")]


@pytest.mark.parametrize("mode,drop", [("agnostic", False), ("modality_bias", False), ("masked_pools", False),
                                       ("modality_bias", True), ("masked_pools", True)])
def test_moe_layer_grouped_equals_loop(mode, drop, kernel_calls):
    torch.manual_seed(3)
    cfg = RouterConfig(num_experts=E, mode=mode, top_k={"image": 1, "text": 2}, capacity_factor=0.75,
                       drop_tokens=drop, modality_bias_init_std=1.0 if mode == "modality_bias" else 0.0,
                       pools={"image": [0, 1, 2, 3], "text": [3, 4, 5]} if mode == "masked_pools" else None)
    grouped, loop = TorchMoE(cfg, D, FF, use_grouped=True), TorchMoE(cfg, D, FF, use_grouped=False)
    loop.load_state_dict(grouped.state_dict())
    x, m = torch.randn(64, D) * 3, torch.randint(0, 2, (64,))
    outs = []
    for layer in (grouped, loop):
        xi = x.clone().requires_grad_(True)
        out = layer(xi, m)
        (out.hidden_states.square().sum() + out.aux_loss).backward()
        outs.append((out.hidden_states.detach(), xi.grad, [p.grad for p in layer.parameters()]))
        kept = out.routing.stats.kept.sum(0)
    assert len(kernel_calls) == 3
    if mode == "masked_pools":
        assert kept[6:].sum() == 0  # experts 6, 7 are in no pool: zero tokens, including the last expert
    assert (int(out.routing.stats.dropped.sum()) > 0) == drop  # capacity drops exercised when enabled
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = outs
    assert rel(y, y_ref) <= 1e-5 and rel(gx, gx_ref) <= 1e-5
    for (name, _), a, b in zip(grouped.named_parameters(), gw, gw_ref):
        if b is None:  # experts that got no tokens on the loop path
            assert a is None or not a.any(), name
        else:
            assert rel(a, b) <= 1e-5, name


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
                    reason="needs a GPU with bf16 (the bf16 grouped kernel)")
def test_grouped_equals_loop_bf16_cuda():
    torch.manual_seed(4)
    experts = LocalExperts(E, 256, 512).cuda().bfloat16()
    counts = torch.tensor([0, 300, 0, 1000, 17, 0, 700, 0], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
    results = []
    for grouped in (True, False):
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = experts.forward_sorted(xi, counts, use_grouped=grouped)
        y.float().square().sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad if p.grad is not None else torch.zeros_like(p)
                                                for p in experts.parameters()])
    for a, b in zip(*results):
        err = float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))
        assert err <= 1e-2 or (not b.any() and not a.any())
