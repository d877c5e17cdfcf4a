"""The HF vision tower of `vision_encoder="hf"` models: a transformers vision encoder's patch
features, pooled, then projected to the decoder's width.

- Encoder: built from `config.vision_config` (a vision model's `config.to_dict()`, no download):
  `SiglipVisionModel` for "siglip_vision_model", `CLIPVisionModel` for "clip_vision_model", else
  `AutoModel.from_config`. Only ViT-style encoders qualify: their `last_hidden_state` is one token
  per patch of an (image_size / patch_size)² grid, after any class / register tokens, which are
  dropped (CLIP's CLS token, DINOv2's). Convolutional or hierarchical models (ResNet, ConvNeXt,
  Swin) and text models are refused by name. SigLIP's attention-pooling head is not built (its
  pooled output is not used).
- Pooling (`vision_max_tokens`): the patch grid is average-pooled to the largest square grid with
  at most that many tokens (e.g. 27×27 = 729 SigLIP-so400m patches -> 12×12 = 144 with 144).
- Projector (`vision_projector`): "linear", or LLaVA-1.5's "mlp2x_gelu" (Linear, GELU, Linear).
- `freeze_vision_tower`: the encoder's parameters get requires_grad=False (the trainer leaves them
  out of the optimizer), it runs without autograd and stays in eval mode; the projector trains.

This file is shipped with exports (no mmoe_ds imports), so it only needs torch and transformers.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

# vision_config keys that describe a hierarchical or convolutional backbone (feature maps, not patch tokens)
_NOT_PATCH_KEYS = ("hidden_sizes", "depths", "num_stages", "embed_dims")
# Whole image-text models whose vision half is the tower (their config nests it under "vision_config").
_DUAL_ENCODERS = ("siglip", "clip", "siglip2")


def _fix(where: str) -> str:
    return (f"{where}: use a ViT-style vision model whose last_hidden_state is one token per image patch (SigLIP, "
            f"CLIP, ViT, DINOv2) and build vision_config with vision_config_from_pretrained(path)")


def patch_grid(vision_config: dict) -> tuple[int, int, int]:
    """(patches per side, tokens before the patches, encoder width) of a ViT-style vision config.

    Raises:
        ValueError naming `vision_config` and the fix for anything that has no patch grid.
    """
    where = f"MmoeConfig.vision_config (model_type {vision_config.get('model_type')!r})"
    if any(isinstance(vision_config.get(k), (list, tuple)) for k in _NOT_PATCH_KEYS):
        raise ValueError(f"{where} is a convolutional or hierarchical backbone whose outputs are feature maps, not "
                         f"patch tokens; {_fix(where).split(': ', 1)[1]}.")
    image_size, patch_size, hidden = (vision_config.get(k) for k in ("image_size", "patch_size", "hidden_size"))
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0] if len(set(image_size)) == 1 else None
    if isinstance(patch_size, (list, tuple)):
        patch_size = patch_size[0] if len(set(patch_size)) == 1 else None
    if not all(isinstance(v, int) and v > 0 for v in (image_size, patch_size, hidden)):
        raise ValueError(f"{where} has no square patch grid (image_size={image_size}, patch_size={patch_size}, "
                         f"hidden_size={hidden}): not a ViT-style vision model; {_fix(where).split(': ', 1)[1]}.")
    if image_size % patch_size:
        raise ValueError(f"{where}: image_size={image_size} is not a multiple of patch_size={patch_size}; "
                         f"{_fix(where).split(': ', 1)[1]}.")
    extra = 0 if vision_config["model_type"].startswith("siglip") else 1  # CLS token (CLIP, ViT, DINOv2)
    extra += int(vision_config.get("num_register_tokens") or 0)
    return image_size // patch_size, extra, hidden


def pooled_side(grid: int, max_tokens: int | None) -> int:
    """Patches per side after pooling to at most `max_tokens` tokens (a square grid)."""
    if max_tokens is None or grid * grid <= max_tokens:
        return grid
    return max(1, math.isqrt(max_tokens))


def num_image_tokens(config) -> int:
    """<image> tokens per image of a config with `vision_encoder="hf"` (no model is built)."""
    grid, _, _ = patch_grid(config.vision_config)
    return pooled_side(grid, config.vision_max_tokens) ** 2


def build_encoder(vision_config: dict) -> nn.Module:
    """The transformers vision model of `vision_config`, randomly initialised (no download)."""
    from transformers import AutoConfig, AutoModel

    settings = {k: v for k, v in vision_config.items() if k not in ("model_type", "transformers_version")}
    model_type = vision_config["model_type"]
    if model_type == "siglip_vision_model":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionModel(SiglipVisionConfig(**dict(settings, vision_use_head=False)))
    if model_type == "clip_vision_model":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        return CLIPVisionModel(CLIPVisionConfig(**settings))
    try:
        config = AutoConfig.for_model(model_type, **settings)
    except ValueError as e:
        raise ValueError(f"MmoeConfig.vision_config: model_type {model_type!r} is unknown to this transformers "
                         f"({e}); upgrade transformers or use a SigLIP / CLIP vision model.") from None
    return AutoModel.from_config(config)


class VisionTower(nn.Module):
    """Encoder + pooling + projector: pixel values [B, C, H, W] -> [B, num_image_tokens, hidden_size]."""

    def __init__(self, config):
        super().__init__()
        vc = config.vision_config
        self.grid, self.prefix_tokens, self.encoder_width = patch_grid(vc)
        self.side = pooled_side(self.grid, config.vision_max_tokens)
        self.encoder = build_encoder(vc)
        d = config.hidden_size
        if config.vision_projector == "linear":
            self.projector = nn.Linear(self.encoder_width, d)
        else:  # "mlp2x_gelu", LLaVA-1.5
            self.projector = nn.Sequential(nn.Linear(self.encoder_width, d), nn.GELU(), nn.Linear(d, d))
        self.frozen = bool(config.freeze_vision_tower)
        if self.frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @property
    def num_image_tokens(self) -> int:
        """<image> tokens per image the processor must emit."""
        return self.side * self.side

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen encoder keeps its inference behaviour (dropout off)
            self.encoder.eval()
        return self

    def patch_features(self, pixel_values: Tensor) -> Tensor:
        """[B, C, H, W] -> the encoder's patch tokens [B, grid², encoder width] (class/register tokens dropped)."""
        param = next(self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.encoder(pixel_values=pixel_values.to(param.dtype)).last_hidden_state
        patches = self.grid * self.grid
        if hidden.dim() != 3 or hidden.shape[1] != self.prefix_tokens + patches:
            raise ValueError(f"the vision encoder returned last_hidden_state of shape {list(hidden.shape)}, not "
                             f"[batch, {self.prefix_tokens} + {patches} patch tokens, width]; feed images of the size "
                             f"the model's image processor gives ({self.grid} patches per side), or "
                             f"{_fix('MmoeConfig.vision_config').split(': ', 1)[1]}.")
        if hidden.shape[-1] != self.encoder_width:
            raise ValueError(f"the vision encoder returns {hidden.shape[-1]} features per patch but "
                             f"vision_config.hidden_size (the projector's input) is {self.encoder_width}; rebuild "
                             f"vision_config with vision_config_from_pretrained(path).")
        return hidden[:, self.prefix_tokens:]

    def forward(self, pixel_values: Tensor) -> Tensor:
        features = self.patch_features(pixel_values)
        if self.side != self.grid:
            B, _, width = features.shape
            grid = features.transpose(1, 2).reshape(B, width, self.grid, self.grid)
            features = nn.functional.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2)
        return self.projector(features.to(self.projector_dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype


def vision_config_from_pretrained(path: str | Path) -> dict:
    """The vision config of a local transformers vision model folder, as MmoeConfig.vision_config.

    A whole SigLIP / CLIP model (image and text towers) gives its vision half.
    Raises:
        ValueError naming the fix if the folder has no config or is not a patch-feature vision model.
    """
    from transformers import AutoConfig

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--vision {path}: no config.json; pass the local folder of a transformers vision model "
                         f"(e.g. `hf download google/siglip-base-patch16-224 --local-dir DIR`).")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type in _DUAL_ENCODERS:
        config = config.vision_config
    vision_config = config.to_dict()
    vision_config["model_type"] = config.model_type
    for key in ("architectures", "transformers_version", "_name_or_path", "id2label", "label2id", "dtype",
                "torch_dtype"):
        vision_config.pop(key, None)
    if vision_config.get("vocab_size") is not None and vision_config.get("image_size") is None:
        raise ValueError(f"--vision {path}: a text model ({config.model_type!r}), not a vision model; "
                         f"{_fix('--vision').split(': ', 1)[1]}.")
    try:
        patch_grid(vision_config)
    except ValueError as e:
        raise ValueError(f"--vision {path}: {e}") from None
    return vision_config


def load_tower_weights(tower: VisionTower, path: str | Path) -> None:
    """Load the pretrained encoder weights of the local folder `path` into `tower.encoder` (the
    projector keeps its initialisation). transformers' own loader reads the folder, so a whole
    SigLIP / CLIP model or a model with a head gives its encoder weights.

    Raises:
        ValueError naming the fix when the weights do not fit `vision_config` or some are missing.
    """
    from transformers.utils import logging as hf_logging

    encoder = tower.encoder
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report lists SigLIP's unused head as "unexpected"
    hf_logging.disable_progress_bar()
    try:
        loaded, info = type(encoder).from_pretrained(str(path), config=encoder.config, output_loading_info=True)
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"vision weights at {path} do not fit MmoeConfig.vision_config ({first}); build vision_config "
                         f"with vision_config_from_pretrained({str(path)!r}).") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = info.get("missing_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        names = [str(m if isinstance(m, str) else m[0]) for m in list(missing) + list(mismatched)]
        raise ValueError(f"vision weights at {path} lack or mis-shape {len(names)} encoder tensor(s) "
                         f"({', '.join(sorted(names)[:3])}); build vision_config with "
                         f"vision_config_from_pretrained({str(path)!r}) from the same folder.")
    with torch.no_grad():
        encoder.load_state_dict(loaded.state_dict())
