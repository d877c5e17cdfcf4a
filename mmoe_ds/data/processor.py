"""HF-style processor: a byte-level BPE tokenizer plus image preprocessing (resize, normalise,
patchify), producing the model's batch dict. The loader's collate uses the same code, so
training and inference see identical inputs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from .schema import IMAGE_MODALITY, IMAGE_TOKEN, KIND_ID, TEXT_MODALITY

CONFIG_NAME = "processor_config.json"


class MmoeProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_size: int = 28, patch_size: int = 7,
                 num_channels: int = 1, image_mean: float = 0.5, image_std: float = 0.5, max_length: int = 64):
        if image_size % patch_size:
            raise ValueError(f"MmoeProcessor: image_size={image_size} must be a multiple of patch_size={patch_size}.")
        if num_channels not in (1, 3):
            raise ValueError(f"MmoeProcessor: num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}.")
        self.tokenizer = tokenizer
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.image_mean, self.image_std, self.max_length = image_mean, image_std, max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.max_length < self.num_patches + 2:
            raise ValueError(f"MmoeProcessor: max_length={max_length} cannot hold {self.num_patches} patches plus "
                             f"<bos>/<eos>; raise it.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size ** 2

    # -- images --------------------------------------------------------------------------------
    def patchify(self, image) -> torch.Tensor:
        """PIL image or uint8 array -> [num_patches, patch_dim] normalised floats."""
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        image = image.convert("L" if self.num_channels == 1 else "RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        x = np.asarray(image, dtype=np.float32).reshape(self.image_size, self.image_size, self.num_channels) / 255.0
        x = (x - self.image_mean) / self.image_std
        g, p = self.image_size // self.patch_size, self.patch_size
        x = x.reshape(g, p, g, p, self.num_channels).transpose(0, 2, 4, 1, 3).reshape(g * g, self.patch_dim)
        return torch.from_numpy(np.ascontiguousarray(x))

    # -- sequences -----------------------------------------------------------------------------
    def encode(self, image=None, text: str | None = None, add_eos: bool = True) -> dict:
        """One sample: `<bos> [<image>×P] [text] [<eos>]` with labels on text and <eos>."""
        tok = self.tokenizer
        ids, modality, labels = [tok.bos_token_id], [TEXT_MODALITY], [-100]
        patches = None
        if image is not None:
            patches = self.patchify(image)
            ids += [self.image_token_id] * self.num_patches
            modality += [IMAGE_MODALITY] * self.num_patches
            labels += [-100] * self.num_patches
        if text:
            room = self.max_length - len(ids) - int(add_eos)
            text_ids = tok(text, add_special_tokens=False)["input_ids"][:max(room, 0)]
            ids += text_ids
            modality += [TEXT_MODALITY] * len(text_ids)
            labels += text_ids
        if add_eos:
            ids.append(tok.eos_token_id)
            modality.append(TEXT_MODALITY)
            labels.append(tok.eos_token_id)
        kind = "image_text" if image is not None and text else ("image" if image is not None else "text")
        return {"input_ids": ids, "modality_ids": modality, "labels": labels, "patches": patches, "kind": kind}

    def collate(self, encoded: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad a list of `encode` results into the batch dict the model takes."""
        B, L = len(encoded), max(len(e["input_ids"]) for e in encoded)
        pad = self.tokenizer.pad_token_id
        batch = {"input_ids": torch.full((B, L), pad, dtype=torch.long),
                 "attention_mask": torch.zeros(B, L, dtype=torch.long),
                 "labels": torch.full((B, L), -100, dtype=torch.long),
                 "modality_ids": torch.full((B, L), TEXT_MODALITY, dtype=torch.long),
                 "pixel_patches": torch.zeros(B, self.num_patches, self.patch_dim),
                 "has_image": torch.zeros(B, dtype=torch.bool),
                 "sample_kind": torch.tensor([KIND_ID[e["kind"]] for e in encoded])}
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.tensor(e["labels"])
            batch["modality_ids"][i, :n] = torch.tensor(e["modality_ids"])
            if e["patches"] is not None:
                batch["pixel_patches"][i] = e["patches"]
                batch["has_image"][i] = True
        return batch

    def __call__(self, images=None, texts=None, add_eos: bool = True) -> dict[str, torch.Tensor]:
        n = len(images) if images is not None else len(texts)
        images = images if images is not None else [None] * n
        texts = texts if texts is not None else [None] * n
        if len(images) != len(texts):
            raise ValueError(f"MmoeProcessor: {len(images)} images but {len(texts)} texts; pass one of each per sample.")
        return self.collate([self.encode(im, tx, add_eos) for im, tx in zip(images, texts)])

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"processor_class": "MmoeProcessor", "image_size": self.image_size, "patch_size": self.patch_size,
                "num_channels": self.num_channels, "image_mean": self.image_mean, "image_std": self.image_std,
                "max_length": self.max_length}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        (directory / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "MmoeProcessor":
        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; run `mmoe-ds prepare` or point at an export.")
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        cfg.pop("processor_class", None)
        return cls(PreTrainedTokenizerFast.from_pretrained(directory), **cfg)
