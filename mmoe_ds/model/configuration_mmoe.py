"""HF config of the multimodal MoE model (Mixtral/Qwen-MoE field names + the router config)."""
from __future__ import annotations

from transformers import PretrainedConfig

from ..moe.config import RouterConfig

# RoPE scalings computed by transformers' own init functions (`modeling_rope_utils.ROPE_INIT_FUNCTIONS`).
ROPE_SCALING_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


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

    Decoder (defaults = the from-scratch model: learned absolute positions, multi-head attention
    with one fused bias-free qkv projection): `num_key_value_heads` < heads gives grouped-query
    attention (the fused qkv has (heads + 2·kv_heads)·head_dim rows, q then k then v);
    `position_embedding_type="rope"` uses rotary embeddings with `rope_theta` and an HF
    `rope_scaling` dict (linear, dynamic, yarn, longrope, llama3: computed by transformers' own
    functions); `attention_bias` adds q/k/v biases (Qwen2); `sliding_window` limits attention to
    the last N tokens (Mistral); `tie_word_embeddings` shares the input embedding with the LM head.
    MoE blocks: the layers in `moe_layers` if given, else every `moe_layer_frequency`-th layer.
    Images: `vision_encoder="patch"` embeds raw patches linearly; "hf" runs the transformers vision
    model described by `vision_config`, then a `vision_projector` ("linear" | "mlp2x_gelu"),
    pooled to at most `vision_max_tokens` tokens, frozen if `freeze_vision_tower`.
    """

    model_type = "mmoe"
    keys_to_ignore_at_inference = ["past_key_values"]
    # A plain attribute: transformers >= 5 defines `rope_scaling` on PretrainedConfig as a deprecated
    # alias of `rope_parameters`; this model keeps the HF 4.x name as its own field.
    rope_scaling = None

    def __init__(self, vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=512, moe_intermediate_size=256, num_local_experts=4, num_experts_per_tok=1,
                 moe_layer_frequency=2, router=None, router_aux_loss_coef=1.0, output_router_logits=False,
                 max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.02, image_size=28,
                 patch_size=7, num_channels=1, image_loss_coef=0.0, image_token_id=3, moe_backend="torch",
                 ep_size=1, expert_init_seed=0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=False, use_cache=True, modality_embedding=True, num_key_value_heads=None,
                 head_dim=None, position_embedding_type="learned", rope_theta=10000.0, rope_scaling=None,
                 attention_bias=False, sliding_window=None, moe_layers=None, vision_encoder="patch",
                 vision_config=None, vision_projector="mlp2x_gelu", vision_max_tokens=None,
                 freeze_vision_tower=True, **kwargs):
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
        # Llama-family decoder fields (the defaults are today's model: learned positions, MHA, no bias).
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        self.attention_bias = attention_bias
        self.sliding_window = sliding_window
        self.moe_layers = None if moe_layers is None else list(moe_layers)
        # Vision tower (mmoe_ds/model/vision.py builds it from these when vision_encoder == "hf").
        self.vision_encoder = vision_encoder
        self.vision_config = dict(vision_config) if vision_config is not None else None
        self.vision_projector = vision_projector
        self.vision_max_tokens = vision_max_tokens
        self.freeze_vision_tower = freeze_vision_tower
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_model_fields()

    def validate_model_fields(self) -> None:
        """Fail at load time, naming the field and the fix."""
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"MmoeConfig.hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_attention_heads} (or set head_dim).")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            raise ValueError(f"MmoeConfig.head_dim: a positive integer or null, got {self.head_dim!r}.")
        kv = self.num_key_value_heads
        if not isinstance(kv, int) or kv < 1 or self.num_attention_heads % kv:
            raise ValueError(f"MmoeConfig.num_key_value_heads={kv!r} must be a positive divisor of "
                             f"num_attention_heads={self.num_attention_heads} (grouped-query attention).")
        self._validate_positions()
        if self.image_size % self.patch_size:
            raise ValueError(f"MmoeConfig.image_size={self.image_size} must be a multiple of "
                             f"patch_size={self.patch_size}.")
        self._validate_moe_layers()
        for name in ("modality_embedding", "attention_bias", "tie_word_embeddings", "freeze_vision_tower"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MmoeConfig.{name}: true or false, got {getattr(self, name)!r}.")
        if self.moe_backend not in ("torch", "deepspeed"):
            raise ValueError(f"MmoeConfig.moe_backend: 'torch' or 'deepspeed', got {self.moe_backend!r}.")
        self._validate_vision()
        if self.vision_encoder == "patch" and self.num_patches + 2 > self.max_position_embeddings:
            raise ValueError(f"MmoeConfig.max_position_embeddings={self.max_position_embeddings} leaves no room for "
                             f"text after {self.num_patches} image patches; raise it.")
        self.router_config()  # validates routing fields

    def _validate_positions(self) -> None:
        if self.position_embedding_type not in ("learned", "rope"):
            raise ValueError(f"MmoeConfig.position_embedding_type: 'learned' or 'rope', got "
                             f"{self.position_embedding_type!r}.")
        if self.position_embedding_type == "rope" and self.attention_head_dim % 2:
            raise ValueError(f"MmoeConfig.head_dim={self.attention_head_dim}: rotary embeddings need an even head "
                             "dimension; change head_dim (or hidden_size / num_attention_heads).")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"MmoeConfig.rope_theta: a positive number, got {self.rope_theta!r}.")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ROPE_SCALING_TYPES:
                raise ValueError(f"MmoeConfig.rope_scaling: rope_type {rope_type!r} is not one of "
                                 f"{list(ROPE_SCALING_TYPES)} (transformers' RoPE init functions); fix rope_type "
                                 "or remove rope_scaling.")
            if self.position_embedding_type != "rope":
                raise ValueError("MmoeConfig.rope_scaling: only used with position_embedding_type='rope'; remove it "
                                 "or set position_embedding_type to 'rope'.")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"MmoeConfig.sliding_window: a positive number of tokens or null, got "
                             f"{self.sliding_window!r}.")

    def _validate_moe_layers(self) -> None:
        if self.moe_layers is None:
            if not isinstance(self.moe_layer_frequency, int) or self.moe_layer_frequency < 1:
                raise ValueError("MmoeConfig.moe_layer_frequency: an MoE block every N >= 1 layers.")
            return
        bad = [i for i in self.moe_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad or not self.moe_layers or len(set(self.moe_layers)) != len(self.moe_layers):
            raise ValueError(f"MmoeConfig.moe_layers: one or more distinct layer indices in "
                             f"0..{self.num_hidden_layers - 1}, got "
                             f"{self.moe_layers}; fix the list (or remove it to use moe_layer_frequency).")

    def _validate_vision(self) -> None:
        if self.vision_encoder not in ("patch", "hf"):
            raise ValueError(f"MmoeConfig.vision_encoder: 'patch' (linear patch embedding) or 'hf' (a transformers "
                             f"vision model given by vision_config), got {self.vision_encoder!r}.")
        if self.vision_projector not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"MmoeConfig.vision_projector: 'linear' or 'mlp2x_gelu', got {self.vision_projector!r}.")
        if self.vision_max_tokens is not None and (not isinstance(self.vision_max_tokens, int)
                                                   or self.vision_max_tokens < 1):
            raise ValueError(f"MmoeConfig.vision_max_tokens: a positive number of image tokens or null, got "
                             f"{self.vision_max_tokens!r}.")
        if self.vision_encoder == "hf":
            vc = self.vision_config
            if not isinstance(vc, dict) or not vc.get("model_type"):
                raise ValueError("MmoeConfig.vision_config: vision_encoder='hf' needs the vision model's config as a "
                                 "dict with 'model_type' (vision_config_from_pretrained(path) gives it).")
            if self.image_loss_coef > 0:
                raise ValueError("MmoeConfig.image_loss_coef: the next-patch loss predicts raw patches, which an HF "
                                 "vision tower does not produce; set image_loss_coef to 0 with vision_encoder='hf'.")
            from .vision import num_image_tokens  # checks the patch grid of vision_config, naming the fix

            tokens = num_image_tokens(self)
            if tokens + 2 > self.max_position_embeddings:
                raise ValueError(f"MmoeConfig.max_position_embeddings={self.max_position_embeddings} leaves no room "
                                 f"for text after {tokens} image tokens; set vision_max_tokens (pooling) or raise it.")
        elif self.vision_config is not None:
            raise ValueError("MmoeConfig.vision_config: only used with vision_encoder='hf'; remove it or set "
                             "vision_encoder to 'hf'.")

    @property
    def attention_head_dim(self) -> int:
        """head_dim, or hidden_size / num_attention_heads when it is not set."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def image_input_name(self) -> str:
        """The forward argument images arrive in: `pixel_values` (HF vision tower) or `pixel_patches`."""
        return "pixel_values" if self.vision_encoder == "hf" else "pixel_patches"

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
        """`moe_layers` when given, else every `moe_layer_frequency`-th layer (1-based)."""
        if self.moe_layers is not None:
            return layer_idx in self.moe_layers
        return (layer_idx + 1) % self.moe_layer_frequency == 0
