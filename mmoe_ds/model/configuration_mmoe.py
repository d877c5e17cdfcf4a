"""HF config of the multimodal MoE model (Mixtral/Qwen-MoE field names + the router config)."""
from __future__ import annotations

from transformers import PretrainedConfig

from ..moe.config import RouterConfig


class MmoeConfig(PretrainedConfig):
    """Image patches + text tokens -> text, with MoE FFN blocks.

    Routing: `num_local_experts` and `num_experts_per_tok` (an int, or {modality: k}) are the HF
    names; every other routing field lives in `router` (see `RouterConfig`). `moe_backend`
    chooses DeepSpeed's expert-parallel layer ("deepspeed", training) or the pure-torch one
    ("torch", inference/export); both have the same parameter names.
    `modality_embedding` (default True) adds a learned per-modality vector to every token's
    embedding; False removes it (no parameter), so only the router's own modality input, if
    any, tells image and text apart (the "agnostic router is not blind" confound).
    The total loss is text CE + image_loss_coef · patch MSE + router_aux_loss_coef · mean over
    MoE layers of the router's weighted aux losses.
    """

    model_type = "mmoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=512, moe_intermediate_size=256, num_local_experts=4, num_experts_per_tok=1,
                 moe_layer_frequency=2, router=None, router_aux_loss_coef=1.0, output_router_logits=False,
                 max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.02, image_size=28,
                 patch_size=7, num_channels=1, image_loss_coef=0.0, image_token_id=3, moe_backend="torch",
                 ep_size=1, expert_init_seed=0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=False, use_cache=True, modality_embedding=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_frequency = moe_layer_frequency
        self.router = dict(router or {})
        self.router_aux_loss_coef = router_aux_loss_coef
        self.output_router_logits = output_router_logits
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.image_loss_coef = image_loss_coef
        self.image_token_id = image_token_id
        self.moe_backend = moe_backend
        self.ep_size = ep_size
        self.expert_init_seed = expert_init_seed
        self.use_cache = use_cache
        self.modality_embedding = modality_embedding
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_model_fields()

    def validate_model_fields(self) -> None:
        """Fail at load time, naming the field and the fix."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"MmoeConfig.hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_attention_heads}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"MmoeConfig.image_size={self.image_size} must be a multiple of patch_size={self.patch_size}.")
        if self.moe_layer_frequency < 1:
            raise ValueError("MmoeConfig.moe_layer_frequency: an MoE block every N >= 1 layers.")
        if not isinstance(self.modality_embedding, bool):
            raise ValueError(f"MmoeConfig.modality_embedding: true or false, got {self.modality_embedding!r}.")
        if self.moe_backend not in ("torch", "deepspeed"):
            raise ValueError(f"MmoeConfig.moe_backend: 'torch' or 'deepspeed', got {self.moe_backend!r}.")
        if self.num_patches + 2 > self.max_position_embeddings:
            raise ValueError(f"MmoeConfig.max_position_embeddings={self.max_position_embeddings} leaves no room for "
                             f"text after {self.num_patches} image patches; raise it.")
        self.router_config()  # validates routing fields

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size ** 2

    def router_config(self) -> RouterConfig:
        reserved = {"num_experts", "top_k", "ep_size"} & set(self.router)
        if reserved:
            raise ValueError(f"MmoeConfig.router: {sorted(reserved)} are set by num_local_experts, "
                             f"num_experts_per_tok and ep_size; remove them from 'router'.")
        return RouterConfig.from_dict(dict(self.router, num_experts=self.num_local_experts,
                                           top_k=self.num_experts_per_tok, ep_size=self.ep_size))

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (layer_idx + 1) % self.moe_layer_frequency == 0
