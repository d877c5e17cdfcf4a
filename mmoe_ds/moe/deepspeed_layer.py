"""DeepSpeed adapter: our router as a gate of `deepspeed.moe`, so DeepSpeed does the all-to-all.

`DeepSpeedMoE` *is* a `deepspeed.moe.layer.MoE` (DeepSpeed's engine finds MoE layers with
isinstance to create expert-parallel groups and to write per-expert checkpoint files), with its
gate replaced by `DeepSpeedModalityGate` and its experts by our batched `LocalExperts`.
DeepSpeed's MOELayer forwards only one per-token tensor to the gate, so the modality ids (and
the token mask that keeps padding out of the statistics) are handed to the gate just before the
call and cleared after it.
"""
from __future__ import annotations

from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from .config import RouterConfig
from .experts import LocalExperts
from .layer import MoEOutput
from .router import ModalityRouter


class DeepSpeedModalityGate(ModalityRouter):
    """DeepSpeed 0.19.4+ gate contract: returns
    (l_aux, capacity, num_experts, indices[k,S], locations[k,S], gates[k,S], exp_counts)."""

    def __init__(self, cfg: RouterConfig, hidden_size: int):
        super().__init__(cfg, hidden_size)
        self.pending_modality_ids: Tensor | None = None
        self.pending_token_mask: Tensor | None = None
        self.last_routing = None

    def forward(self, input: Tensor, used_token: Tensor | None = None, sparse_routes: bool = True,
                use_tutel: bool = False):
        if used_token is not None or use_tutel:
            raise ValueError("DeepSpeedModalityGate supports neither used_token masks nor Tutel; pass the padding "
                             "mask as DeepSpeedMoE(hidden_states, modality_ids, token_mask) (kept out of the "
                             "statistics) or drop padding tokens before the layer.")
        if self.pending_modality_ids is None:
            raise RuntimeError("DeepSpeedModalityGate: no modality ids; call DeepSpeedMoE(hidden_states, "
                               "modality_ids).")
        routing = self.route(input, self.pending_modality_ids, token_mask=self.pending_token_mask)
        self.last_routing = routing
        exp_counts = routing.stats.routed.sum(0).detach()
        return (routing.aux_loss, routing.capacity, self.cfg.num_experts, routing.expert_index.int(),
                routing.slot.int(), routing.combine_weight, exp_counts)


class DeepSpeedMoE(MoE):
    """Expert-parallel MoE FFN block with the same parameter names as `TorchMoE`."""

    def __init__(self, cfg: RouterConfig, hidden_size: int, intermediate_size: int):
        # nn.Identity: DeepSpeed deep-copies this per local expert; ours replace them below.
        super().__init__(hidden_size, expert=nn.Identity(), num_experts=cfg.num_experts, ep_size=cfg.ep_size,
                         k=1, drop_tokens=cfg.drop_tokens)
        self.cfg = cfg
        self.deepspeed_moe.gate = DeepSpeedModalityGate(cfg, hidden_size)
        self.deepspeed_moe.experts = LocalExperts(self.num_local_experts, hidden_size, intermediate_size,
                                                  self.expert_group_name, per_expert_state_dict=True)

    def forward(self, hidden_states: Tensor, modality_ids: Tensor, token_mask: Tensor | None = None) -> MoEOutput:
        gate = self.deepspeed_moe.gate
        gate.pending_modality_ids, gate.pending_token_mask = modality_ids, token_mask
        try:
            out = self.deepspeed_moe(hidden_states, None)
        finally:
            gate.pending_modality_ids = gate.pending_token_mask = None
        routing, gate.last_routing = gate.last_routing, None
        return MoEOutput(out, routing.aux_loss, routing)
