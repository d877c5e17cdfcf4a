"""`mmoe-ds upcycle`: an `MmoeForCausalLM` from a dense HF Llama-family causal LM (sparse upcycling).

Komatsuzaki et al., "Sparse Upcycling" (2022); MoE-LLaVA's stage 3. The dense LM's weights map one
to one: embeddings, RMSNorms, attention (q/k/v fused into `qkv`, GQA and RoPE kept as they are),
the LM head (or the tie); the FFN (gate_proj, up_proj, down_proj = Mixtral's w1, w3, w2) of each
chosen layer is copied into every expert (optionally with a little noise), the other layers keep
their dense FFN, and the router starts at zero (or small). With `--vision`, a transformers vision
model (SigLIP, CLIP, any model with patch features) becomes the image encoder, followed by a new
projector.

Function preservation: with identical experts and top-k >= 2, the router renormalises the gates
of each token's k routes to sum to 1 (DeepSpeed's top-k gate), so every MoE block equals the
dense FFN and the upcycled text model equals the dense LM. With top-1 the gate is the raw router
probability (Switch), 1/E at a zero router: the block then gives FFN/E, not the dense FFN.
Routing is dropless by default (a zero router sends every token to the same experts, which a
capacity limit would drop); `--capacity-factor` restores capacity.

The modality embedding is off: a learned vector added to every token's embedding would shift the
pretrained LM's inputs (text included) away from what it was trained on; routers that need the
modality get it in their own input (`--router-mode modality_bias`, ...).

The `<image>` token is added to the LM's tokenizer as a special token; its embedding row (a new
row, or an unused padding row of the embedding) and LM-head row are the mean of the rows of the
tokenizer's other tokens. The folder is written the way `mmoe-ds export` writes one (weights,
config, remote code, tokenizer / processor, card), atomically.

Memory: the MoE model exists only on the meta device (names and shapes); each output tensor is made
from its source when it is written (the dense tensor read from the LM's files, the FFN read once per
layer and copied into each expert) and goes straight to its place in the safetensors shards, so the
peak is about the largest tensor (the embedding in fp32), not the model or a shard; the files are the
bytes `mmoe-ds export` (`write_model`, `save_pretrained`) writes for the whole model
(bench/upcycle_memory.py, docs/benchmarks.md). The experts are written under their per-expert names
(`...deepspeed_experts.{e}.w1.weight`, ...), as every folder holds them on disk; the model holds each
layer's experts as two 3-D tensors and loads either naming.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.schema import IMAGE_TOKEN
from ..errors import UpcycleError
from ..io.atomic import staged_directory
from ..model import MmoeConfig, MmoeForCausalLM
from . import DEFAULT_MAX_SHARD_SIZE, parse_shard_size

# Dense LMs this maps one to one: architecture class -> model_type.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}



@dataclass
class UpcycleOptions:
    """What `mmoe-ds upcycle` builds (the CLI flags, validated by `MmoeConfig` / `RouterConfig`)."""

    experts: int
    top_k: int = 2
    moe_layer_frequency: int = 1
    moe_layers: list[int] | None = None
    noise: float = 0.0  # std of Gaussian noise added to each expert copy, relative to that weight's std
    router_init: str = "zero"  # "zero" | "normal" (std = the LM's initializer_range)
    router_mode: str = "agnostic"
    router: dict = field(default_factory=dict)  # further RouterConfig fields (they win over the above)
    capacity_factor: float | None = None  # None: dropless routing
    projector: str = "mlp2x_gelu"
    vision_max_tokens: int | None = None
    freeze_vision: bool = True
    dtype: str = "float32"
    resize: bool = True  # grow the embedding when the tokenizer's <image> id does not fit
    seed: int = 0
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE  # safetensors shards of at most this size


@dataclass
class UpcycleResult:
    """What `upcycle` wrote: the folder, the MoE config, and the facts the CLI prints."""

    out: Path
    config: MmoeConfig
    architecture: str
    image_token_id: int
    moe_layers: list[int]
    vocab_size: int  # of the MoE model
    lm_vocab_size: int  # of the dense LM


@dataclass
class PreparedTokenizer:
    """The LM's tokenizer with `<image>`, and where `<image>` sits in the embedding."""

    tokenizer: object
    image_token_id: int
    vocab_size: int  # embedding rows of the MoE model
    token_ids: list[int]  # ids of the tokenizer's other tokens below the LM's vocab size (their rows give the mean)


