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


@pytest.mark.parametrize("hooked", [False, True])
def test_padded_bmm_equals_deepspeed_style_loop(hooked):
    """DeepSpeed's capacity contract; hooked: `forward` itself must take the module loop (the hooks fire)."""
    torch.manual_seed(2)
    experts = LocalExperts(4, D, FF)
    x = torch.randn(2, 4, 5, D)  # [ep groups, local experts, capacity, d]
    x[:, 1, 3:] = 0  # empty capacity slots
    upstream = torch.randn(2, 4, 5, D)
    results, calls = [], []
    if hooked:
        for expert in experts.deepspeed_experts:
            _hook_forward(expert.w2, calls)
    for fn in (experts.forward, experts.forward_loop):
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        (y * upstream).sum().backward()
        results.append((y.detach(), xi.grad, [p.grad for p in experts.parameters()]))
    assert_same(experts, *results)
    fast = results[0][0]
    assert torch.equal(fast[:, 1, 3:], torch.zeros_like(fast[:, 1, 3:]))
    assert len(calls) == (2 * 4 if hooked else 0)  # forward and the loop: each expert's w2 once


def test_state_dict_layout_is_deepspeeds_per_expert_naming():
    keys = list(LocalExperts(3, D, FF).state_dict())
    assert keys == [f"deepspeed_experts.{i}.{w}.weight" for i in range(3) for w in ("w1", "w3", "w2")]


def layer_config(mode: str, **kw) -> RouterConfig:
    return RouterConfig(num_experts=E, mode=mode, top_k={"image": 1, "text": 2},
                        modality_bias_init_std=1.0 if mode == "modality_bias" else 0.0,
                        pools={"image": [0, 1, 2, 3], "text": [3, 4, 5]} if mode == "masked_pools" else None, **kw)


def layer_run(layer: TorchMoE, x: torch.Tensor, m: torch.Tensor):
    """(MoEOutput, dL/dx, dL/dparams in parameters order) of one forward and backward."""
    xi = x.clone().requires_grad_(True)
    out = layer(xi, m)
    (out.hidden_states.square().sum() + out.aux_loss).backward()
    return out, xi.grad, [p.grad for p in layer.parameters()]


def assert_layers_same(layer: TorchMoE, got, want) -> None:
    (out, gx, gw), (ref, gx_ref, gw_ref) = got, want
    assert rel(out.hidden_states, ref.hidden_states) <= 1e-5 and rel(gx, gx_ref) <= 1e-5
    for (name, _), a, b in zip(layer.named_parameters(), gw, gw_ref):
        if b is None:  # experts that got no tokens on the reference path
            assert a is None or not a.any(), name
        else:
            assert rel(a, b) <= 1e-5, name


@pytest.mark.parametrize("mode,drop", [("agnostic", False), ("modality_bias", False), ("masked_pools", False),
                                       ("modality_bias", True), ("masked_pools", True)])
def test_moe_layer_grouped_equals_loop(mode, drop, kernel_calls):
    torch.manual_seed(3)
    cfg = layer_config(mode, capacity_factor=0.75, drop_tokens=drop)
    grouped, loop = TorchMoE(cfg, D, FF, use_grouped=True), TorchMoE(cfg, D, FF, use_grouped=False)
    loop.load_state_dict(grouped.state_dict())
    x, m = torch.randn(64, D) * 3, torch.randint(0, 2, (64,))
    outs = [layer_run(layer, x, m) for layer in (grouped, loop)]
    out = outs[1][0]
    kept = out.routing.stats.kept.sum(0)
    assert len(kernel_calls) == 3
    if mode == "masked_pools":
        assert kept[6:].sum() == 0  # experts 6, 7 are in no pool: zero tokens, including the last expert
    assert (int(out.routing.stats.dropped.sum()) > 0) == drop  # capacity drops exercised when enabled
    assert_layers_same(grouped, *outs)


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


# -- experts and router called as modules when wrapped or hooked (PEFT, accelerate offload, user hooks) --
def _hook_forward(module: torch.nn.Module, calls: list) -> None:
    module.register_forward_hook(lambda mod, args, out: calls.append(mod))


