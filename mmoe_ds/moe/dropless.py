"""Dropless index dispatch on DeepSpeed's expert-parallel groups (`RouterConfig.moe_backend="dropless"`).

DeepSpeed's MOELayer moves a capacity-padded [experts, capacity, d] buffer through its
all-to-all; dropless there means capacity = the largest expert's load, so skewed routing pads
every expert to it. `DroplessMoE` moves only the kept routes:

  1. route (the shared `ModalityRouter.route`, without capacity slots);
  2. permute: the routes sorted by global expert id, each a copy of its token's row;
  3. all-to-all with per-rank variable splits over DeepSpeed's expert-parallel group (the
     rows for rank r's experts go to rank r); received rows are reordered source-major ->
     expert-major;
  4. the local experts (`LocalExperts`, 3-D w13 = [w1; w3] and w2) as grouped GEMMs over their rows;
  5. the reverse reorder and all-to-all, then the weighted combine of each token's k rows
     (fp32 sums).

Host syncs in the layer's forward: at ep_size > 1 exactly one, in `_exchange_counts` (the
all-to-all's split sizes are host integers; the per-expert row counts come in the same read).
At ep_size 1 none when every token has the same k (the row count is K·S) and torch's grouped
GEMM kernel applies (CUDA, bf16, sm90+); with a k per modality one read of the per-expert counts.
The router (`route(..., slots=False)`) reads nothing back on CUDA with the default losses; the
per-modality losses count tokens with `torch.bincount`, which does (mmoe_ds/moe/losses.py).

The layer *is* a `deepspeed.moe.layer.MoE` with the parameter names of `DeepSpeedMoE` and
`TorchMoE`, so DeepSpeed's engine creates its expert-parallel groups, keeps expert gradients
in the expert-data-parallel all-reduce and writes one checkpoint file per expert, and a state
dict moves between the three layers. Permute, SwiGLU and combine run as Triton kernels on CUDA
sm90+ and as the torch reference elsewhere (`mmoe_ds.moe.kernels.ops_for`).
"""
from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from .config import RouterConfig
from .experts import LocalExperts
from .kernels import ops_for
from .layer import MoEOutput
from .router import ModalityRouter, Routing


def run_local_experts(experts: nn.Module, x: Tensor, tokens_per_expert: Tensor, sizes: list[int] | None,
                      ops: ModuleType) -> Tensor:
    """The local experts over rows x sorted by expert (`tokens_per_expert` [E_local] on the device,
    `sizes` the same on the host where known): grouped GEMMs over w13 / w2 with `ops.swiglu` between.
    A module call, so whatever wraps or hooks the experts (PEFT, accelerate) runs."""
    return experts(x, tokens_per_expert, sizes, act=ops.swiglu)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty(sum(output_splits), x.shape[1])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        output_splits, input_splits = ctx.splits
        out = grad.new_empty(sum(input_splits), grad.shape[1])
        dist.all_to_all_single(out, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return out, None, None, None


def _exchange_counts(counts: Tensor, ep_size: int, group) -> tuple[Tensor, list[int], list[int], list[int]]:
    """Tell every rank how many rows it gets for each of its experts.

    counts: [E] rows this rank sends to each global expert (rank r holds experts r·E_local..).
    Returns (received [ep_size, E_local] on the device, input splits per rank, output splits per
    rank, rows per local expert). The only host sync of the expert-parallel forward is here: the
    all-to-all's split sizes are host integers (read together with the rest, in one transfer).
    """
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    sent, got = torch.cat([counts, received]).view(2, ep_size, -1).tolist()
    return (received.view(ep_size, -1), [sum(r) for r in sent], [sum(r) for r in got],
            [sum(col) for col in zip(*got)])


def dropless_dispatch(x: Tensor, routing: Routing, experts: nn.Module, ep_size: int = 1, group=None,
                      fused: bool | None = None, uniform_k: bool = False) -> Tensor:
    """Σ_k gate_k · expert_{index_k}(x) for every token of x [S, d], experts spread over `group`.

    `routing` holds [K, S] global expert ids (-1: route not used) and fp32 gates; `experts` this
    rank's E / ep_size experts. `uniform_k`: every token has K routes (no -1), so the row count
    is known without reading it back. `fused` as in `ops_for`.
    """
    ops = ops_for(x, fused)
    S = x.shape[0]
    index = routing.expert_index.reshape(-1)  # route i = k·S + s belongs to token s
    E = routing.logits.shape[-1]  # global experts (the experts module may be wrapped, e.g. by PEFT)
    key = torch.where(index >= 0, index, E)  # routes not used sort last
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=x.device).scatter_add_(0, key, torch.ones_like(key))[:E]
    sizes = None  # rows per local expert on the host, where known
    if ep_size > 1:
        received, send_splits, recv_splits, sizes = _exchange_counts(counts, ep_size, group)
        num_routes = sum(send_splits)
    elif uniform_k:
        num_routes = index.numel()
    else:
        sizes = counts.tolist()  # one read: the row count and the group sizes
        num_routes = sum(sizes)
    order = order[:num_routes]
    inverse = torch.full_like(index, -1).index_copy_(0, order, torch.arange(num_routes, device=x.device))
    inverse = inverse.view_as(routing.expert_index)
    rows = ops.gather_rows(x, order % max(S, 1), inverse)  # [routes, d], sorted by global expert
    if ep_size > 1:
        rows = _AllToAll.apply(rows, recv_splits, send_splits, group)  # source rank-major, then expert
        by_expert, back = _source_to_expert_major(received, sum(recv_splits))
        rows = ops.gather_rows(rows, by_expert, back.view(1, -1))
        tokens_per_expert = received.sum(0)
        out = run_local_experts(experts, rows, tokens_per_expert, sizes, ops)
        out = ops.gather_rows(out, back, by_expert.view(1, -1))
        out = _AllToAll.apply(out, send_splits, recv_splits, group)
    else:
        out = run_local_experts(experts, rows, counts, sizes, ops)
    return ops.combine(out, routing.combine_weight, inverse, order)