def read_lm_config(path: str | os.PathLike):
    """Args: path: a local folder with a dense LM's config.json.
    Returns: (its transformers config, the architecture name). Raises UpcycleError for another architecture."""
    from transformers import AutoConfig

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UpcycleError(f"--lm {path}: not a local model folder with config.json; download the model first "
                           "(e.g. `hf download Qwen/Qwen2-0.5B --local-dir models/qwen2-0.5b`) and pass that folder.")
    raw = json.loads((folder / "config.json").read_text())
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and not architectures:
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}.get(model_type)
    if arch is None or SUPPORTED_ARCHITECTURES[arch] != model_type:
        raise UpcycleError(f"--lm {path}: architecture {architectures or '?'} (model_type {model_type!r}) is not "
                           f"supported; upcycle takes a dense {supported}.")
    return AutoConfig.from_pretrained(folder, local_files_only=True), arch


def _rope_fields(lm_config) -> tuple[float, dict | None]:
    """(rope_theta, HF rope_scaling or None) from a transformers 5 `rope_parameters` or 4.x fields."""
    params = dict(getattr(lm_config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(lm_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(lm_config, "rope_theta", 10000.0))
    theta = float(params.pop("rope_theta", getattr(lm_config, "rope_theta", 10000.0)))
    params.pop("partial_rotary_factor", None)
    rope_type = params.get("rope_type", params.get("type", "default"))
    return theta, (params if rope_type != "default" else None)


def _check_lm_features(lm_config, arch: str) -> None:
    """Refuse the variants this decoder cannot reproduce exactly, naming the field."""
    problems = []
    if getattr(lm_config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={lm_config.hidden_act!r} (the experts are SwiGLU with silu)")
    if getattr(lm_config, "mlp_bias", False):
        problems.append("mlp_bias=true (the experts have no biases)")
    if arch == "LlamaForCausalLM" and getattr(lm_config, "attention_bias", False):
        problems.append("attention_bias=true (Llama's o_proj bias is not supported)")
    if arch == "Qwen2ForCausalLM" and getattr(lm_config, "use_sliding_window", False):
        problems.append("use_sliding_window=true (per-layer sliding windows are not supported)")
    if getattr(lm_config, "partial_rotary_factor", None) not in (None, 1.0):
        problems.append(f"partial_rotary_factor={lm_config.partial_rotary_factor} (rotary on part of a head)")
    if problems:
        raise UpcycleError(f"--lm: this {arch} uses " + "; ".join(problems) + "; upcycle a checkpoint without them.")


def prepare_tokenizer(path: str | os.PathLike, lm_vocab_size: int, resize: bool) -> PreparedTokenizer:
    """Load the LM's (fast) tokenizer and add `<image>` as a special token.

    Args:
        path: the LM folder.
        lm_vocab_size: rows of the LM's embedding.
        resize: allow growing the embedding when `<image>` gets an id at or beyond `lm_vocab_size`.
    Returns:
        the tokenizer with `<image>`, its id, the MoE model's vocab size and the ids whose rows give the mean.
    Raises:
        UpcycleError: a slow or missing tokenizer, `<image>` already an ordinary text token, an id shared
        with another token or a special token, or no room for it with `resize=False`.
    """
    from transformers import AddedToken, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:  # ImportError: a sentencepiece-only folder without sentencepiece
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UpcycleError(f"--lm {path}: no tokenizer could be loaded ({first}); the folder needs the LM's "
                           "tokenizer files (tokenizer.json).") from None
    if not getattr(tok, "is_fast", False):
        raise UpcycleError(f"--lm {path}: the tokenizer is a slow (Python) tokenizer; save the fast one beside the "
                           "model (tokenizer.json: AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained).")
    vocab = tok.get_vocab()
    special_ids = {i for i in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) if i is not None}
    if IMAGE_TOKEN in vocab and IMAGE_TOKEN not in tok.all_special_tokens:
        raise UpcycleError(f"--lm {path}: the tokenizer already has {IMAGE_TOKEN!r} as an ordinary text token (id "
                           f"{vocab[IMAGE_TOKEN]}), so captions containing that text would become image positions; "
                           f"use a tokenizer without it.")
    if IMAGE_TOKEN not in vocab:
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    sharing = sorted(t for t, i in tok.get_vocab().items() if i == image_id and t != IMAGE_TOKEN)
    if sharing or image_id in special_ids:
        raise UpcycleError(f"--lm {path}: the tokenizer gives {IMAGE_TOKEN!r} the id {image_id}, which "
                           f"{sharing or 'a special token (pad/bos/eos/unk)'} already has (its ids are not "
                           f"contiguous); fix the tokenizer's vocabulary so new tokens get unused ids.")
    if image_id >= lm_vocab_size and not resize:
        raise UpcycleError(f"--no-resize: the LM's embedding has {lm_vocab_size} rows and the tokenizer's tokens fill "
                           f"them ({IMAGE_TOKEN!r} would get id {image_id}); drop --no-resize to add a row.")
    token_ids = sorted(i for t, i in tok.get_vocab().items() if i < lm_vocab_size and t != IMAGE_TOKEN)
    return PreparedTokenizer(tok, image_id, max(lm_vocab_size, image_id + 1), token_ids)


def build_config(lm_config, arch: str, prepared: PreparedTokenizer, options: UpcycleOptions,
                 vision_config: dict | None) -> MmoeConfig:
    """The MoE model's config: the LM's shapes, RoPE and GQA, plus experts, router and vision fields.
    MmoeConfig / RouterConfig validation errors (naming the field) become UpcycleError."""
    rope_theta, rope_scaling = _rope_fields(lm_config)
    heads = lm_config.num_attention_heads
    router = {"mode": options.router_mode}
    if options.capacity_factor is None:
        router["drop_tokens"] = False
    else:
        router.update(capacity_factor=options.capacity_factor, eval_capacity_factor=options.capacity_factor)
    router.update(options.router)
    sliding = getattr(lm_config, "sliding_window", None) if arch == "MistralForCausalLM" else None
    fields = dict(
        vocab_size=prepared.vocab_size, hidden_size=lm_config.hidden_size,
        num_hidden_layers=lm_config.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=getattr(lm_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(lm_config, "head_dim", None) or lm_config.hidden_size // heads,
        intermediate_size=lm_config.intermediate_size, moe_intermediate_size=lm_config.intermediate_size,
        num_local_experts=options.experts, num_experts_per_tok=options.top_k,
        moe_layer_frequency=options.moe_layer_frequency, moe_layers=options.moe_layers, router=router,
        max_position_embeddings=lm_config.max_position_embeddings, rms_norm_eps=lm_config.rms_norm_eps,
        initializer_range=getattr(lm_config, "initializer_range", 0.02), position_embedding_type="rope",
        rope_theta=rope_theta, rope_scaling=rope_scaling, attention_bias=arch == "Qwen2ForCausalLM",
        sliding_window=sliding, tie_word_embeddings=bool(getattr(lm_config, "tie_word_embeddings", False)),
        modality_embedding=False, image_token_id=prepared.image_token_id, image_loss_coef=0.0,
        pad_token_id=prepared.tokenizer.pad_token_id, bos_token_id=lm_config.bos_token_id,
        eos_token_id=lm_config.eos_token_id)
    if vision_config is not None:
        fields.update(vision_encoder="hf", vision_config=vision_config, vision_projector=options.projector,
                      vision_max_tokens=options.vision_max_tokens, freeze_vision_tower=options.freeze_vision)
    try:
        return MmoeConfig(**fields)
    except ValueError as e:
        raise UpcycleError(f"{e} (set by the upcycle flags --experts, --top-k, --moe-layers, --router-mode, "
                           "--router, ...)") from None


def _mean_rows(weight: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The mean of the rows `ids` of `weight` (a consecutive run of ids is read in place, not gathered:
    the same contiguous rows, so the same sum, without a copy of the embedding)."""
    consecutive = bool(ids) and ids == list(range(ids[0], ids[0] + len(ids)))
    rows = weight[ids[0]: ids[0] + len(ids)] if consecutive else weight[torch.tensor(ids)]
    return rows.float().mean(0).to(weight.dtype)


def resized_rows(weight: torch.Tensor, prepared: PreparedTokenizer, in_place: bool = False) -> torch.Tensor:
    """[vocab_size, d]: the LM's rows, extra rows added; the `<image>` row and any added row are the
    mean of the tokenizer's other tokens' rows. With `in_place` (a tensor the caller owns) and no row to
    add, `weight` itself is changed and returned (no second copy of the embedding)."""
    mean = _mean_rows(weight, prepared.token_ids)
    if in_place and weight.shape[0] == prepared.vocab_size:
        out = weight
    else:
        out = weight.new_empty(prepared.vocab_size, weight.shape[1])
        out[: weight.shape[0]] = weight
    out[weight.shape[0]:] = mean
    out[prepared.image_token_id] = mean
    return out


def iter_mapped_weights(lm_state: Mapping[str, torch.Tensor], config: MmoeConfig, prepared: PreparedTokenizer,
                        options: UpcycleOptions) -> Iterator[tuple[str, torch.Tensor]]:
    """The dense LM's tensors in the MoE model's names, one at a time, layer by layer (everything the LM
    has; the routers, the vision tower and the projector are not in it).

    Args:
        lm_state: the HF Llama/Qwen2/Mistral state dict (`model.layers.{i}.self_attn.q_proj.weight`, ...) in
            fp32, or a lazy mapping (`LazyTensors`) that reads each tensor when asked for it.
        config: the MoE model's config (which layers are MoE, how many experts).
        prepared: the tokenizer's `<image>` placement (embedding resize).
        options: noise and seed for the expert copies; the noise is drawn from one generator in the order
            layer, expert, w1/w3/w2, so the same seed gives the same experts however they are written.
    Yields:
        (MoE parameter name, fp32 tensor); a layer's FFN is read once and copied into each expert.
    """
    g = torch.Generator().manual_seed(options.seed)
    fresh = getattr(lm_state, "returns_copies", False)  # LazyTensors: each lookup is a new tensor, ours to change
    yield "model.embed_tokens.weight", resized_rows(lm_state["model.embed_tokens.weight"], prepared, fresh)
    yield "model.norm.weight", lm_state["model.norm.weight"]
    if not config.tie_word_embeddings:
        yield "lm_head.weight", resized_rows(lm_state["lm_head.weight"], prepared, fresh)
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        yield dst + "attn_norm.weight", lm_state[src + "input_layernorm.weight"]
        yield dst + "ffn_norm.weight", lm_state[src + "post_attention_layernorm.weight"]
        attn = src + "self_attn."
        yield dst + "attn.qkv.weight", torch.cat([lm_state[attn + f"{p}_proj.weight"] for p in "qkv"])
        if config.attention_bias:
            yield dst + "attn.qkv.bias", torch.cat([lm_state[attn + f"{p}_proj.bias"] for p in "qkv"])
        yield dst + "attn.o_proj.weight", lm_state[attn + "o_proj.weight"]
        ffn = {"w1": lm_state[src + "mlp.gate_proj.weight"], "w3": lm_state[src + "mlp.up_proj.weight"],
               "w2": lm_state[src + "mlp.down_proj.weight"]}
        if not config.is_moe_layer(i):
            yield from ((f"{dst}ffn.{name}.weight", w) for name, w in ffn.items())
            continue
        for e in range(config.num_local_experts):
            for name, w in ffn.items():
                if options.noise > 0:
                    w = w + torch.randn(w.shape, generator=g, dtype=torch.float32).to(w.dtype) * (
                        options.noise * w.float().std())
                yield f"{dst}ffn.deepspeed_moe.experts.deepspeed_experts.{e}.{name}.weight", w


def map_weights(lm_state: dict[str, torch.Tensor], config: MmoeConfig, prepared: PreparedTokenizer,
                options: UpcycleOptions) -> dict[str, torch.Tensor]:
    """`iter_mapped_weights` as one dict {MoE parameter name: tensor} (the whole model in memory)."""
    return dict(iter_mapped_weights(lm_state, config, prepared, options))


def _module_names(model: torch.nn.Module) -> dict[int, str]:
    """{id(module): its name in the state dict} for every submodule of `model`."""
    return {id(module): name for name, module in model.named_modules()}


def router_weights(model: MmoeForCausalLM, options: UpcycleOptions) -> Iterator[tuple[str, torch.Tensor]]:
    """Router weights: zero, or normal(0, initializer_range) seeded by `options.seed` (drawn layer by layer).
    A modality_bias table starts at zero (the router then starts modality-agnostic). `model` may be on the
    meta device: only its parameter names and shapes are read.
    Yields: (parameter name, fp32 tensor)."""
    g = torch.Generator().manual_seed(options.seed + 1)
    std = model.config.initializer_range
    names = _module_names(model)
    for layer in model.model.layers:
        if not layer.is_moe:
            continue
        gate = layer.ffn.deepspeed_moe.gate
        for name, p in gate.named_parameters(prefix=names[id(gate)]):
            if options.router_init == "normal" and p is gate.wg.weight:
                yield name, torch.randn(p.shape, generator=g) * std
            else:
                yield name, torch.zeros(p.shape)


def fresh_weights(model: MmoeForCausalLM, options: UpcycleOptions) -> Iterator[tuple[str, torch.Tensor]]:
    """The modules neither the LM nor the vision model has: the vision projector (with `--vision`) or the
    patch embedding (without), initialised as the model's `_init_weights` makes a Linear (weights
    normal(0, initializer_range), biases zero) from a generator seeded by `options.seed` (+ 2), so the same
    seed gives the same folder. `model` may be on the meta device.
    Yields: (parameter name, fp32 tensor)."""
    g = torch.Generator().manual_seed(options.seed + 2)
    std = model.config.initializer_range
    names = _module_names(model)
    vision = getattr(model.model, "vision", None)
    new = vision.projector if vision is not None else model.model.patch_embed
    for name, p in new.named_parameters(prefix=names[id(new)]):
        yield name, (torch.randn(p.shape, generator=g) * std if p.dim() > 1 else torch.zeros(p.shape))


def init_routers(model: MmoeForCausalLM, options: UpcycleOptions) -> None:
    """Set the routers of a built model in place (`router_weights`)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in router_weights(model, options):
            params[name].copy_(value)


# -- reading the dense checkpoints one tensor at a time ---------------------------------------------------------

WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json",
                                                                        "pytorch_model.bin"))


class LazyTensors(Mapping):
    """A folder's weights (safetensors shards with model.safetensors.index.json, one model.safetensors, or
    the older pytorch_model.bin files) as a read-only mapping that reads a tensor when it is asked for,
    returned in fp32 (as `from_pretrained(..., dtype=torch.float32)` gives it): nothing else stays in memory.
    A safetensors file is opened for each tensor (its pages are unmapped again); a .bin file is a pickle and
    is read whole (weights-only), one file at a time; a .bin lookup is a copy too (`returns_copies`).

    Args:
        folder: the model folder.
        flag: the CLI flag that named it (`--lm`, `--vision`), for messages.
        prefix: tried in front of a name the files lack (a base model saved without `model.`).
    Raises:
        UpcycleError: no weight files in the folder; a name the files lack (on lookup).
    """

    returns_copies = True

    def __init__(self, folder: str | os.PathLike, flag: str, prefix: str = ""):
        self.folder, self.flag, self.prefix = Path(folder), flag, prefix
        self._cached: tuple[Path, dict] | None = None
        for index_name, single in WEIGHT_FILES:
            if (self.folder / index_name).is_file():
                weight_map = json.loads((self.folder / index_name).read_text())["weight_map"]
                self.files = {name: self.folder / file for name, file in weight_map.items()}
                break
            if (self.folder / single).is_file():
                self.files = dict.fromkeys(self._keys(self.folder / single), self.folder / single)
                break
        else:
            raise UpcycleError(f"{flag} {folder}: no weights (model.safetensors, its shards with "
                               "model.safetensors.index.json, or pytorch_model.bin); save the model with "
                               "save_pretrained into that folder.")

    @staticmethod
    def _keys(path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        from ..io.safe_load import safe_torch_load

        return list(safe_torch_load(path))

    def _key(self, name: str) -> str:
        if name in self.files:
            return name
        if self.prefix and name.startswith(self.prefix) and name[len(self.prefix):] in self.files:
            return name[len(self.prefix):]
        raise UpcycleError(f"{self.flag} {self.folder}: the weights have no tensor {name!r} (its config asks for "
                           "it); the folder's weights and config.json are from different models.")

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._key(name)
        path = self.files[key]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                tensor = f.get_tensor(key)
        else:
            if self._cached is None or self._cached[0] != path:
                from ..io.safe_load import safe_torch_load

                self._cached = None  # the previous file goes before the next one is read
                self._cached = (path, safe_torch_load(path))
            tensor = self._cached[1][key]
            if tensor.dtype == torch.float32 or not tensor.is_floating_point():
                tensor = tensor.clone()  # the file's dict keeps its own
        return tensor.float() if tensor.is_floating_point() else tensor

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, without reading it (a .bin file is read)."""
        key = self._key(name)
        path = self.files[key]
        if path.suffix != ".safetensors":
            return tuple(self[name].shape)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def vision_weights(model: MmoeForCausalLM, vision: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """The pretrained encoder's tensors in the MoE model's names, one at a time (fp32). A tensor is found
    under the encoder's own name, or as the one name ending in `.<that name>` (an encoder inside a whole
    CLIP / SigLIP model). Folders where that does not find every tensor with its shape are read by
    transformers' loader instead (`load_tower_weights`: the whole tower in memory, its errors).

    Args:
        model: the MoE model (the meta device is enough: names and shapes).
        vision: the vision model's folder.
    Raises:
        UpcycleError: weights that do not fit the vision config (from the loader).
    """
    encoder = model.model.vision.encoder
    prefix = _module_names(model)[id(encoder)] + "."
    wanted = {name: tuple(t.shape) for name, t in encoder.state_dict().items()}
    found: dict[str, str] = {}
    try:
        source = LazyTensors(vision, "--vision")
        for name, shape in wanted.items():
            candidates = [name] if name in source.files else [k for k in source.files if k.endswith("." + name)]
            if len(candidates) != 1 or source.shape(candidates[0]) != shape:
                break
            found[name] = candidates[0]
    except UpcycleError:  # no weight file lazy reading knows (e.g. none there): the loader below reads the
        found.clear()     # folder and names what is wrong with it
    if len(found) == len(wanted):
        for name, key in found.items():
            yield prefix + name, source[key]
        return
    from ..model.vision import build_encoder, load_tower_weights

    tower = torch.nn.Module()
    tower.encoder = build_encoder(model.config.vision_config)
    try:
        load_tower_weights(tower, vision)
    except ValueError as e:
        raise UpcycleError(str(e)) from None
    for name, tensor in tower.encoder.state_dict().items():
        yield prefix + name, tensor.float()


# -- writing the MoE folder's weights one tensor at a time ------------------------------------------------------

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class SafetensorsShardWriter:
    """Writes the safetensors files `model.save_pretrained(folder, max_shard_size=...)` writes (the same
    bytes: huggingface_hub's split into shards, safetensors' layout, model.safetensors.index.json), given
    each tensor's name, shape and dtype up front and then the tensors one at a time, in any order.

    A safetensors file is a header (every tensor's dtype, shape and byte range, sorted by name) followed by
    the data, so with the shapes known the header is written first and each tensor goes straight to its
    place: memory holds one tensor, however large the model or a shard.

    Args:
        folder: where the files go (a fresh, staged folder).
        specs: {name: (shape, dtype)} of every tensor the files will hold, in the model's state-dict order
            (the order the split into shards follows); the tensors of one file share one dtype.
        max_shard_size: as for `save_pretrained` (bytes or "2GB").
        total_parameters: the index's `metadata.total_parameters` (`model.num_parameters()`).
    """

    def __init__(self, folder: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_size: int | str, total_parameters: int):
        import struct

        from huggingface_hub import split_torch_state_dict_into_shards

        self.folder, self.specs, self.total_parameters = Path(folder), specs, total_parameters
        meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in specs.items()}
        self.split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                                        max_shard_size=max_shard_size)
        self._files, self._where, self._written = [], {}, set()
        for filename, names in self.split.filename_to_tensors.items():
            dtypes = {specs[n][1] for n in names}
            if len(dtypes) != 1:
                raise ValueError(f"{filename}: tensors of dtypes {sorted(map(str, dtypes))} in one file; this writer "
                                 "lays out one dtype per file.")
            header, offset, places = {"__metadata__": {"format": "pt"}}, 0, {}
            for name in sorted(names):
                shape, dtype = specs[name]
                nbytes = torch.Size(shape).numel() * dtype.itemsize
                header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                places[name], offset = offset, offset + nbytes
            raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
            f = open(self.folder / filename, "wb")
            self._files.append(f)
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
            self._where.update({name: (f, 8 + len(raw) + place) for name, place in places.items()})

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Cast `tensor` to its planned dtype and write it in its place. Raises: RuntimeError for a name
        not planned or written twice; ValueError for a shape other than the planned one."""
        if name not in self._where or name in self._written:
            raise RuntimeError(f"upcycle: the weight {name!r} is " + ("written twice." if name in self._written
                               else "not in the MoE model (a mapping bug)."))
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, the MoE model's config asks for {tuple(shape)}")
        f, offset = self._where[name]
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        f.seek(offset)
        f.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._written.add(name)

    def close(self) -> None:
        """Close the files and write the index (sharded only). Raises: RuntimeError if a tensor was not written."""
        for f in self._files:
            f.close()
        missing = [name for name in self.specs if name not in self._written]
        if missing:
            raise RuntimeError(f"upcycle: {len(missing)} weight(s) were not written ({missing[:5]}): a mapping bug.")
        if self.split.is_sharded:
            index = {"metadata": {"total_parameters": self.total_parameters, **self.split.metadata},
                     "weight_map": self.split.tensor_to_filename}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True)
                                                                      + "\n")

    def __enter__(self) -> SafetensorsShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            for f in self._files:
                f.close()