def _replace_forward(module: torch.nn.Module, calls: list) -> None:
    """What accelerate's add_hook_to_module does: a `forward` set on the instance (plus `_hf_hook`)."""
    original = module.forward

    def forward(*args, **kwargs):
        calls.append(module)
        return original(*args, **kwargs)

    module.forward = forward
    module._hf_hook = object()


def _wrap_in_lora(experts: LocalExperts, calls: list) -> None:
    """PEFT's LoRA layer around expert 0's w1 (B initialised to zero: same numbers, a wrapper type)."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["deepspeed_experts.0.w1"]), experts)
    experts.requires_grad_(True)  # PEFT freezes the base weights; the comparison wants their gradients too
    _hook_forward(experts.deepspeed_experts[0].w1.lora_A["default"], calls)


@pytest.mark.parametrize("how", ["forward_hook", "pre_hook", "replaced_forward", "peft_lora", "meta_weight"])
def test_calls_modules_detects_wrapped_hooked_or_offloaded_experts(how):
    experts = LocalExperts(E, D, FF)
    assert not experts.calls_modules  # plain nn.Linear experts: the stacked fast path
    w2 = experts.deepspeed_experts[3].w2
    calls = []
    if how == "forward_hook":
        _hook_forward(w2, calls)
    elif how == "pre_hook":
        w2.register_forward_pre_hook(lambda mod, args: None)
    elif how == "replaced_forward":
        _replace_forward(w2, calls)
    elif how == "peft_lora":
        _wrap_in_lora(experts, calls)
    else:  # accelerate leaves an offloaded weight on the meta device until its module is called
        w2.weight = torch.nn.Parameter(torch.empty(w2.weight.shape, device="meta"))
    assert experts.calls_modules


def test_calls_modules_sees_global_hooks():
    experts = LocalExperts(E, D, FF)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        assert experts.calls_modules
    finally:
        handle.remove()
    assert not experts.calls_modules


@pytest.mark.parametrize("how", ["forward_hook", "replaced_forward", "peft_lora"])
def test_hooked_experts_run_as_modules_and_equal_the_grouped_path(how, kernel_calls):
    torch.manual_seed(5)
    experts = LocalExperts(E, D, FF)
    counts, x = torch.tensor(COUNTS[0]), torch.randn(sum(COUNTS[0]), D)
    want = run(experts, x, counts, grouped=True)
    assert len(kernel_calls) == 3  # the fast path, before any hook
    calls = []
    if how == "peft_lora":
        _wrap_in_lora(experts, calls)
    else:
        for expert in experts.deepspeed_experts:
            (_hook_forward if how == "forward_hook" else _replace_forward)(expert.w1, calls)
    got = run(experts, x, counts, grouped=True)
    assert len(kernel_calls) == 3, "a hooked expert went through the stacked grouped GEMM"
    assert len(calls) == (1 if how == "peft_lora" else E)  # every expert's w1 (LoRA: its lora_A) was called
    if how == "peft_lora":  # the LoRA parameters come first in expert 0's parameter order: compare the rest
        got = (got[0], got[1], [g for (n, _), g in zip(experts.named_parameters(), got[2]) if "lora" not in n])
    assert rel(got[0], want[0]) <= 1e-5 and rel(got[1], want[1]) <= 1e-5
    for a, b in zip(got[2], want[2]):
        assert (not b.any() and not a.any()) or rel(a, b) <= 1e-5


@pytest.mark.parametrize("mode", ["modality_bias", "separate_routers", "masked_pools"])
def test_moe_layer_with_hooked_router_and_experts_equals_the_fast_path(mode):
    torch.manual_seed(6)
    cfg = layer_config(mode, drop_tokens=False)
    fast, hooked = TorchMoE(cfg, D, FF), TorchMoE(cfg, D, FF)
    hooked.load_state_dict(fast.state_dict())
    calls = []
    for module in hooked.modules():
        if isinstance(module, (torch.nn.Linear, type(hooked.deepspeed_moe.gate))):
            _hook_forward(module, calls)
    x, m = torch.randn(64, D) * 3, torch.randint(0, 2, (64,))
    want, got = layer_run(fast, x, m), layer_run(hooked, x, m)
    gate = hooked.deepspeed_moe.gate
    assert gate in calls and gate.wg in calls  # the router and its projection ran as modules
    assert torch.equal(got[0].routing.logits, want[0].routing.logits)  # fp32: the module call is the same GEMM
    assert_layers_same(hooked, got, want)
