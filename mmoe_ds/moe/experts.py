"""Expert FFNs: one module holds a rank's experts as two 3-D parameters.

Shapes (the suffixes name them, as in torchtitan's moe.py):
  E  local experts    d  hidden size    f  expert intermediate size
  N  rows (token copies) sorted by expert, `tokens_per_expert` [E] rows each

`LocalExperts` holds w13_EFD = [w1; w3] stacked per expert ([E, 2f, d]: rows 0..f-1 are the gate
projection w1, rows f..2f-1 the up projection w3) and w2_EDF ([E, d, f]), the layout of
transformers' Mixtral `gate_up_proj` / `down_proj`. Nothing is stacked per step. Its `forward` is
the only way the compute paths reach the weights, so a module-level hook (accelerate's offload,
PEFT's `target_parameters` LoRA, which parametrizes `w13`/`w2` for the call) sees every use:
  * capacity contract (DeepSpeed's MOELayer): x [groups, E, capacity, d] -> same shape, batched bmm;
  * sorted contract (dropless): x [N, d] sorted by expert, `tokens_per_expert` [E] -> [N, d], grouped
    GEMM (`torch.nn.functional.grouped_mm`, then `torch._grouped_mm`, then a loop over experts).
`use_grouped=False` is the reference: a loop over the experts, each its own three matmuls.

On disk, names stay per expert (`deepspeed_experts.{e}.w1.weight`, `.w3.weight`, `.w2.weight`,
DeepSpeed's own naming), so exports, upcycled folders and checkpoints written before the 3-D
layout load unchanged:
  * `load_state_dict` takes either naming (a load pre-hook stacks per-expert weights);
  * `state_dict()` holds w13 / w2 like any module, except with `per_expert_state_dict=True` (the
    DeepSpeed layers set it): DeepSpeed's engine finds experts in the MoE layer's state dict by the
    `deepspeed_experts.{e}.` prefix to write one checkpoint file per global expert, which is what
    keeps its checkpoints independent of the expert-parallel size;
  * transformers' `save_pretrained` / `from_pretrained` convert with the mapping
    `mmoe_ds.model.modeling_mmoe` registers (`HF_CONVERSIONS` below).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTIONS = ("w1", "w3", "w2")  # per-expert names on disk, in the order an expert's weights are listed
# A per-expert name: (the experts module's prefix, expert id, projection).
PER_EXPERT = re.compile(r"^(.*)deepspeed_experts\.(\d+)\.(w1|w3|w2)\.weight$")
HELD_IN = {"w1": "w13", "w3": "w13", "w2": "w2"}  # per-expert projection -> the 3-D parameter holding it


class ExpertFFN(nn.Module):
    """SwiGLU feed-forward (Mixtral's w1/w3/w2); the dense layers' FFN."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def calls_modules(module: nn.Module, plain_types: tuple[type, ...] = (nn.Linear,)) -> bool:
    """Whether `module` must be run by calling it (and its submodules) rather than by reading their weights.

    True when any module in it is not exactly one of `plain_types` (a wrapper such as PEFT's
    `lora.Linear`, a parametrized or quantised linear), is hooked (forward / backward hooks, an
    accelerate `_hf_hook`, a `forward` replaced on the instance) or holds weights on the meta
    device; also when global module hooks are registered. Checked on every forward (hooks come and
    go), so it reads the modules' own dicts directly: a few microseconds per module. (The router's
    `wg` uses it: its fp32 logits read the weight directly when nothing wraps it.)
    """
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks:
        return True
    stack = [module]
    while stack:
        m = stack.pop()
        d = m.__dict__
        if (type(m) not in plain_types or d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"]
                or d["_backward_pre_hooks"] or "_hf_hook" in d or "forward" in d):
            return True
        for p in d["_parameters"].values():
            if p is not None and p.is_meta:
                return True
        stack.extend(d["_modules"].values())
    return False


def swiglu(h13: Tensor) -> Tensor:
    """silu(a) · b for h13 = [a | b] (last dim 2f) -> last dim f, in h13's dtype."""
    a, b = h13.chunk(2, dim=-1)
    return F.silu(a) * b


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class _MaterialisedGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped_mm's backward rejects
    expanded (stride-0) gradients, such as the one `y.sum().backward()` sends."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if grad.numel() == 0:  # an empty expanded gradient counts as contiguous but keeps its 0 strides
            return grad.new_zeros(grad.shape)
        return grad.contiguous()


def grouped_linear(x_ND: Tensor, w_EOI: Tensor, offsets_E: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Rows of x [N, in] sorted by group times each group's weight [E, out, in]^T -> [N, out].

    `offsets_E` are the cumulative row ends (int32, on x's device). Where no grouped GEMM kernel
    applies (old torch, unaligned rows, a kernel that refuses the dtype or device) it loops over
    the groups, which needs their sizes on the host: `sizes`, else read from `offsets_E` (a sync).
    """
    if _grouped_mm_supported(x_ND, w_EOI):
        return _MaterialisedGrad.apply(_grouped_mm_fn()(x_ND, w_EOI.transpose(-2, -1), offs=offsets_E))
    if sizes is None:
        sizes = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
    outs = [chunk @ w.t() for chunk, w in zip(x_ND.split(sizes), w_EOI)]
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w_EOI.shape[1])


def _grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """A kernel exists, rows are 16-byte aligned, and it works forward and backward for this
    device and dtype (probed once). On CUDA only bf16 on sm90+ has torch's fast kernel."""
    fn = _grouped_mm_fn()
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], weight.shape[-2]))
    if fn is None or not aligned or x.dtype != weight.dtype:
        return False
    if x.is_cuda and (x.dtype != torch.bfloat16 or _cuda_major(x.device.index) < 9):
        return False
    return _kernel_works(fn, x.device, x.dtype)