def weight_specs(model: MmoeForCausalLM, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of what `write_model` (`mmoe-ds export`) writes for the model cast to `dtype`,
    in the order `save_pretrained` splits them into shards: `disk_state_dict` (the experts under their
    per-expert names, `...deepspeed_experts.{e}.w1.weight`, ..., although the model holds them as 3-D
    `experts.w13` / `experts.w2`), tied weights left out (transformers' rule), then transformers' own
    `revert_weight_conversion` as `save_pretrained` runs it (it sorts the names where the model has a
    registered conversion, which decides the shards); floating tensors in `dtype`. `model` may be on the
    meta device."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from ..moe.experts import to_per_expert

    # `disk_state_dict` with the tied weights removed first: on the meta device transformers finds ties by
    # looking each name up in the model, which has no per-expert names (removing only drops the tied names)
    state = to_per_expert(remove_tied_weights_from_state_dict(model.state_dict(), model))
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: save_pretrained writes the state dict as given
        revert_weight_conversion = None
    if revert_weight_conversion is not None:
        state = revert_weight_conversion(model, state)
    return {name: (tuple(t.shape), dtype if t.is_floating_point() else t.dtype) for name, t in state.items()}


def write_config_files(model: MmoeForCausalLM, folder: Path, dtype: torch.dtype) -> None:
    """config.json and generation_config.json as `write_model` (`mmoe-ds export`) writes them for the model
    cast to `dtype`: the auto_map to the shipped code, `dtype` and `architectures` as `save_pretrained` sets."""
    from transformers import GenerationConfig

    from .remote_code import AUTO_MAP

    c = model.config
    c.auto_map, c.dtype, c.architectures = dict(AUTO_MAP), str(dtype).split(".")[1], [type(model).__name__]
    c.save_pretrained(folder)
    GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                     max_length=c.max_position_embeddings, do_sample=False).save_pretrained(folder)


def upcycle(lm: str | os.PathLike, out: str | os.PathLike, options: UpcycleOptions,
            vision: str | os.PathLike | None = None) -> UpcycleResult:
    """Build the MoE model from the dense LM (and the vision model) and write it to `out`, one tensor at a time.

    The MoE model is built on the meta device (names, shapes, no memory); each of its tensors is made from
    its source (an LM tensor read from the LM's files, the LM's FFN copied into each expert with the same
    noise draws as before, a vision-tower tensor, a fresh router, projector or patch embedding) and written
    straight to its place in the safetensors shards, so memory holds a few tensors, never the model
    (`--max-shard-size` only decides the files).

    Args:
        lm: local folder of a LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM with its tokenizer.
        out: the folder to write (replaced whole, atomically).
        options: experts, routing, vision and saving options.
        vision: local folder of a transformers vision model with patch features (SigLIP, CLIP, ...), or None.
    Returns:
        what was written.
    Raises:
        UpcycleError: bad input, with the fix in the message (nothing is written then).
    """
    lm_config, arch, config, prepared, processor = prepare_upcycle(lm, options, vision)
    with torch.device("meta"):
        model = MmoeForCausalLM(config)
    lm_state = LazyTensors(lm, "--lm", prefix="model.")
    dtype = DTYPES[options.dtype]

    def write_weights(folder: Path) -> None:
        tensors = [iter_mapped_weights(lm_state, config, prepared, options), router_weights(model, options),
                   fresh_weights(model, options)]
        if vision is not None:
            tensors.append(vision_weights(model, vision))
        with SafetensorsShardWriter(folder, weight_specs(model, dtype), options.max_shard_size,
                                    model.num_parameters()) as writer:
            for name, tensor in (pair for group in tensors for pair in group):
                try:
                    writer.write(name, tensor)
                except ValueError as e:
                    raise UpcycleError(f"--lm {lm}: {e}; the weights do not fit the model's config.json.") from None
                del tensor
        write_config_files(model, folder, dtype)

    write_upcycled(out, write_weights, config, processor, prepared.image_token_id, lm, arch, options, vision)
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    return UpcycleResult(Path(out), config, arch, prepared.image_token_id, moe_layers, config.vocab_size,
                         lm_config.vocab_size)


def prepare_upcycle(lm: str | os.PathLike, options: UpcycleOptions, vision: str | os.PathLike | None):
    """Validate the options and read the LM's config and tokenizer (and the vision model's config).
    Returns: (the LM's transformers config, its architecture, the MoE config, the prepared tokenizer,
    the processor). Raises: UpcycleError for bad input."""
    if options.router_init not in ("zero", "normal"):
        raise UpcycleError(f"--router-init: 'zero' or 'normal', got {options.router_init!r}.")
    if options.noise < 0:
        raise UpcycleError(f"--noise: a standard deviation >= 0, got {options.noise}.")
    if options.dtype not in DTYPES:
        raise UpcycleError(f"--dtype: one of {list(DTYPES)}, got {options.dtype!r}.")
    lm_config, arch = read_lm_config(lm)
    _check_lm_features(lm_config, arch)
    vision_config = None
    if vision is not None:
        from ..model.vision import vision_config_from_pretrained

        try:
            vision_config = vision_config_from_pretrained(vision)
        except ValueError as e:
            raise UpcycleError(str(e)) from None
    prepared = prepare_tokenizer(lm, lm_config.vocab_size, options.resize)
    config = build_config(lm_config, arch, prepared, options, vision_config)
    return lm_config, arch, config, prepared, build_processor(prepared, config, vision)


def build_processor(prepared: PreparedTokenizer, config: MmoeConfig, vision: str | os.PathLike | None):
    """The model's processor: the LM's tokenizer with `<image>` (a missing pad / bos is handled by
    the processor), and with a vision model its own image processor (preprocessor_config.json);
    without one, the patch geometry of the config. Errors (no image processor, no <eos>) -> UpcycleError."""
    from ..data.pretrained_processor import PretrainedProcessor

    try:
        return PretrainedProcessor.from_components(prepared.tokenizer, vision, config)
    except ValueError as e:
        raise UpcycleError(str(e)) from None


def write_upcycled(out: str | os.PathLike, write_weights, config: MmoeConfig, processor, image_token_id: int, lm,
                   arch: str, options: UpcycleOptions, vision) -> None:
    """The `mmoe-ds export` layout: weights and config (`write_weights(folder)`), remote code,
    tokenizer / processor, card; staged in a temp folder and swapped in whole."""
    from . import add_processor_auto_map, write_code
    from .card import model_card

    with staged_directory(out, normalize_modes=True) as tmp:
        write_weights(tmp)
        processor.save_pretrained(tmp)
        write_code(tmp, with_processor=add_processor_auto_map(tmp))
        card = str(model_card({}, config, None, model_name="mmoe-ds upcycled multimodal MoE"))
        moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
        card += "\n".join(["", "## Upcycling", "",
                           f"Sparse-upcycled from the dense {arch} `{Path(lm).name}`"
                           + (f" with the vision model `{Path(vision).name}`" if vision else "") + ": "
                           f"the FFNs of layers {moe_layers} were copied into {options.experts} experts "
                           f"(noise {options.noise:g}), router initialised `{options.router_init}`, top-k "
                           f"{options.top_k}; `{IMAGE_TOKEN}` has id {image_token_id}.", ""])
        (tmp / "README.md").write_text(card)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices (e.g. 1,3)") \
            from None


def _shard_size(text: str) -> int:
    try:
        return parse_shard_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The `mmoe-ds upcycle` flags (argparse exits with status 2 on a malformed one)."""
    p = argparse.ArgumentParser(prog="mmoe-ds upcycle", description=__doc__.splitlines()[0])
    p.add_argument("--lm", required=True, help="local folder of a dense LlamaForCausalLM / Qwen2ForCausalLM / "
                                               "MistralForCausalLM with its tokenizer")
    p.add_argument("--vision", help="local folder of a transformers vision model with patch features (SigLIP, CLIP)")
    p.add_argument("--experts", type=int, required=True, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default %(default)s; >= 2 keeps the "
                                                        "upcycled model equal to the dense one at init)")
    layers = p.add_mutually_exclusive_group()
    layers.add_argument("--moe-layer-frequency", type=int, default=1, help="an MoE block every N layers (default 1)")
    layers.add_argument("--moe-layers", type=_int_list, help="explicit MoE layer indices, e.g. 1,3")
    p.add_argument("--noise", type=float, default=0.0, help="std of noise added to each expert copy, as a fraction "
                                                            "of that weight's std (default 0: identical experts)")
    p.add_argument("--router-init", choices=("zero", "normal"), default="zero")
    p.add_argument("--router-mode", default="agnostic", help="agnostic | modality_bias | separate_routers | "
                                                             "masked_pools (pools via --router)")
    p.add_argument("--router", type=json.loads, default={}, help="further RouterConfig fields as a JSON object")
    p.add_argument("--capacity-factor", type=float, help="per-expert capacity factor (default: dropless)")
    p.add_argument("--projector", choices=("linear", "mlp2x_gelu"), default="mlp2x_gelu")
    p.add_argument("--vision-max-tokens", type=int, help="pool the vision patch grid to at most N image tokens")
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze the vision tower during training (default: frozen)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the saved weights")
    p.add_argument("--no-resize", dest="resize", action="store_false",
                   help="never grow the embedding: fail if the tokenizer leaves no free row for <image>")
    p.add_argument("--seed", type=int, default=0, help="seed of the expert noise and a normal router init")
    p.add_argument("--max-shard-size", type=_shard_size, default=DEFAULT_MAX_SHARD_SIZE,
                   help="split the weights into safetensors shards of at most this size, with "
                        "model.safetensors.index.json (e.g. 2GB, 500MB; default %(default)s); memory does not "
                        "depend on it (the tensors are written one at a time)")
    p.add_argument("--out", required=True, help="folder to write the MoE model to")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    """`mmoe-ds upcycle ...`. Returns: 0, or 2 with a one-line error on bad input."""
    args = parse_args(argv)
    options = UpcycleOptions(
        experts=args.experts, top_k=args.top_k, moe_layer_frequency=args.moe_layer_frequency,
        moe_layers=args.moe_layers, noise=args.noise, router_init=args.router_init, router_mode=args.router_mode,
        router=args.router, capacity_factor=args.capacity_factor, projector=args.projector,
        vision_max_tokens=args.vision_max_tokens, freeze_vision=args.freeze_vision, dtype=args.dtype,
        resize=args.resize, seed=args.seed, max_shard_size=args.max_shard_size)
    try:
        result = upcycle(args.lm, args.out, options, args.vision)
    except UpcycleError as e:
        print(f"mmoe-ds upcycle: {e}", file=sys.stderr)
        return 2
    if options.top_k == 1:
        print("note: top-1 gates scale each MoE block by its router probability (1/experts at a zero router): the "
              "upcycled model does not start equal to the dense LM; use --top-k 2 for that.", file=sys.stderr)
    print(f"upcycled {result.architecture} {args.lm} -> {result.out}: MoE layers {result.moe_layers}, "
          f"{options.experts} experts, top-{options.top_k}, vocab {result.lm_vocab_size} -> {result.vocab_size}, "
          f"{IMAGE_TOKEN} id {result.image_token_id}")
    return 0
