"""Expert FFNs and the two ways to run a set of them.

`LocalExperts` keeps one module per expert under `deepspeed_experts.{i}` (DeepSpeed's own
naming), because DeepSpeed's checkpointing writes one file per expert by matching that prefix:
that is what lets a checkpoint move between expert-parallel sizes. The compute paths stack the
per-expert weights and run them together instead of DeepSpeed's Python loop:
  * `forward` (DeepSpeed's capacity-padded [groups, experts, capacity, d] contract): batched bmm;
  * `forward_sorted` (dropless, tokens sorted by expert): grouped GEMM
    (`torch.nn.functional.grouped_mm`, then `torch._grouped_mm`, then a per-expert loop).
"""
from __future__ import annotations

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


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, counts: Tensor | None) -> Tensor:
    """Rows of x [N, in] sorted by group times each group's weight [G, out, in]^T.

    `offsets` are the cumulative row ends (int32). Falls back to a loop (needing `counts` on the
    host) where no grouped GEMM kernel applies: old torch, or strides the kernel refuses.
    """
    fn = _grouped_mm_fn()
    if fn is not None and _grouped_mm_supported(x, weight):
        return fn(x, weight.transpose(-2, -1), offs=offsets)
    sizes = (counts if counts is not None else torch.diff(offsets, prepend=offsets.new_zeros(1))).tolist()
    outs = [chunk @ w.t() for chunk, w in zip(x.split(sizes), weight)]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


def _grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """The kernels want 16-byte aligned rows; CPU fp32 works, CUDA needs bf16/fp16 on sm90."""
    aligned = all(d * x.element_size() % 16 == 0 for d in (x.shape[-1], weight.shape[-2]))
    if not aligned or x.dtype != weight.dtype:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return True


class LocalExperts(nn.Module):
    """The experts held by this rank."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, expert_group_name: str | None = None):
        super().__init__()
        self.num_local_experts = num_experts
        self.deepspeed_experts = nn.ModuleList(ExpertFFN(hidden_size, intermediate_size) for _ in range(num_experts))
        if expert_group_name is not None:  # what deepspeed.moe.experts.Experts marks on expert params
            for param in self.parameters():
                param.allreduce = False
                param.group_name = expert_group_name

    def stacked(self, name: str) -> Tensor:
        """[E, out, in] weights of projection `name` (w1, w2, w3) of all local experts."""
        return torch.stack([getattr(e, name).weight for e in self.deepspeed_experts])

    def forward(self, inputs: Tensor) -> Tensor:
        """DeepSpeed's contract: [groups, experts, capacity, d] in and out, empty slots are zeros."""
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
        """Dropless: rows of x sorted by expert, `tokens_per_expert` [E] rows each."""
        if not use_grouped:
            sizes = tokens_per_expert.tolist()
            return torch.cat([e(c) for c, e in zip(x.split(sizes), self.deepspeed_experts)])
        offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        counts = None if x.is_cuda else tokens_per_expert
        h = F.silu(grouped_linear(x, self.stacked("w1"), offsets, counts))
        h = h * grouped_linear(x, self.stacked("w3"), offsets, counts)
        return grouped_linear(h, self.stacked("w2"), offsets, counts)
