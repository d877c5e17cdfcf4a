"""Expert FFNs and the ways to run a set of them.

`LocalExperts` keeps one module per expert under `deepspeed_experts.{i}` (DeepSpeed's own
naming), because DeepSpeed's checkpointing writes one file per expert by matching that prefix:
that is what lets a checkpoint move between expert-parallel sizes. The compute paths stack the
per-expert weights and run them together instead of DeepSpeed's Python loop:
  * `forward` (DeepSpeed's capacity-padded [groups, experts, capacity, d] contract): batched bmm;
  * `forward_sorted` (dropless, tokens sorted by expert): grouped GEMM
    (`torch.nn.functional.grouped_mm`, then `torch._grouped_mm`, then a per-expert loop).
Neither reads anything back to the host while a grouped GEMM kernel applies; the loop fallback
reads the group sizes once per call.

Stacking reads `.weight` directly, which only plain `nn.Linear`s allow: a PEFT LoRA layer, an
accelerate offload hook (weights on the meta device until the module is called) or any user hook
needs the module itself to run. `calls_modules` tells the two apart on every call, and the experts
then run one after another as modules over their rows (same numbers, see tests/test_experts.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ExpertFFN(nn.Module):
    """SwiGLU feed-forward (Mixtral's w1/w3/w2)."""

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
    go), so it reads the modules' own dicts directly: a few microseconds per expert.
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
        return grad.contiguous()


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Rows of x [N, in] sorted by group times each group's weight [G, out, in]^T.

    `offsets` are the cumulative row ends (int32, on x's device). Where no grouped GEMM kernel
    applies (old torch, unaligned rows, a kernel that refuses the dtype or device) it loops over
    the groups, which needs their sizes on the host: `sizes`, else read from `offsets` (a sync).
    """
    if _grouped_mm_supported(x, weight):
        return _MaterialisedGrad.apply(_grouped_mm_fn()(x, weight.transpose(-2, -1), offs=offsets))
    if sizes is None:
        sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    outs = [chunk @ w.t() for chunk, w in zip(x.split(sizes), weight)]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


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


class LocalExperts(nn.Module):
    """The experts held by this rank."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 expert_group_name: str | None = None):
        super().__init__()
        self.num_local_experts = num_experts
        self.deepspeed_experts = nn.ModuleList(ExpertFFN(hidden_size, intermediate_size) for _ in range(num_experts))
        if expert_group_name is not None:  # what deepspeed.moe.experts.Experts marks on expert params
            for param in self.parameters():
                param.allreduce = False
                param.group_name = expert_group_name

    def stacked(self, name: str) -> Tensor:
        """[E, out, in] weights of projection `name` (w1, w2, w3) of all local experts (a copy)."""
        return torch.stack([getattr(e, name).weight for e in self.deepspeed_experts])

    @property
    def calls_modules(self) -> bool:
        """Whether the experts must run as modules (wrapped, hooked or offloaded; see `calls_modules`)."""
        return calls_modules(self, (LocalExperts, nn.ModuleList, ExpertFFN, nn.Linear))

    def forward(self, inputs: Tensor) -> Tensor:
        """DeepSpeed's contract: [groups, experts, capacity, d] in and out, empty slots are zeros."""
        if self.calls_modules:
            return self.forward_loop(inputs)
        G, E, C, d = inputs.shape
        x = inputs.transpose(0, 1).reshape(E, G * C, d)
        w1, w3, w2 = self.stacked("w1"), self.stacked("w3"), self.stacked("w2")
        h = F.silu(torch.bmm(x, w1.transpose(1, 2))) * torch.bmm(x, w3.transpose(1, 2))
        y = torch.bmm(h, w2.transpose(1, 2))
        return y.view(E, G, C, d).transpose(0, 1)

    def forward_loop(self, inputs: Tensor) -> Tensor:
        """Reference for `forward`: DeepSpeed's loop over experts."""
        chunks = inputs.chunk(self.num_local_experts, dim=1)
        return torch.cat([expert(c) for c, expert in zip(chunks, self.deepspeed_experts)], dim=1)

    def forward_sorted(self, x: Tensor, tokens_per_expert: Tensor, use_grouped: bool = True) -> Tensor:
        """Dropless: rows of x sorted by expert, `tokens_per_expert` [E] rows each (summing to len(x)).

        `use_grouped=False` is the reference: each expert module over its rows; it is also the path
        taken whenever the experts must run as modules (`calls_modules`).
        """
        if not use_grouped or self.calls_modules:
            sizes = tokens_per_expert.tolist()
            return torch.cat([e(c) for c, e in zip(x.split(sizes), self.deepspeed_experts)])
        w1, w3, w2 = self.stacked("w1"), self.stacked("w3"), self.stacked("w2")
        offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        # w1 [E, f, d] checks both widths (d and f) the three GEMMs use: one decision, one sync at most.
        sizes = None if _grouped_mm_supported(x, w1) else tokens_per_expert.tolist()
        h = F.silu(grouped_linear(x, w1, offsets, sizes)) * grouped_linear(x, w3, offsets, sizes)
        return grouped_linear(h, w2, offsets, sizes)
