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
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.schema import IMAGE_TOKEN
from ..errors import UpcycleError
from ..io.atomic import staged_directory
from ..model import MmoeConfig, MmoeForCausalLM

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


@dataclass
class UpcycleResult:
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
    return weight[torch.tensor(ids)].float().mean(0).to(weight.dtype)


def resized_rows(weight: torch.Tensor, prepared: PreparedTokenizer) -> torch.Tensor:
    """[vocab_size, d]: the LM's rows, extra rows added; the `<image>` row and any added row are the
    mean of the tokenizer's other tokens' rows."""
    out = weight.new_empty(prepared.vocab_size, weight.shape[1])
    out[: weight.shape[0]] = weight
    mean = _mean_rows(weight, prepared.token_ids)
    out[weight.shape[0]:] = mean
    out[prepared.image_token_id] = mean
    return out


def map_weights(lm_state: dict[str, torch.Tensor], config: MmoeConfig, prepared: PreparedTokenizer,
                options: UpcycleOptions) -> dict[str, torch.Tensor]:
    """The dense LM's state dict in the MoE model's names (everything the LM has; the router, the
    vision tower and the projector are not in it).

    Args:
        lm_state: the HF Llama/Qwen2/Mistral state dict (`model.layers.{i}.self_attn.q_proj.weight`, ...).
        config: the MoE model's config (which layers are MoE, how many experts).
        prepared: the tokenizer's `<image>` placement (embedding resize).
        options: noise and seed for the expert copies.
    Returns:
        {MoE parameter name: tensor}.
    """
    g = torch.Generator().manual_seed(options.seed)
    out = {"model.embed_tokens.weight": resized_rows(lm_state["model.embed_tokens.weight"], prepared),
           "model.norm.weight": lm_state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = resized_rows(lm_state["lm_head.weight"], prepared)
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        out[dst + "attn_norm.weight"] = lm_state[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = lm_state[src + "post_attention_layernorm.weight"]
        attn = src + "self_attn."
        out[dst + "attn.qkv.weight"] = torch.cat([lm_state[attn + f"{p}_proj.weight"] for p in "qkv"])
        if config.attention_bias:
            out[dst + "attn.qkv.bias"] = torch.cat([lm_state[attn + f"{p}_proj.bias"] for p in "qkv"])
        out[dst + "attn.o_proj.weight"] = lm_state[attn + "o_proj.weight"]
        ffn = {"w1": lm_state[src + "mlp.gate_proj.weight"], "w3": lm_state[src + "mlp.up_proj.weight"],
               "w2": lm_state[src + "mlp.down_proj.weight"]}
        if not config.is_moe_layer(i):
            out.update({f"{dst}ffn.{name}.weight": w for name, w in ffn.items()})
            continue
        for e in range(config.num_local_experts):
            for name, w in ffn.items():
                if options.noise > 0:
                    w = w + torch.randn(w.shape, generator=g, dtype=torch.float32).to(w.dtype) * (
                        options.noise * w.float().std())
                out[f"{dst}ffn.deepspeed_moe.experts.deepspeed_experts.{e}.{name}.weight"] = w
    return out


def init_routers(model: MmoeForCausalLM, options: UpcycleOptions) -> None:
    """Router weights: zero, or normal(0, initializer_range) seeded by `options.seed`. A
    modality_bias table starts at zero (the router then starts modality-agnostic)."""
    g = torch.Generator().manual_seed(options.seed + 1)
    std = model.config.initializer_range
    with torch.no_grad():
        for layer in model.model.layers:
            if not layer.is_moe:
                continue
            gate = layer.ffn.deepspeed_moe.gate
            for p in gate.parameters():
                if options.router_init == "normal" and p is gate.wg.weight:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                else:
                    p.zero_()


def _initialised_here(name: str, config: MmoeConfig) -> bool:
    """Parameters the dense LM does not have: routers, the patch embedding or vision tower, the tied head."""
    return (".deepspeed_moe.gate." in name or name.startswith(("model.patch_embed.", "model.vision."))
            or (config.tie_word_embeddings and name == "lm_head.weight"))


def load_dense_lm(path: str | os.PathLike):
    """The dense LM in fp32 (on CPU), from a local folder only."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)


def upcycle(lm: str | os.PathLike, out: str | os.PathLike, options: UpcycleOptions,
            vision: str | os.PathLike | None = None) -> UpcycleResult:
    """Build the MoE model from the dense LM (and the vision model) and write it to `out`.

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
    processor = build_processor(prepared, config, vision)
    dense = load_dense_lm(lm)
    state = map_weights(dense.state_dict(), config, prepared, options)
    del dense
    model = MmoeForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    not_from_lm = [k for k in missing if not _initialised_here(k, config)]
    if unexpected or not_from_lm:  # a mapping bug, never bad input
        raise RuntimeError(f"upcycle: weights {unexpected[:5]} do not exist in the MoE model; {not_from_lm[:5]} "
                           "were not mapped from the LM.")
    init_routers(model, options)
    if vision is not None:
        from ..model.vision import load_tower_weights

        try:
            load_tower_weights(model.model.vision, vision)
        except ValueError as e:
            raise UpcycleError(str(e)) from None
    model = model.to(DTYPES[options.dtype]).eval()
    write_upcycled(model, out, processor, prepared.image_token_id, lm, arch, options, vision)
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    return UpcycleResult(Path(out), config, arch, prepared.image_token_id, moe_layers, config.vocab_size,
                         lm_config.vocab_size)


def build_processor(prepared: PreparedTokenizer, config: MmoeConfig, vision: str | os.PathLike | None):
    """The model's processor: the LM's tokenizer with `<image>` (a missing pad / bos is handled by
    the processor), and with a vision model its own image processor (preprocessor_config.json);
    without one, the patch geometry of the config. Errors (no image processor, no <eos>) -> UpcycleError."""
    from ..data.pretrained_processor import PretrainedProcessor

    try:
        return PretrainedProcessor.from_components(prepared.tokenizer, vision, config)
    except ValueError as e:
        raise UpcycleError(str(e)) from None


def write_upcycled(model: MmoeForCausalLM, out: str | os.PathLike, processor, image_token_id: int, lm, arch: str,
                   options: UpcycleOptions, vision) -> None:
    """The `mmoe-ds export` layout: weights, config (auto_map), generation config, remote code,
    tokenizer / processor, card; staged in a temp folder and swapped in whole."""
    from . import add_processor_auto_map, write_code, write_model
    from .card import model_card

    with staged_directory(out, normalize_modes=True) as tmp:
        write_model(model, tmp)
        processor.save_pretrained(tmp)
        write_code(tmp, with_processor=add_processor_auto_map(tmp))
        card = str(model_card({}, model.config, None, model_name="mmoe-ds upcycled multimodal MoE"))
        moe_layers = [i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)]
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


def parse_args(argv: list[str]) -> argparse.Namespace:
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
        resize=args.resize, seed=args.seed)
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
