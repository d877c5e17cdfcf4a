"""Modality-aware MoE routing. `DeepSpeedMoE` lives in `mmoe_ds.moe.deepspeed_layer` (imports DeepSpeed)."""
from .config import ROUTING_MODES, RouterConfig
from .experts import ExpertFFN, LocalExperts
from .layer import MoEOutput, TorchMoE, combine_routes
from .router import ModalityRouter, Routing, RoutingStats

__all__ = ["ROUTING_MODES", "RouterConfig", "ExpertFFN", "LocalExperts", "MoEOutput", "TorchMoE",
           "combine_routes", "ModalityRouter", "Routing", "RoutingStats"]