@functools.lru_cache(maxsize=None)
def _cuda_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


@functools.lru_cache(maxsize=None)
def _kernel_works(fn, device: torch.device, dtype: torch.dtype) -> bool:
    try:  # outside inference mode, or a first call there would disable the kernel for good
        with torch.inference_mode(False), torch.enable_grad():
            a = torch.ones(32, 64, device=device, dtype=dtype, requires_grad=True)
            b = torch.ones(2, 64, 64, device=device, dtype=dtype, requires_grad=True)
            out = fn(a, b.transpose(-2, -1), offs=torch.tensor([8, 32], device=device, dtype=torch.int32))
            _MaterialisedGrad.apply(out).sum().backward()
        return bool(torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def expert_slices(w13_EFD: Tensor, w2_EDF: Tensor, expert: int) -> dict[str, Tensor]:
    """Views of one expert's per-expert weights: {"w1": [f, d], "w3": [f, d], "w2": [d, f]}."""
    f = w2_EDF.shape[-1]
    return {"w1": w13_EFD[expert, :f], "w3": w13_EFD[expert, f:], "w2": w2_EDF[expert]}


def per_expert_names(prefix: str, num_experts: int) -> list[str]:
    """The on-disk names of a `LocalExperts` at `prefix`, in state-dict order."""
    return [f"{prefix}deepspeed_experts.{e}.{p}.weight" for e in range(num_experts) for p in PROJECTIONS]


class LocalExperts(nn.Module):
    """The E_local SwiGLU experts held by this rank: w13 [E, 2f, d] and w2 [E, d, f].

    `expert_group_name` marks both parameters the way `deepspeed.moe.experts.Experts` marks expert
    parameters (`allreduce=False`, `group_name`): DeepSpeed's engine then reduces their gradients
    in the expert-data-parallel group only, and its optimizer keeps them in their own groups.
    `per_expert_state_dict`: `state_dict()` names the weights per expert (what DeepSpeed's
    per-expert checkpoint files need); `load_state_dict` accepts both namings either way.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 expert_group_name: str | None = None, per_expert_state_dict: bool = False):
        super().__init__()
        self.num_local_experts = num_experts
        self.per_expert_state_dict = per_expert_state_dict
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()
        if expert_group_name is not None:
            for param in (self.w13, self.w2):
                param.allreduce = False
                param.group_name = expert_group_name
        self.register_state_dict_post_hook(_write_per_expert)
        self.register_load_state_dict_pre_hook(_read_per_expert)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation per expert and projection, in the order a list of
        per-expert `nn.Linear`s would draw it (w1, w3, w2 of expert 0, then expert 1, ...)."""
        if self.w13.is_meta:
            return
        for e in range(self.num_local_experts):
            for w in self.expert(e).values():
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def expert(self, e: int) -> dict[str, Tensor]:
        """Views of expert e's weights by per-expert name: {"w1", "w3", "w2"} (writable)."""
        return expert_slices(self.w13, self.w2, e)

    def extra_repr(self) -> str:
        return (f"num_local_experts={self.num_local_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}")

    def forward(self, x: Tensor, tokens_per_expert: Tensor | None = None, sizes: list[int] | None = None,
                act: Callable[[Tensor], Tensor] = swiglu, use_grouped: bool = True) -> Tensor:
        """Run the experts (see the module docstring for the two contracts).

        Args:
            x: [groups, E, capacity, d] (capacity contract), or [N, d] rows sorted by expert.
            tokens_per_expert: [E] rows per expert (sorted contract), on x's device.
            sizes: the same on the host where the caller knows it (saves a read back).
            act: the SwiGLU over w13's output (the torch one, or a fused kernel).
            use_grouped: False runs the reference loop over experts.
        """
        w13_EFD, w2_EDF = self.w13.to(x.dtype), self.w2.to(x.dtype)  # read once: a parametrization runs once
        if tokens_per_expert is None:
            return self._capacity(x, w13_EFD, w2_EDF, act, use_grouped)
        if not use_grouped:
            return _loop(x, w13_EFD, w2_EDF, tokens_per_expert.tolist() if sizes is None else sizes, act)
        offsets_E = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        # w13 [E, 2f, d] checks both widths (d and 2f; f is half of it) the GEMMs use: one decision, one sync at most.
        if sizes is None and not _grouped_mm_supported(x, w13_EFD):
            sizes = tokens_per_expert.tolist()
        h_NF = act(grouped_linear(x, w13_EFD, offsets_E, sizes))
        return grouped_linear(h_NF, w2_EDF, offsets_E, sizes)

    def _capacity(self, x_GECD: Tensor, w13_EFD: Tensor, w2_EDF: Tensor, act, use_grouped: bool) -> Tensor:
        G, E, C, d = x_GECD.shape
        x_END = x_GECD.transpose(0, 1).reshape(E, G * C, d)
        if use_grouped:
            y_END = torch.bmm(act(torch.bmm(x_END, w13_EFD.transpose(1, 2))), w2_EDF.transpose(1, 2))
        else:
            y_END = torch.stack([act(x_END[e] @ w13_EFD[e].t()) @ w2_EDF[e].t() for e in range(E)])
        return y_END.view(E, G, C, d).transpose(0, 1)


def _loop(x_ND: Tensor, w13_EFD: Tensor, w2_EDF: Tensor, sizes: list[int], act) -> Tensor:
    """Reference for the sorted contract: each expert's three matmuls over its rows."""
    outs = [act(chunk @ w13.t()) @ w2.t() for chunk, w13, w2 in zip(x_ND.split(sizes), w13_EFD, w2_EDF)]
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w2_EDF.shape[1])


