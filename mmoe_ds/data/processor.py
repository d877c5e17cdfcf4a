"""HF-style processor: a tokenizer plus image preprocessing, producing the model's batch dict.
The loader's collate is this same code, so training, evaluation and captioning see identical inputs.

Two image paths:
- patches (default; models with `vision_encoder="patch"`): resize, normalise, patchify into P =
  (image_size / patch_size)² rows of `pixel_patches` [B, P, C·p²].
- an HF image processor (models with an HF vision tower, `vision_encoder="hf"`): the vision model's
  own image processor (e.g. SiglipImageProcessor, saved beside as preprocessor_config.json) gives
  `pixel_values` [B, C, H, W] (one row per sample, zeros where a sample has no image), and each
  image takes `num_image_tokens` <image> tokens (the tower's pooled patch count).

Sequence layout (right-padded, at most `max_length` tokens):
  image+text  <bos> <image>xP caption <eos>
  text        <bos> text <eos>
  image       <bos> <image>xP <eos>
Labels are the token ids on text positions and <eos>, -100 on <bos>, image positions and padding
(the model shifts them itself, HF convention; padding is found by position, never by id).
Tokenizers of pretrained LMs lack some special tokens: without a pad token <eos> pads (Llama);
without a bos token sequences start with no <bos> (Qwen2, which uses none). <eos> and <image>
are required. A plain class rather than `ProcessorMixin`: it saves/loads as one JSON file beside
the tokenizer (and image processor) files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from .schema import IGNORE_INDEX, IMAGE_MODALITY, IMAGE_TOKEN, KIND_ID, TEXT_MODALITY

CONFIG_NAME = "processor_config.json"


def _per_channel(value: float | Sequence[float], channels: int, name: str) -> np.ndarray:
    values = np.atleast_1d(np.asarray(value, dtype=np.float32))
    if values.shape not in ((1,), (channels,)):
        raise ValueError(f"MmoeProcessor: {name} needs 1 or {channels} values, got {list(values)}.")
    return np.broadcast_to(values, (channels,)).copy()


def image_processor_pixels(image_processor, image) -> torch.Tensor:
    """PIL image or uint8 array -> [C, H, W] floats from an HF image processor, given the image in RGB."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


class MmoeProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_size: int = 28, patch_size: int = 7,
                 num_channels: int = 1, image_mean: float | Sequence[float] = 0.5,
                 image_std: float | Sequence[float] = 0.5, max_length: int = 64, image_processor=None,
                 num_image_tokens: int | None = None):
        """Args: tokenizer: a fast tokenizer with <eos> and <image> (pad / bos optional, see the
        module docstring); image_size, patch_size, num_channels, image_mean, image_std: the patch
        path; max_length: tokens per sequence; image_processor: an HF image processor (the vision
        tower path) and num_image_tokens: <image> tokens per image with it (both or neither)."""
        if (image_processor is None) != (num_image_tokens is None):
            raise ValueError("MmoeProcessor: image_processor and num_image_tokens go together (the vision tower's "
                             "image processor and its tokens per image); pass both or neither.")
        if num_image_tokens is not None and (not isinstance(num_image_tokens, int) or num_image_tokens < 1):
            raise ValueError(f"MmoeProcessor: num_image_tokens must be a positive integer, got {num_image_tokens!r}.")
        self.image_processor, self._num_image_tokens = image_processor, num_image_tokens
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"MmoeProcessor: image_size={image_size} must be a multiple of patch_size={patch_size}.")
        if num_channels not in (1, 3):
            raise ValueError(f"MmoeProcessor: num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}.")
        self.tokenizer = tokenizer
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.image_mean, self.image_std = image_mean, image_std
        self._mean = _per_channel(image_mean, num_channels, "image_mean")
        self._std = _per_channel(image_std, num_channels, "image_std")
        if (self._std <= 0).any():
            raise ValueError(f"MmoeProcessor: image_std must be > 0, got {image_std}.")
        # (pixel / 255 - mean) / std as one multiply-add per value
        self._scale = (1.0 / (255.0 * self._std)).astype(np.float32)
        self._offset = (-self._mean / self._std).astype(np.float32)
        # A private copy of the Rust tokenizer that treats text spelling "<image>" or "<eos>" as
        # plain text (the tokenizer's own flag is shared state) and skips the Python wrapper's cost.
        self._text_encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._text_encoder.encode_special_tokens = True
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self._eos = tokenizer.eos_token_id
        missing = [t for t, i in [("<eos>", self._eos), (IMAGE_TOKEN, self.image_token_id)]
                   if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"MmoeProcessor: the tokenizer lacks special tokens {missing}; train it with "
                             "mmoe_ds.data.tokenizer.train_tokenizer, or add <image> to a pretrained LM's tokenizer "
                             "with `mmoe-ds upcycle`.")
        # A pretrained LM's tokenizer may lack these: <eos> pads (by position, labels never see it), no <bos>.
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._eos
        bos = tokenizer.bos_token_id
        self._bos = None if bos is None or bos == tokenizer.unk_token_id else bos
        self.max_length = max_length

    @property
    def max_length(self) -> int:
        return self._max_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        if value < self.num_image_tokens + 2:
            raise ValueError(f"MmoeProcessor: max_length={value} cannot hold {self.num_image_tokens} image tokens plus "
                             f"<bos>/<eos>; use at least {self.num_image_tokens + 3}.")
        self._max_length = value

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """<image> tokens per image: the vision tower's tokens, or the patch count."""
        return self._num_image_tokens if self.image_processor is not None else self.num_patches

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size ** 2

    # -- images ------------------------------------------------------------------------------------
    def patchify(self, image) -> torch.Tensor:
        """PIL image or uint8 array -> [num_patches, patch_dim] normalised floats, patches in
        row-major order, each patch flattened as (channel, row, column).

        A JPEG not yet decoded is decoded at reduced scale when that still covers `image_size`
        (PIL's `draft`: libjpeg's DCT scaling), so a large photo costs a fraction of its full decode.
        The patch layout is taken on the uint8 pixels and normalisation is one multiply-add into
        the output buffer (about 5x less work than normalising first, at 224 px)."""
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        mode = "L" if self.num_channels == 1 else "RGB"
        size, p, c = self.image_size, self.patch_size, self.num_channels
        if getattr(image, "format", None) == "JPEG" and getattr(image, "tile", None):
            image.draft(mode, (size, size))  # only shrinks by powers of 2 while staying >= size
        if image.mode != mode:
            image = image.convert(mode)
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        g = size // p
        # the patch layout on uint8 (a quarter of the bytes of float32), then one multiply-add pass
        pixels = np.ascontiguousarray(np.asarray(image).reshape(g, p, g, p, c).transpose(0, 2, 4, 1, 3))
        out = np.empty((g, g, c, p, p), dtype=np.float32)
        np.multiply(pixels, self._scale[:, None, None], out=out)
        out += self._offset[:, None, None]
        return torch.from_numpy(out.reshape(g * g, self.patch_dim))

    @property
    def image_input_shape(self) -> tuple[int, ...]:
        """Shape of one image's model input: (P, patch_dim) patches or the image processor's (C, H, W)."""
        if self.image_processor is None:
            return (self.num_patches, self.patch_dim)
        if getattr(self, "_pixel_shape", None) is None:  # what the image processor makes of any image
            self._pixel_shape = tuple(self.pixel_values(Image.new("RGB", (8, 8))).shape)
        return self._pixel_shape

    def pixel_values(self, image) -> torch.Tensor:
        """PIL image or uint8 array -> [C, H, W] floats from the HF image processor (RGB input)."""
        return image_processor_pixels(self.image_processor, image)

    # -- sequences ---------------------------------------------------------------------------------
    def encode(self, image=None, text: str | None = None, add_eos: bool = True) -> dict:
        """One sample as lists (see the module docstring for the layout); `collate` pads a batch.
        `patches` holds the image's model input: [P, patch_dim] patches, or [C, H, W] pixel values."""
        ids, modality, labels, patches = [], [], [], None
        if self._bos is not None:
            ids, modality, labels = [self._bos], [TEXT_MODALITY], [IGNORE_INDEX]
        if image is not None:
            patches = self.patchify(image) if self.image_processor is None else self.pixel_values(image)
            n = self.num_image_tokens
            ids += [self.image_token_id] * n
            modality += [IMAGE_MODALITY] * n
            labels += [IGNORE_INDEX] * n
        if text:
            room = self.max_length - len(ids) - int(add_eos)
            text_ids = self._text_encoder.encode(text, add_special_tokens=False).ids[:room]
            ids += text_ids
            modality += [TEXT_MODALITY] * len(text_ids)
            labels += text_ids
        if add_eos:
            ids.append(self._eos)
            modality.append(TEXT_MODALITY)
            labels.append(self._eos)
        kind = "image_text" if image is not None and text else ("image" if image is not None else "text")
        return {"input_ids": ids, "modality_ids": modality, "labels": labels, "patches": patches, "kind": kind}

    def collate(self, encoded: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad `encode` results to the longest one: the batch dict the model takes."""
        B, L = len(encoded), max(len(e["input_ids"]) for e in encoded)
        input_ids = np.full((B, L), self._pad, dtype=np.int64)
        labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
        modality_ids = np.full((B, L), TEXT_MODALITY, dtype=np.int64)
        attention_mask = np.zeros((B, L), dtype=np.int64)
        pixel_patches = torch.empty(B, *self.image_input_shape)  # each row written once below
        has_image = torch.zeros(B, dtype=torch.bool)
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            input_ids[i, :n], labels[i, :n], modality_ids[i, :n] = e["input_ids"], e["labels"], e["modality_ids"]
            attention_mask[i, :n] = 1
            if e["patches"] is not None:
                pixel_patches[i], has_image[i] = e["patches"], True
            else:
                pixel_patches[i].zero_()
        images = "pixel_values" if self.image_processor is not None else "pixel_patches"
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
                "labels": torch.from_numpy(labels), "modality_ids": torch.from_numpy(modality_ids),
                images: pixel_patches, "has_image": has_image,
                "sample_kind": torch.tensor([KIND_ID[e["kind"]] for e in encoded], dtype=torch.long)}

    def __call__(self, images=None, texts=None, add_eos: bool = True) -> dict[str, torch.Tensor]:
        """Batch dict for parallel lists of images and texts; None (or a None entry) for a missing part."""
        if images is None and texts is None:
            raise ValueError("MmoeProcessor: pass images, texts, or both.")
        n = len(images) if images is not None else len(texts)
        images = list(images) if images is not None else [None] * n
        texts = list(texts) if texts is not None else [None] * n
        if len(images) != len(texts) or n == 0:
            raise ValueError(f"MmoeProcessor: got {len(images)} images and {len(texts)} texts; pass one of each "
                             "per sample (None for a missing one), at least one sample.")
        return self.collate([self.encode(im, tx, add_eos) for im, tx in zip(images, texts)])

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        if self.image_processor is not None:  # the image settings live in preprocessor_config.json
            return {"processor_class": "MmoeProcessor", "num_image_tokens": self.num_image_tokens,
                    "max_length": self.max_length}
        return {"processor_class": "MmoeProcessor", "image_size": self.image_size, "patch_size": self.patch_size,
                "num_channels": self.num_channels, "image_mean": self.image_mean, "image_std": self.image_std,
                "max_length": self.max_length}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Tokenizer files, the image processor's preprocessor_config.json (vision tower path) and
        processor_config.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(directory)
        (directory / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """Called by `AutoProcessor` on a remote-code class; the export's processor_config.json
        already carries the `auto_map`, so there is nothing to register."""

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **hub_kwargs) -> "MmoeProcessor":
        """Args: directory: a folder with processor_config.json and the tokenizer files (a prepared
        dataset's processor/ or an export), or a Hub repo id; hub_kwargs: what `AutoProcessor`
        passes on (revision, cache_dir, token, trust_remote_code, ...), used for a repo id only.
        Returns: the processor."""
        hub_kwargs.pop("trust_remote_code", None)
        if Path(directory).is_dir() or not isinstance(directory, str):
            config_file = Path(directory) / CONFIG_NAME
            if not config_file.exists():
                raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; run `mmoe-ds prepare` or point at an export.")
        else:  # a Hub repo id
            from transformers.utils import cached_file

            hub_keys = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
            config_file = cached_file(str(directory), CONFIG_NAME,
                                      **{k: v for k, v in hub_kwargs.items() if k in hub_keys})
        config = json.loads(Path(config_file).read_text())
        for key in ("processor_class", "auto_map"):
            config.pop(key, None)
        if "num_image_tokens" in config:  # the vision tower path: the HF image processor saved beside
            from transformers import AutoImageProcessor

            config["image_processor"] = AutoImageProcessor.from_pretrained(directory, **hub_kwargs)
        return cls(PreTrainedTokenizerFast.from_pretrained(directory, **hub_kwargs), **config)
