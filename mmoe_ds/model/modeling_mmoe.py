"""The multimodal MoE causal LM: image patches and text tokens in one sequence, text out.

Sequence layout (built by the processor): `<bos> <image>×P caption <eos>`; image positions
carry patch embeddings (or an HF vision tower's projected patch features) instead of token
embeddings, and modality id 0 (text: 1). Pre-norm transformer blocks with SDPA attention (learned
absolute positions, or rotary embeddings with grouped-query attention as in Llama / Qwen2 /
Mistral); the FFNs of `moe_layers` (default: every `moe_layer_frequency`-th) are MoE blocks whose
router sees the modality ids.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..moe.experts import HF_CONVERSIONS, ExpertFFN, LocalExperts
from ..moe.layer import TorchMoE
from ..moe.router import RoutingStats
from .configuration_mmoe import MmoeConfig

IMAGE, TEXT = 0, 1
# transformers >= 5.2x renamed the output field `past_key_values` to `cache`.
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class MmoeCausalLMOutput(MoeCausalLMOutputWithPast):
    """HF's MoE output plus the loss parts and per-layer routing statistics (detached)."""

    text_loss: Tensor | None = None
    image_loss: Tensor | None = None
    routing_stats: list[RoutingStats] | None = None


class RMSNorm(nn.Module):
    """RMS layer norm (Llama's): x / rms(x) * weight, computed in fp32."""
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalise `x` [..., D] over its last dimension."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin of rotary position embeddings, computed like transformers' Llama: inverse
    frequencies from `rope_theta` (default) or from transformers' own `ROPE_INIT_FUNCTIONS` for an
    HF `rope_scaling` (linear, dynamic, yarn, longrope, llama3), so scaled checkpoints behave as
    in HF. No parameters or buffers (nothing in the state dict, nothing for meta-device loading to
    leave uninitialised): the frequencies are cached per device on first use."""

    LENGTH_DEPENDENT = ("dynamic", "longrope")  # frequencies depend on the sequence length

    def __init__(self, config: MmoeConfig):
        super().__init__()
        scaling = config.rope_scaling or {}
        self.rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        self.rope_theta = float(config.rope_theta)
        self.head_dim = config.attention_head_dim
        self._scaling, self._config = dict(scaling, rope_type=self.rope_type), config
        self._cache: dict[torch.device, tuple[Tensor, float]] = {}
        self._hf = None

    def _hf_config(self):
        """A transformers LlamaConfig carrying the RoPE fields, the input ROPE_INIT_FUNCTIONS expect
        (it standardises `rope_scaling` the way the installed transformers version does)."""
        if self._hf is None:
            from transformers import LlamaConfig

            c = self._config
            self._hf = LlamaConfig(hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                                   num_key_value_heads=c.num_key_value_heads, head_dim=self.head_dim,
                                   max_position_embeddings=c.max_position_embeddings, rope_theta=self.rope_theta,
                                   rope_scaling=dict(self._scaling))
        return self._hf

    def inv_freq(self, device: torch.device, seq_len: int | None) -> tuple[Tensor, float]:
        """(inverse frequencies [head_dim / 2] fp32, attention scaling of cos/sin)."""
        if self.rope_type not in self.LENGTH_DEPENDENT and device in self._cache:
            return self._cache[device]
        if self.rope_type == "default":
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
            result = 1.0 / (self.rope_theta ** (exponents / self.head_dim)), 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self._hf_config(), device, seq_len=seq_len)
            result = inv_freq.to(device=device, dtype=torch.float), float(scaling)
        if self.rope_type not in self.LENGTH_DEPENDENT:
            self._cache[device] = result
        return result

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [L] -> (cos, sin) [L, head_dim]; positions [B, L] -> [B, 1, L, head_dim] (per row,
        broadcast over heads); in `dtype`."""
        length_dependent = self.rope_type in self.LENGTH_DEPENDENT and positions.numel()
        seq_len = int(positions.max()) + 1 if length_dependent else None
        inv_freq, scaling = self.inv_freq(positions.device, seq_len)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        if emb.dim() == 3:
            emb = emb[:, None]
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def positions_from_mask(attention_mask: Tensor | None, past: int, length: int, device) -> Tensor:
    """Position ids [B|1, length] of the tokens past..past+length-1: the step minus the row's leading
    padding, so a left-padded prompt numbers its first real token 0 exactly as it would alone (padding
    itself gets 0); right padding (training batches) leaves `arange` unchanged. `attention_mask`
    [B, past + length] as `generate` keeps it (1 = token, 0 = padding), or None (no padding)."""
    steps = torch.arange(past, past + length, device=device)[None]
    if attention_mask is None:
        return steps
    leading = (attention_mask[:, -(past + length):].cumsum(-1) == 0).sum(-1, keepdim=True)
    return (steps - leading.to(device)).clamp(min=0)