def _source_to_expert_major(received: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Row permutations between the all-to-all's layout (source rank-major, then local expert) and
    the grouped GEMM's (local expert-major, then source rank): (to expert-major, back).
    `total` = received.sum(), known on the host."""
    P, El = received.shape
    group = torch.repeat_interleave(torch.arange(P * El, device=received.device), received.reshape(-1),
                                    output_size=total)
    return _perm_pair(torch.argsort((group % El) * P + group // El, stable=True))


def _perm_pair(perm: Tensor) -> tuple[Tensor, Tensor]:
    return perm, torch.empty_like(perm).index_copy_(0, perm, torch.arange(perm.numel(), device=perm.device))


class DroplessMoE(MoE):
    """Expert-parallel MoE FFN block with index dispatch: forward(hidden_states, modality_ids) -> MoEOutput.

    `fused`: None (default) runs the Triton kernels on CUDA sm90+ and the torch reference
    elsewhere; True / False force one (benchmarks, tests).
    """

    def __init__(self, cfg: RouterConfig, hidden_size: int, intermediate_size: int, fused: bool | None = None):
        if cfg.drop_tokens:
            raise ValueError("DroplessMoE: RouterConfig.drop_tokens must be false (this layer keeps every route).")
        # nn.Identity: DeepSpeed deep-copies this per local expert; ours replace them below.
        super().__init__(hidden_size, expert=nn.Identity(), num_experts=cfg.num_experts, ep_size=cfg.ep_size,
                         k=1, drop_tokens=False)
        self.cfg = cfg
        self.fused = fused
        self.deepspeed_moe.gate = ModalityRouter(cfg, hidden_size)
        self.deepspeed_moe.experts = LocalExperts(self.num_local_experts, hidden_size, intermediate_size,
                                                  self.expert_group_name, per_expert_state_dict=True)

    def forward(self, hidden_states: Tensor, modality_ids: Tensor, token_mask: Tensor | None = None) -> MoEOutput:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        moe = self.deepspeed_moe
        if self.ep_size > 1 and moe.ep_group is None:
            raise RuntimeError("DroplessMoE: no expert-parallel group; call set_deepspeed_parallelism() or build the "
                               "model inside deepspeed.initialize.")
        routing = moe.gate.route(x, modality_ids, slots=False, token_mask=token_mask)
        out = dropless_dispatch(x, routing, moe.experts, self.ep_size, moe.ep_group, self.fused,
                                uniform_k=len(set(self.cfg.top_k_per_modality)) == 1)
        return MoEOutput(out.view_as(hidden_states), routing.aux_loss, routing)