def _write_per_expert(module: LocalExperts, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook (with `per_expert_state_dict`): w13 / w2 -> per-expert names."""
    if module.per_expert_state_dict:
        _split_in_place(state_dict, prefix)


def _split_in_place(state_dict: dict, prefix: str) -> None:
    w13, w2 = state_dict.pop(prefix + "w13"), state_dict.pop(prefix + "w2")
    for e in range(w13.shape[0]):
        for name, view in expert_slices(w13, w2, e).items():
            state_dict[f"{prefix}deepspeed_experts.{e}.{name}.weight"] = view.clone()


def to_per_expert(state_dict: dict) -> dict:
    """A state dict (or {name: tensor}, meta tensors included) with every `...experts.w13` /
    `...experts.w2` pair replaced by the per-expert names a checkpoint or export holds on disk,
    each its own contiguous tensor (safetensors and DeepSpeed's per-expert files refuse or copy
    shared storage). Other entries keep their order."""
    out: dict = {}
    for name, value in state_dict.items():
        if name.endswith("experts.w13") and name[:-3] + "w2" in state_dict:
            prefix = name[:-3]
            out.update({prefix + "w13": value, prefix + "w2": state_dict[prefix + "w2"]})
            _split_in_place(out, prefix)
        elif not (name.endswith("experts.w2") and name[:-2] + "w13" in state_dict):
            out[name] = value
    return out


def _read_per_expert(module: LocalExperts, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                     missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Load pre-hook: per-expert names (every checkpoint and export) -> w13 / w2. A state dict that
    already holds w13 / w2 passes through; one with some experts but not all is an error naming them."""
    names = per_expert_names(prefix, module.num_local_experts)
    present = [n for n in names if n in state_dict]
    if not present:
        return
    if len(present) != len(names) or prefix + "w13" in state_dict:
        absent = [n for n in names if n not in state_dict]
        error_msgs.append(f"{prefix}: per-expert weights are incomplete for {module.num_local_experts} local experts "
                          f"(missing {absent[:3]}{'...' if len(absent) > 3 else ''}) or mixed with {prefix}w13; a "
                          f"state dict holds either every deepspeed_experts.{{e}}.{{w1,w3,w2}}.weight or w13 and w2.")
        return
    per = [[state_dict[f"{prefix}deepspeed_experts.{e}.{p}.weight"] for p in PROJECTIONS]
           for e in range(module.num_local_experts)]
    try:
        w13, w2 = torch.stack([torch.cat([w1, w3]) for w1, w3, _ in per]), torch.stack([w2 for _, _, w2 in per])
    except RuntimeError as err:  # experts of different shapes: name them instead of a stack error
        shapes = {e: [list(t.shape) for t in ws] for e, ws in enumerate(per)}
        error_msgs.append(f"{prefix}: per-expert weights do not stack into w13 / w2 (w1, w3, w2 shapes per expert: "
                          f"{shapes}): {err}")
        return
    for n in names:
        del state_dict[n]
    state_dict[prefix + "w13"], state_dict[prefix + "w2"] = w13, w2


# transformers' loader (v5) matches checkpoint names to `state_dict()` names and does not call
# `load_state_dict`: these (source patterns, target, merge) entries tell it how per-expert names on
# disk become w13 / w2 (and `save_pretrained` reverses them). `*` is an expert id.
HF_CONVERSIONS = (
    (["deepspeed_moe.experts.deepspeed_experts.*.w1.weight", "deepspeed_moe.experts.deepspeed_experts.*.w3.weight"],
     "deepspeed_moe.experts.w13"),
    (["deepspeed_moe.experts.deepspeed_experts.*.w2.weight"], "deepspeed_moe.experts.w2"),
)
