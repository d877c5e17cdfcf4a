"""The 3-D experts (w13 [E, 2f, d], w2 [E, d, f]): grouped-GEMM and batched paths equal the per-expert
loop forward and backward (fp32, CPU); per-expert state dicts (DeepSpeed's files, exports, the layout
before the 3-D parameters) load; hooks, offload and PEFT see the experts because the module is called."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmoe_ds.moe import ExpertFFN, LocalExperts, RouterConfig, TorchMoE
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
    """(y, dL/dx, dL/dparams in named_parameters order) of the sorted contract."""
    experts.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = experts(x, counts, use_grouped=grouped)
    if upstream == "ramp":
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    else:  # y.sum(): an expanded (stride-0) gradient reaches the last GEMM's backward
        y.sum().backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in experts.parameters()]
    return y.detach(), x.grad, grads


def per_expert_grads(experts, grads) -> dict[str, torch.Tensor]:
    """{'e.w1': grad, ...}: the [E, ...] gradients of w13 / w2 split per expert and projection."""
    w13, w2 = grads
    return {f"{e}.{n}": g for e in range(w13.shape[0]) for n, g in experts_mod.expert_slices(w13, w2, e).items()}


def assert_same(experts, got, want, tol=1e-5):
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = got, want
    assert y.shape == y_ref.shape
    assert rel(y, y_ref) <= tol and rel(gx, gx_ref) <= tol
    ref = per_expert_grads(experts, gw_ref)
    for name, a in per_expert_grads(experts, gw).items():
        b = ref[name]
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
    assert len(kernel_calls) == 2  # w13 and w2, one grouped GEMM each: the kernel really ran
    assert_same(experts, got, want)


def test_grouped_path_has_no_host_sync_when_the_kernel_applies(monkeypatch, kernel_calls):
    experts = LocalExperts(E, D, FF)
    counts = torch.tensor(COUNTS[0])
    x = torch.randn(int(counts.sum()), D)

    def no_tolist(self):
        raise AssertionError("host sync: Tensor.tolist() in the grouped path")

    monkeypatch.setattr(torch.Tensor, "tolist", no_tolist)
    experts(x, counts)
    assert len(kernel_calls) == 2


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
        assert len(used) > 2  # the probe, then the two GEMMs


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
    """DeepSpeed's capacity contract: the batched bmm equals a loop over experts; hooked: a hook on the
    experts module fires on each call (DeepSpeed's MOELayer calls the module)."""
    torch.manual_seed(2)
    experts = LocalExperts(4, D, FF)
    x = torch.randn(2, 4, 5, D)  # [ep groups, local experts, capacity, d]
    x[:, 1, 3:] = 0  # empty capacity slots
    upstream = torch.randn(2, 4, 5, D)
    results, calls = [], []
    if hooked:
        _hook_forward(experts, calls)
    for grouped in (True, False):
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = experts(xi, use_grouped=grouped)
        (y * upstream).sum().backward()
        results.append((y.detach(), xi.grad, [p.grad for p in experts.parameters()]))
    assert_same(experts, *results)
    fast = results[0][0]
    assert torch.equal(fast[:, 1, 3:], torch.zeros_like(fast[:, 1, 3:]))
    assert len(calls) == (2 if hooked else 0)


def old_layout(num_experts: int, seed: int) -> torch.nn.ModuleList:
    """The expert layout before the 3-D parameters: one ExpertFFN (nn.Linear w1, w3, w2) per expert."""
    torch.manual_seed(seed)
    return torch.nn.ModuleList(ExpertFFN(D, FF) for _ in range(num_experts))


def test_state_dict_is_3d_in_memory_and_per_expert_for_deepspeed():
    plain, ds = LocalExperts(3, D, FF), LocalExperts(3, D, FF, per_expert_state_dict=True)
    assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == {"w13": (3, 2 * FF, D), "w2": (3, D, FF)}
    per = ds.state_dict()
    assert list(per) == [f"deepspeed_experts.{i}.{w}.weight" for i in range(3) for w in ("w1", "w3", "w2")]
    assert list(per) == experts_mod.per_expert_names("", 3)
    assert all(t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * 4 for t in per.values())
    for e in range(3):  # rows [w1; w3] of w13, then w2: the views and the saved copies agree
        assert torch.equal(per[f"deepspeed_experts.{e}.w1.weight"], ds.w13[e, :FF])
        assert torch.equal(per[f"deepspeed_experts.{e}.w3.weight"], ds.w13[e, FF:])
        assert torch.equal(per[f"deepspeed_experts.{e}.w2.weight"], ds.w2[e])
    assert list(experts_mod.to_per_expert({"a.experts.w13": ds.w13, "a.experts.w2": ds.w2, "b": ds.w2})) == \
        experts_mod.per_expert_names("a.experts.", 3) + ["b"]


@pytest.mark.parametrize("source", ["old per-expert modules", "per-expert state dict", "3-D state dict"])
def test_every_layout_loads_and_computes_what_the_old_modules_did(source):
    """A state dict of the old layout (per-expert nn.Linear modules: what checkpoints and exports
    written before the 3-D parameters hold), of a DeepSpeed layer, or of the 3-D layout loads, and
    the experts compute what the old modules computed on the same rows."""
    old = old_layout(3, seed=7)
    state = old.state_dict()
    state = {f"deepspeed_experts.{k}": v for k, v in state.items()}
    if source != "old per-expert modules":
        via = LocalExperts(3, D, FF, per_expert_state_dict=source == "per-expert state dict")
        via.load_state_dict(state)
        state = via.state_dict()
    experts = LocalExperts(3, D, FF)
    assert not torch.equal(experts.w2[0], old[0].w2.weight)
    experts.load_state_dict(state)
    counts, x = torch.tensor([4, 0, 6]), torch.randn(10, D)
    want = torch.cat([old[0](x[:4]), old[2](x[4:])])
    for grouped in (True, False):
        assert rel(experts(x, counts, use_grouped=grouped), want) <= 1e-6


def test_incomplete_or_mixed_per_expert_state_dicts_are_named():
    experts = LocalExperts(3, D, FF, per_expert_state_dict=True)
    state = experts.state_dict()
    del state["deepspeed_experts.2.w3.weight"]
    with pytest.raises(RuntimeError, match=r"per-expert weights are incomplete.*deepspeed_experts\.2\.w3\.weight"):
        LocalExperts(3, D, FF).load_state_dict(state)
    state = experts.state_dict()
    state["deepspeed_experts.1.w2.weight"] = torch.zeros(D, FF + 1)
    with pytest.raises(RuntimeError, match="do not stack into w13 / w2"):
        LocalExperts(3, D, FF).load_state_dict(state)


def test_initialisation_draws_what_per_expert_linears_drew():
    """nn.Linear's default init per expert and projection, in the old modules' order: the same seed
    starts the same experts as before the 3-D layout."""
    old = old_layout(4, seed=11)
    torch.manual_seed(11)
    experts = LocalExperts(4, D, FF)
    for e in range(4):
        for name, view in experts.expert(e).items():
            assert torch.equal(view, getattr(old[e], name).weight), (e, name)


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
    names = [n for n, _ in layer.named_parameters()]
    grads = []
    for values in (gw, gw_ref):  # the router's gradients by name, the experts' per expert and projection
        named = dict(zip(names, values))
        experts = (named.pop("deepspeed_moe.experts.w13"), named.pop("deepspeed_moe.experts.w2"))
        grads.append({**named, **per_expert_grads(layer.deepspeed_moe.experts, experts)})
    for name, b in grads[1].items():
        a = grads[0][name]
        if b is None or not b.any():  # experts that got no tokens
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
    assert len(kernel_calls) == 2
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
        y = experts(xi, counts, use_grouped=grouped)
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


@pytest.mark.parametrize("how", ["forward_hook", "pre_hook", "replaced_forward", "meta_weight"])
def test_calls_modules_detects_wrapped_hooked_or_offloaded_linears(how):
    """The router's `wg` reads its weight directly unless something wraps or hooks it."""
    module = torch.nn.Sequential(torch.nn.Linear(D, E), torch.nn.Linear(E, E))
    assert not experts_mod.calls_modules(module, (torch.nn.Sequential, torch.nn.Linear))
    calls = []
    if how == "forward_hook":
        _hook_forward(module[1], calls)
    elif how == "pre_hook":
        module[1].register_forward_pre_hook(lambda mod, args: None)
    elif how == "replaced_forward":
        _replace_forward(module[1], calls)
    else:  # accelerate leaves an offloaded weight on the meta device until its module is called
        module[1].weight = torch.nn.Parameter(torch.empty(E, E, device="meta"))
    assert experts_mod.calls_modules(module, (torch.nn.Sequential, torch.nn.Linear))


def test_calls_modules_sees_global_hooks():
    linear = torch.nn.Linear(D, E)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        assert experts_mod.calls_modules(linear)
    finally:
        handle.remove()
    assert not experts_mod.calls_modules(linear)


@pytest.mark.parametrize("how", ["forward_hook", "replaced_forward"])
def test_hooked_experts_fire_on_every_call_and_compute_the_same(how, kernel_calls):
    torch.manual_seed(5)
    experts = LocalExperts(E, D, FF)
    counts, x = torch.tensor(COUNTS[0]), torch.randn(sum(COUNTS[0]), D)
    want = run(experts, x, counts, grouped=True)
    calls = []
    (_hook_forward if how == "forward_hook" else _replace_forward)(experts, calls)
    got = run(experts, x, counts, grouped=True)
    assert len(calls) == 1 and len(kernel_calls) == 4  # the hook fired; both calls took the grouped GEMMs
    assert_same(experts, got, want, tol=0)


def test_peft_lora_on_the_3d_expert_weights_is_each_experts_own_low_rank_update(kernel_calls):
    """PEFT's `target_parameters` LoRA (lora.ParamWrapper) on w13 and w2: it parametrizes the weights
    for the call, so with B = 0 nothing changes, and with B random each expert computes with its own
    W_e + scale · B_e A_e, checked against that sum written out, and the LoRA factors get gradients."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(8)
    layer = torch.nn.ModuleDict({"experts": LocalExperts(E, D, FF)})
    counts, x = torch.tensor(COUNTS[0]), torch.randn(sum(COUNTS[0]), D)
    plain = layer["experts"](x, counts).detach()
    cfg = dict(r=2, lora_alpha=4, target_parameters=["experts.w13", "experts.w2"])
    inject_adapter_in_model(LoraConfig(**cfg), layer)
    wrapped = layer["experts"]
    assert type(wrapped).__name__ == "ParamWrapper"
    assert rel(wrapped(x, counts), plain) == 0  # B = 0 at init: the same function
    torch.manual_seed(9)
    for name, p in layer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    y = wrapped(x, counts)
    assert rel(y, plain) > 1e-2
    base = next(m for m in layer.modules() if isinstance(m, LocalExperts))
    deltas = {}
    for m in layer.modules():
        if type(m).__name__ == "ParamWrapper":
            deltas[m.parameter_name] = m.get_delta_weight("default")
    assert deltas["w13"].shape == base.w13.shape and deltas["w2"].shape == base.w2.shape
    explicit = LocalExperts(E, D, FF)
    with torch.no_grad():
        explicit.w13.copy_(base.w13 + deltas["w13"])
        explicit.w2.copy_(base.w2 + deltas["w2"])
    assert rel(y, explicit(x, counts, use_grouped=False)) <= 1e-5
    y.square().sum().backward()
    lora = {n: p.grad for n, p in layer.named_parameters() if "lora_" in n}
    assert len(lora) == 4 and all(g is not None and g.abs().sum() > 0 for g in lora.values())
    assert base.w13.grad is None  # PEFT froze the base weights


def test_accelerate_cpu_offload_brings_the_expert_weights_in_for_the_call():
    """accelerate's offload leaves w13 / w2 on the meta device; its hook on the experts module (called
    by the layer) loads them for the forward: the same output as the resident layer."""
    from accelerate import cpu_offload

    torch.manual_seed(10)
    cfg = layer_config("modality_bias", drop_tokens=False)
    resident, offloaded = TorchMoE(cfg, D, FF), TorchMoE(cfg, D, FF)
    offloaded.load_state_dict(resident.state_dict())
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.deepspeed_moe.experts.w13.is_meta
    x, m = torch.randn(64, D), torch.randint(0, 2, (64,))
    with torch.no_grad():
        want, got = resident(x, m).hidden_states, offloaded(x, m).hidden_states
    assert torch.equal(got, want)
    assert offloaded.deepspeed_moe.experts.w13.is_meta  # back off the device after the call


@pytest.mark.parametrize("mode", ["modality_bias", "separate_routers", "masked_pools"])
def test_moe_layer_with_hooked_router_and_experts_equals_the_fast_path(mode):
    torch.manual_seed(6)
    cfg = layer_config(mode, drop_tokens=False)
    fast, hooked = TorchMoE(cfg, D, FF), TorchMoE(cfg, D, FF)
    hooked.load_state_dict(fast.state_dict())
    calls = []
    for module in hooked.modules():
        if isinstance(module, (torch.nn.Linear, type(hooked.deepspeed_moe.gate), LocalExperts)):
            _hook_forward(module, calls)
    x, m = torch.randn(64, D) * 3, torch.randint(0, 2, (64,))
    want, got = layer_run(fast, x, m), layer_run(hooked, x, m)
    gate = hooked.deepspeed_moe.gate
    assert gate in calls and gate.wg in calls  # the router and its projection ran as modules
    assert hooked.deepspeed_moe.experts in calls
    assert torch.equal(got[0].routing.logits, want[0].routing.logits)  # fp32: the module call is the same GEMM
    assert_layers_same(hooked, got, want)


@pytest.mark.parametrize("layer", ["deepspeed", "dropless"])
def test_deepspeed_sees_the_3d_weights_as_expert_parameters_and_names_them_per_expert(layer):
    """DeepSpeed's engine keeps expert parameters out of the data-parallel all-reduce and in their own
    optimizer groups by `is_moe_param` (allreduce=False, group_name); its checkpointing finds experts by
    `deepspeed_experts.{e}.` in the MoE layer's state dict (one file per global expert)."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    module = "mmoe_ds.moe.deepspeed_layer" if layer == "deepspeed" else "mmoe_ds.moe.dropless"
    cls = getattr(__import__(module, fromlist=["x"]), "DeepSpeedMoE" if layer == "deepspeed" else "DroplessMoE")
    moe = cls(layer_config("modality_bias", drop_tokens=False, ep_size=2), D, FF)
    experts = moe.deepspeed_moe.experts
    assert experts.w13.shape == (E // 2, 2 * FF, D) and experts.w2.shape == (E // 2, D, FF)
    expert_params = {n for n, p in moe.named_parameters() if is_moe_param(p)}
    assert expert_params == {"deepspeed_moe.experts.w13", "deepspeed_moe.experts.w2"}
    assert {p.group_name for p in (experts.w13, experts.w2)} == {moe.expert_group_name}
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(moe.parameters()), "name": "p"})
    moe_groups = [g for g in groups if g.get("moe")]
    assert len(moe_groups) == 1 and {id(p) for p in moe_groups[0]["params"]} == {id(experts.w13), id(experts.w2)}
    keys = [k for k in moe.state_dict() if ".experts." in k]
    assert keys == experts_mod.per_expert_names("deepspeed_moe.experts.", E // 2)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("upstream", ["ramp", "sum"])
def test_no_rows_at_all_gives_an_empty_output_and_zero_gradients(grouped, upstream):
    """A rank whose experts receive no rows (skewed routing, an empty micro batch): the experts run on
    [0, d] and every weight gets an exact-zero gradient, also when y.sum() sends an expanded empty
    gradient (zero strides), which torch's grouped GEMM backward refused before."""
    experts = LocalExperts(E, D, FF)
    y, gx, (g13, g2) = run(experts, torch.zeros(0, D), torch.zeros(E, dtype=torch.long), grouped, upstream)
    assert y.shape == (0, D) and gx.shape == (0, D)
    assert g13.shape == experts.w13.shape and not g13.any() and not g2.any()
