"""The pure-torch MoE layer: routing plus dropless expert compute, no DeepSpeed import.

Its parameters are named exactly like `DeepSpeedMoE`'s (`deepspeed_moe.gate.*`,
`deepspeed_moe.experts.w13` / `.w2`), so a state dict saved by one loads into the other (DeepSpeed's
layers write the experts under per-expert names, `deepspeed_moe.experts.deepspeed_experts.{i}.*`,
which `LocalExperts` reads as well). Used for inference, export, and training without expert parallelism.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import RouterConfig
from .experts import LocalExperts
from .router import ModalityRouter, Routing


class MoEOutput(NamedTuple):
    hidden_states: Tensor
    aux_loss: Tensor
    routing: Routing


def combine_routes(x: Tensor, routing: Routing, experts: nn.Module, use_grouped: bool = True,
                   num_kept: int | None = None) -> Tensor:
    """Σ_k gate_k · expert_{index_k}(x) for every token, computing only the kept routes.

    Routes are sorted by expert so each expert runs one GEMM over its tokens (grouped GEMM),
    then scattered back weighted by their gates, accumulated in fp32. `num_kept`: the number of
    kept routes where the caller knows it (dropless with one k for every token: all K·S), else it
    is read back from the device (one host sync).
    """
    S = x.shape[0]
    index = routing.expert_index.reshape(-1)  # [K*S], route r belongs to token r % S
    E = routing.logits.shape[-1]  # the experts module may be wrapped (PEFT): ask the routing
    sort_key = torch.where(index >= 0, index, E)  # dropped routes sort last
    order = torch.argsort(sort_key, stable=True)
    tokens_per_expert = torch.bincount(sort_key, minlength=E + 1)[:E]
    if num_kept is None:
        num_kept = int(tokens_per_expert.sum())  # one host sync: sizes the sorted buffer
    order = order[:num_kept]
    token = order % S
    y = experts(x[token], tokens_per_expert, use_grouped=use_grouped)  # a module call: hooks, offload, PEFT see it
    weighted = y.float() * routing.combine_weight.reshape(-1)[order, None]
    out = torch.zeros(S, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, weighted)
    return out.to(x.dtype)


class _GateAndExperts(nn.Module):
    """Holds `gate` and `experts` under the names DeepSpeed's MOELayer uses."""

    def __init__(self, gate: ModalityRouter, experts: LocalExperts):
        super().__init__()
        self.gate = gate
        self.experts = experts


class TorchMoE(nn.Module):
    """MoE FFN block: forward(hidden_states [..., d], modality_ids [...], token_mask [...] | None) -> MoEOutput.

    `token_mask` (nonzero = real token, e.g. the attention mask) only keeps padding out of the routing
    statistics; the routing itself is the same with or without it.
    """

    def __init__(self, cfg: RouterConfig, hidden_size: int, intermediate_size: int, use_grouped: bool = True):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.use_grouped = use_grouped
        self.deepspeed_moe = _GateAndExperts(ModalityRouter(cfg, hidden_size),
                                             LocalExperts(cfg.num_experts, hidden_size, intermediate_size))

    def forward(self, hidden_states: Tensor, modality_ids: Tensor, token_mask: Tensor | None = None) -> MoEOutput:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        routing = self.deepspeed_moe.gate(x, modality_ids, token_mask)  # a module call: hooks and offload see it
        cfg = self.cfg
        every_route_kept = not cfg.drop_tokens and len(set(cfg.top_k_per_modality)) == 1
        out = combine_routes(x, routing, self.deepspeed_moe.experts, self.use_grouped,
                             num_kept=x.shape[0] * cfg.max_top_k if every_route_kept else None)
        return MoEOutput(out.view_as(hidden_states), routing.aux_loss, routing)