def rotate_half(x: Tensor) -> Tensor:
    """Rotate the two halves of the last dimension (rotary embeddings)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q [B, H, L, hd], k [B, KV, L, hd], cos/sin [L, hd] or [B, 1, L, hd]."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    """Multi-head or grouped-query attention with one fused qkv projection.

    `qkv` has (heads + 2·kv_heads)·head_dim output rows: q, then k, then v (with kv_heads = heads
    this is the original layout, 3·hidden). The KV cache holds the kv_heads (not repeated)."""

    def __init__(self, config: MmoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, mask: Tensor, cache: DynamicCache | None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Causal self-attention of `x` [B, L, D] under `mask`, appending to `cache` when given."""
        B, L, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if KV == H:
            q, k, v = self.qkv(x).view(B, L, 3, H, hd).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
            q, k, v = (t.view(B, L, -1, hd).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            q, k = apply_rotary(q, k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            if k.shape[-2] != mask.shape[-1]:  # a sliding-window cache returns only the newest keys
                mask = mask[..., -k.shape[-2]:]
        if KV != H:  # each kv head serves H / KV query heads
            k, v = (t.repeat_interleave(H // KV, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


def make_moe_block(config: MmoeConfig) -> nn.Module:
    """The MoE block of `config.moe_backend`: TorchMoE, DeepSpeed's layer or DroplessMoE."""
    if config.moe_backend == "deepspeed":
        # Imported by name: only training needs DeepSpeed, and an exported model (backend "torch")
        # ships without this module.
        if config.router_config().moe_backend == "dropless":  # index dispatch on DeepSpeed's EP groups
            dropless = importlib.import_module("mmoe_ds.moe.dropless")
            return dropless.DroplessMoE(config.router_config(), config.hidden_size, config.moe_intermediate_size)
        ds_layer = importlib.import_module("mmoe_ds.moe.deepspeed_layer")
        return ds_layer.DeepSpeedMoE(config.router_config(), config.hidden_size, config.moe_intermediate_size)
    return TorchMoE(config.router_config(), config.hidden_size, config.moe_intermediate_size)


class DecoderLayer(nn.Module):
    """One decoder layer: attention, then the MoE block (or a dense FFN) with pre-norm residuals."""
    def __init__(self, config: MmoeConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.ffn = make_moe_block(config) if self.is_moe else ExpertFFN(config.hidden_size, config.intermediate_size)

    def forward(self, x, modality_ids, mask, cache, rotary=None, token_mask=None):
        """Run the layer; returns (hidden states, the MoE block's output or None)."""
        x = x + self.attn(self.attn_norm(x), mask, cache, rotary)
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.ffn(h), None
        moe = self.ffn(h, modality_ids, token_mask)  # token_mask: padding is routed but not counted
        return x + moe.hidden_states, moe


def register_weight_conversions() -> bool:
    """Tell transformers' loader (v5) how the per-expert names on disk become the 3-D expert
    weights (`moe.experts.HF_CONVERSIONS`); `save_pretrained` writes per-expert names back. Keyed by
    model_type "mmoe", which no transformers model uses. Returns False where transformers has no
    such registry (4.x loads through `load_state_dict`, whose pre-hook converts instead)."""
    try:
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
    except ImportError:
        return False
    converters = []
    for sources, target in HF_CONVERSIONS:  # stack the experts; w1 and w3 then side by side in one tensor
        operations = [MergeModulelist(dim=0)] + ([Concatenate(dim=1)] if len(sources) > 1 else [])
        converters.append(WeightConverter(source_patterns=sources, target_patterns=target, operations=operations))
    register_checkpoint_conversion_mapping(MmoeConfig.model_type, converters, overwrite=True)
    return True


register_weight_conversions()


class MmoePreTrainedModel(PreTrainedModel):
    """HF base class: config class, weight initialisation (experts seeded by global id), loading hooks."""
    config_class = MmoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, LocalExperts):
            module.w13.normal_(0.0, std)
            module.w2.normal_(0.0, std)

    @torch.no_grad()
    def init_experts_by_global_id(self) -> None:
        """Seed every expert from (seed, layer, global expert id): any ep_size starts identical,
        and ranks of an expert-parallel group never hold copies of the same initial expert."""
        ep_rank = 0
        if self.config.moe_backend == "deepspeed" and torch.distributed.is_initialized():
            # DeepSpeed puts consecutive ranks in one expert-parallel group (its groups are
            # created later, inside deepspeed.initialize).
            ep_rank = torch.distributed.get_rank() % self.config.ep_size
        std = self.config.initializer_range
        for layer_idx, layer in enumerate(self.model.layers):
            if not layer.is_moe:
                continue
            experts = layer.ffn.deepspeed_moe.experts
            for local_id in range(experts.num_local_experts):
                global_id = ep_rank * experts.num_local_experts + local_id
                seed = self.config.expert_init_seed * 1_000_003 + layer_idx * 1009 + global_id
                g = torch.Generator().manual_seed(seed)
                for w in experts.expert(local_id).values():  # w1, w3, w2: the per-expert draw order
                    w.copy_(torch.randn(w.shape, generator=g) * std)


class MmoeModel(MmoePreTrainedModel):
    """The decoder stack: embeddings (text and image patches or a vision tower), layers and the final norm."""
    def __init__(self, config: MmoeConfig):
        super().__init__(config)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        if config.vision_encoder == "hf":  # a transformers vision model + projector; no patch_embed
            from .vision import VisionTower

            self.vision = VisionTower(config)
        else:
            self.patch_embed = nn.Linear(config.patch_dim, d)
            self.vision = None
        # Optional (config.modality_embedding): without it no parameter exists and nothing is added.
        self.modality_embed = nn.Embedding(2, d) if config.modality_embedding else None
        learned = config.position_embedding_type == "learned"
        self.position_embed = nn.Embedding(config.max_position_embeddings, d) if learned else None
        self.rotary = None if learned else RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.post_init()

    def embed(self, input_ids: Tensor, pixel_patches: Tensor | None, modality_ids: Tensor,
              pixel_values: Tensor | None = None) -> Tensor:
        """Token embeddings with the image positions replaced by projected image features."""
        h = self.embed_tokens(input_ids)
        image_positions = modality_ids == IMAGE
        if self.vision is not None:
            if pixel_values is not None and bool(image_positions.any()):
                h = self._scatter_vision_features(h, image_positions, pixel_values)
        elif pixel_patches is not None and bool(image_positions.any()):
            if pixel_patches.shape[-1] != self.config.patch_dim:
                c = self.config
                raise ValueError(f"pixel_patches hold {pixel_patches.shape[-1]} values per patch but this model takes "
                                 f"{c.patch_dim} (num_channels={c.num_channels} x patch_size={c.patch_size}^2); use "
                                 f"the processor saved with the model, or prepare the data with --image-size "
                                 f"{c.image_size} --patch-size {c.patch_size} --channels {c.num_channels}.")
            with_image = image_positions.any(1)
            patches = self.patch_embed(pixel_patches[with_image].to(h.dtype))  # [B_img, P, d]
            if patches.shape[0] * patches.shape[1] != int(image_positions.sum()):
                raise ValueError(f"{int(image_positions.sum())} image tokens in input_ids but "
                                 f"{patches.shape[0]}x{patches.shape[1]} patches; every image sample needs exactly "
                                 f"{self.config.num_patches} <image> tokens.")
            h = h.masked_scatter(image_positions[..., None], patches.reshape(-1, h.shape[-1]))
        return h if self.modality_embed is None else h + self.modality_embed(modality_ids)

    def _scatter_vision_features(self, h: Tensor, image_positions: Tensor, pixel_values: Tensor) -> Tensor:
        """Image positions get the vision tower's tokens. `pixel_values`: [B, C, H, W] (one row per
        sample, rows of samples without an image ignored) or [B_img, C, H, W] (images only)."""
        with_image = image_positions.any(1)
        if pixel_values.shape[0] == h.shape[0]:
            pixel_values = pixel_values[with_image]
        elif pixel_values.shape[0] != int(with_image.sum()):
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images for a batch of {h.shape[0]} "
                             f"samples of which {int(with_image.sum())} have <image> tokens; pass one image per "
                             "sample or one per sample with <image> tokens (the model's processor does).")
        features = self.vision(pixel_values)  # [B_img, N, d]
        if features.shape[0] * features.shape[1] != int(image_positions.sum()):
            raise ValueError(f"{int(image_positions.sum())} image tokens in input_ids but {features.shape[0]}x"
                             f"{features.shape[1]} vision tokens; every image sample needs exactly "
                             f"{features.shape[1]} <image> tokens (use the processor saved with the model).")
        return h.masked_scatter(image_positions[..., None], features.reshape(-1, h.shape[-1]).to(h.dtype))

    def attention_mask_for(self, L: int, past: int, attention_mask: Tensor | None, device) -> Tensor:
        """[B|1, 1, L, past+L] bool: causal, within `sliding_window` if set, and not padding."""
        mask = torch.ones(L, past + L, dtype=torch.bool, device=device).tril(past)
        if self.config.sliding_window is not None:  # key j is visible from query i if i - j < window
            mask = mask & ~torch.ones_like(mask).tril(past - self.config.sliding_window)
        mask = mask[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -(past + L):].bool()
            # A left-padding query sees no key at all: let it see itself, so no attention kernel meets
            # an all-masked row (NaN on some backends); real tokens never see padding keys.
            diagonal = torch.ones(L, past + L, dtype=torch.bool, device=device).tril(past).triu(past)
            mask = mask | (diagonal & ~mask.any(-1, keepdim=True))
        return mask

    def forward(self, input_ids, pixel_patches=None, attention_mask=None, modality_ids=None,
                past_key_values=None, use_cache=None, pixel_values=None, position_ids=None, **_):
        """Run the decoder; returns hidden states, the cache and each MoE layer's routing output."""
        B, L = input_ids.shape
        if modality_ids is None:
            modality_ids = torch.where(input_ids == self.config.image_token_id, IMAGE, TEXT)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            positions = positions_from_mask(attention_mask, past, L, input_ids.device)
        else:
            positions = position_ids.to(device=input_ids.device, dtype=torch.long).reshape(-1, L)
        limit = self.config.max_position_embeddings
        # past + L bounds the positions; only past it are they read back (one host sync)
        if self.position_embed is not None and past + L > limit and int(positions.max()) >= limit:
            raise ValueError(f"position {int(positions.max())} is past max_position_embeddings={limit} (learned "
                             f"position embeddings): shorten the prompt or generate fewer tokens.")
        h = self.embed(input_ids, pixel_patches, modality_ids, pixel_values)
        rotary = None
        if self.position_embed is not None:
            h = h + self.position_embed(positions)
        else:
            rotary = self.rotary(positions, h.dtype)
        mask = self.attention_mask_for(L, past, attention_mask, h.device)
        token_mask = None if attention_mask is None else attention_mask[:, -L:]  # these positions' columns
        moe_outputs = []
        for layer in self.layers:
            h, moe = layer(h, modality_ids, mask, past_key_values if use_cache else None, rotary, token_mask)
            if moe is not None:
                moe_outputs.append(moe)
        return self.norm(h), moe_outputs, (past_key_values if use_cache else None)


class MmoeForCausalLM(MmoePreTrainedModel, GenerationMixin):
    """The multimodal MoE language model with its LM head: loss = text loss + aux loss + image loss."""
    # Tied only when config.tie_word_embeddings (transformers' rule): the LM head is the input embedding.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MmoeConfig):
        super().__init__(config)
        self.model = MmoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.patch_head = nn.Linear(config.hidden_size, config.patch_dim) if config.image_loss_coef > 0 else None
        self.post_init()
        self.init_experts_by_global_id()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table (HF API)."""
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head (HF API)."""
        return self.lm_head

    def forward(self, input_ids, pixel_patches=None, attention_mask=None, modality_ids=None, labels=None,
                past_key_values=None, use_cache=None, output_router_logits=None, return_dict=True,
                pixel_values=None, position_ids=None, has_image=None, sample_kind=None, **kwargs):
        """`position_ids` default to the attention mask's (left padding works, see `positions_from_mask`).
        `has_image` and `sample_kind` are the processor's batch metadata (for data loaders and
        metrics): accepted so that `model(**processor(...))` and `generate(**processor(...))` work,
        and not used (the image positions are the `<image>` tokens)."""
        if past_key_values is None:
            past_key_values = kwargs.get("cache")  # transformers >= 5.2x names it `cache`
        hidden, moe_outputs, cache = self.model(input_ids, pixel_patches, attention_mask, modality_ids,
                                                past_key_values, use_cache, pixel_values, position_ids)
        logits = self.lm_head(hidden)
        aux = torch.stack([m.aux_loss for m in moe_outputs]).mean() if moe_outputs else None
        loss = text_loss = image_loss = None
        if labels is not None:
            text_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                        ignore_index=-100)
            loss = text_loss
            if aux is not None:
                loss = loss + self.config.router_aux_loss_coef * aux
            if self.patch_head is not None and pixel_patches is not None:
                image_loss = self._next_patch_loss(hidden, pixel_patches, input_ids, modality_ids)
                loss = loss + self.config.image_loss_coef * image_loss
        want_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        return MmoeCausalLMOutput(
            loss=loss, aux_loss=aux, logits=logits, **{_CACHE_FIELD: cache},
            router_logits=tuple(m.routing.logits for m in moe_outputs) if want_logits else None,
            text_loss=text_loss, image_loss=image_loss, routing_stats=[m.routing.stats for m in moe_outputs])

    def _next_patch_loss(self, hidden, pixel_patches, input_ids, modality_ids):
        """MSE of predicting patch t+1 from the hidden state at t, for image positions t+1."""
        if modality_ids is None:
            modality_ids = torch.where(input_ids == self.config.image_token_id, IMAGE, TEXT)
        image_positions = modality_ids == IMAGE
        with_image = image_positions.any(1)
        targets = torch.zeros(*input_ids.shape, pixel_patches.shape[-1], device=hidden.device, dtype=hidden.dtype)
        targets = targets.masked_scatter(image_positions[..., None], pixel_patches[with_image].to(hidden.dtype))
        predicted = self.patch_head(hidden[:, :-1])
        next_is_image = image_positions[:, 1:]
        if not bool(next_is_image.any()):
            return hidden.new_zeros(())
        return F.mse_loss(predicted[next_is_image].float(), targets[:, 1:][next_is_image].float())

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      pixel_patches=None, use_cache=True, pixel_values=None, position_ids=None,
                                      **kwargs):
        """Only the tokens the cache lacks, with their per-row positions (continuing each row's own
        count under left padding); the image only while the prompt is fed. Everything else the
        processor returned (`modality_ids` of the prompt, `has_image`, ...) is dropped: image positions
        are recomputed from the `<image>` tokens."""
        past_key_values = past_key_values if past_key_values is not None else kwargs.get("cache")
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past > 0:  # the cache holds the prompt (and its image): feed only new tokens
            input_ids = input_ids[:, past:]
            pixel_patches = pixel_values = None
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, input_ids.shape[1], input_ids.device)
        else:  # given by the caller for the prompt; generate extends them by one per step
            position_ids = position_ids[..., -input_ids.shape[1]:]
        inputs = {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                  "pixel_patches": pixel_patches, "use_cache": use_cache, "position_ids": position_ids}
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        return inputs

    def _validate_generated_length(self, generation_config, input_ids_length, *args, **kwargs):
        """transformers' checks, plus: with learned position embeddings, refuse before the first
        forward a generation that would run past `max_position_embeddings` (rather than failing
        mid-generation); rotary models extrapolate, as in HF."""
        super()._validate_generated_length(generation_config, input_ids_length, *args, **kwargs)
        limit, max_length = self.config.max_position_embeddings, generation_config.max_length
        if self.model.position_embed is not None and max_length is not None and max_length > limit:
            room = limit - input_ids_length
            fix = f"pass max_new_tokens <= {room}" if room > 0 else "shorten the prompt"
            raise ValueError(f"generate: a prompt of {input_ids_length} tokens grows to {max_length} "
                             f"(max_new_tokens={generation_config.max_new_tokens}) but this model has "
                             f"max_position_embeddings={limit} (learned positions); {fix}.")

    @torch.no_grad()
    def caption_scores(self, input_ids, pixel_patches, attention_mask, labels, pixel_values=None) -> Tensor:
        """Sum of log-probabilities of the labelled tokens per sample (for caption ranking); images as
        `pixel_patches` (patch models) or `pixel_values` (HF vision tower)."""
        logits = self(input_ids=input_ids, pixel_patches=pixel_patches, attention_mask=attention_mask,
                      use_cache=False, pixel_values=pixel_values).logits[:, :-1].float()
        targets = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return (logp * (targets != -100)).sum(-1)
