"""HF processor (`ProcessorMixin`): a tokenizer plus image preprocessing, producing the model's inputs.
The loader's collate is this same code, so training, evaluation and captioning see identical inputs.

Two image paths:
- patches (default; models with `vision_encoder="patch"`): resize, normalise, patchify into P =
  (image_size / patch_size)² rows of `pixel_patches` [B, P, C·p²].
- an HF image processor (models with an HF vision tower, `vision_encoder="hf"`): the vision model's
  own image processor (e.g. SiglipImageProcessor, saved beside as preprocessor_config.json) gives
  `pixel_values` [B, C, H, W] (one row per sample, zeros where a sample has no image), and each
  image takes `num_image_tokens` <image> tokens (the tower's pooled patch count).

Sequence layout (at most `max_length` tokens):
  image+text  <bos> <image>xP caption <eos>
  text        <bos> text <eos>
  image       <bos> <image>xP <eos>
Labels are the token ids on text positions and <eos>, -100 on <bos>, image positions and padding
(the model shifts them itself, HF convention; padding is found by position, never by id).
Tokenizers of pretrained LMs lack some special tokens: without a pad token <eos> pads (Llama);
without a bos token sequences start with no <bos> (Qwen2, which uses none). <eos> and <image>
are required. Where the model starts sequences with <bos>, the tokenizer adds it too
(`add_bos_token`), so `tokenizer(text)` alone (text-generation pipelines, lm-eval) matches training.

Two ways to call it:
- `processor(images=..., text=..., return_tensors="pt")`, the HF convention (pipelines,
  `model.generate(**inputs)`): inference defaults, i.e. a prompt without <eos>, left-padded, with
  only the model's inputs (`input_ids`, `attention_mask`, the image key); `add_eos=True` and
  `return_labels=True` ask for the training extras.
- `processor(images=[...], texts=[...])` (the plural keyword) and `encode` + `collate` (the
  loader, evaluation): the training batch, right-padded, with `labels`, `modality_ids`,
  `has_image` and `sample_kind`, exactly as the trainer has always been fed.

Text is bounded before tokenizing: cut to `max_text_bytes` UTF-8 bytes (the loader's
`data.max_caption_bytes`, at a character boundary), then to the tokens that fit, so a huge string
costs no more than a caption. `save_pretrained` writes processor_config.json (with an `AutoProcessor`
auto_map), the tokenizer (and image processor) files and this code, so
`AutoProcessor.from_pretrained(folder, trust_remote_code=True)` gives this class back anywhere.
"""
from __future__ import annotations

import codecs
import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import BatchFeature, PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin

from .schema import IGNORE_INDEX, IMAGE_MODALITY, IMAGE_TOKEN, KIND_ID, TEXT_MODALITY

CONFIG_NAME = "processor_config.json"
# Text is cut to this many UTF-8 bytes before tokenizing: the loader's default `data.max_caption_bytes`
# (mmoe_ds.data.shards.MAX_CAPTION_BYTES; a test keeps the two equal).
MAX_TEXT_BYTES = 65536
# The shipped code: this module and the ones it imports, under their flat names in an export.
REMOTE_MODULE = "processing_mmoe"
REMOTE_FILES = ("processing_mmoe.py", "data_schema.py", "moe_config.py")
AUTO_MAP = {"AutoProcessor": f"{REMOTE_MODULE}.MmoeProcessor"}
PADDING_SIDES = ("left", "right")
_UNSET = object()  # `texts=` not passed


def cut_text(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes at a character boundary, as the loader cuts captions.
    Never encodes more than `max_bytes` characters, so a huge string costs no more than a caption."""
    if len(text) <= max_bytes // 4:  # at most 4 bytes a character: fits whatever it holds
        return text
    head = text[:max_bytes]  # a character is at least one byte: the first max_bytes bytes lie within
    raw = head.encode("utf-8", errors="surrogatepass")
    if len(raw) <= max_bytes:
        return head
    # final=False: a character split by the cut is dropped
    return codecs.getincrementaldecoder("utf-8")(errors="surrogatepass").decode(raw[:max_bytes], final=False)


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


class MmoeProcessor(ProcessorMixin):
    """The model's processor; see the module docstring for the layout and the two ways to call it."""

    valid_kwargs = ["image_size", "patch_size", "num_channels", "image_mean", "image_std", "max_length",
                    "num_image_tokens", "model_max_length", "max_text_bytes", "padding_side"]

    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_size: int = 28, patch_size: int = 7,
                 num_channels: int = 1, image_mean: float | Sequence[float] = 0.5,
                 image_std: float | Sequence[float] = 0.5, max_length: int = 64, image_processor=None,
                 num_image_tokens: int | None = None, model_max_length: int | None = None,
                 max_text_bytes: int = MAX_TEXT_BYTES, padding_side: str = "left"):
        """Args: tokenizer: a fast tokenizer with <eos> and <image> (pad / bos optional, see the
        module docstring); image_size, patch_size, num_channels, image_mean, image_std: the patch
        path; max_length: tokens per training sequence; image_processor: an HF image processor (the
        vision tower path) and num_image_tokens: <image> tokens per image with it (both or neither);
        model_max_length: the model's maximum length (max_position_embeddings), the bound of an
        inference prompt (default: max_length); max_text_bytes: text is cut to this many UTF-8 bytes
        before tokenizing (the loader's max_caption_bytes); padding_side: of the HF call (left, so
        a batch of prompts generates; the training batch is always right-padded)."""
        # ProcessorMixin.__init__ is not called: it requires every sub-processor, and the patch path has
        # no HF image processor. What it sets is set here.
        self.chat_template = None
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
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"MmoeProcessor: padding_side must be 'left' or 'right', got {padding_side!r}.")
        if not isinstance(max_text_bytes, int) or max_text_bytes < 1:
            raise ValueError(f"MmoeProcessor: max_text_bytes must be a positive integer (the loader's "
                             f"data.max_caption_bytes), got {max_text_bytes!r}.")
        self.tokenizer = tokenizer
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.image_mean, self.image_std = image_mean, image_std
        self.max_text_bytes, self.padding_side = max_text_bytes, padding_side
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
        self._tokenizer_adds_bos()
        self.max_length = max_length
        self.model_max_length = model_max_length

    def _tokenizer_adds_bos(self) -> None:
        """Make `tokenizer(text)` start with <bos> when the model's sequences do (a trained tokenizer
        does not add it by itself; a Llama tokenizer already does, a Qwen2 one has none)."""
        if self._bos is None or self.tokenizer.backend_tokenizer.encode("", add_special_tokens=True).ids[:1] == [
                self._bos]:
            return
        self.tokenizer.add_bos_token = True  # rebuilds the post-processor, which tokenizer.json saves

    @property
    def model_max_length(self) -> int:
        """The model's maximum length: an inference prompt is cut to it (default: max_length)."""
        return self._model_max_length if self._model_max_length is not None else self.max_length

    @model_max_length.setter
    def model_max_length(self, value: int | None) -> None:
        if value is not None and value < self.num_image_tokens + 1:
            raise ValueError(f"MmoeProcessor: model_max_length={value} cannot hold {self.num_image_tokens} image "
                             f"tokens plus <bos>; pass the model's max_position_embeddings.")
        self._model_max_length = value
        self.tokenizer.model_max_length = self.model_max_length

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", self.image_input_name]

    @property
    def image_input_name(self) -> str:
        """The model's image argument: `pixel_values` (HF vision tower) or `pixel_patches`."""
        return "pixel_values" if self.image_processor is not None else "pixel_patches"

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
    def encode(self, image=None, text: str | None = None, add_eos: bool = True, max_length: int | None = None) -> dict:
        """One sample as lists (see the module docstring for the layout); `collate` pads a batch.
        `patches` holds the image's model input: [P, patch_dim] patches, or [C, H, W] pixel values.
        The text is cut to `max_text_bytes` bytes, then to the tokens that fit in `max_length`
        (default: the processor's), keeping room for <eos>."""
        max_length = self.max_length if max_length is None else max_length
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
            room = max(max_length - len(ids) - int(add_eos), 0)
            text_ids = self._text_encoder.encode(cut_text(text, self.max_text_bytes), add_special_tokens=False).ids
            text_ids = text_ids[:room]
            ids += text_ids
            modality += [TEXT_MODALITY] * len(text_ids)
            labels += text_ids
        if add_eos:
            ids.append(self._eos)
            modality.append(TEXT_MODALITY)
            labels.append(self._eos)
        kind = "image_text" if image is not None and text else ("image" if image is not None else "text")
        return {"input_ids": ids, "modality_ids": modality, "labels": labels, "patches": patches, "kind": kind}

    def collate(self, encoded: list[dict], padding_side: str = "right", length: int | None = None
                ) -> dict[str, torch.Tensor]:
        """Pad `encode` results to the longest one (or to `length`): the batch dict the model takes
        (right padding: the training batch; left: prompts to generate from)."""
        B, L = len(encoded), max([len(e["input_ids"]) for e in encoded] + [length or 0])
        input_ids = np.full((B, L), self._pad, dtype=np.int64)
        labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
        modality_ids = np.full((B, L), TEXT_MODALITY, dtype=np.int64)
        attention_mask = np.zeros((B, L), dtype=np.int64)
        pixel_patches = torch.empty(B, *self.image_input_shape)  # each row written once below
        has_image = torch.zeros(B, dtype=torch.bool)
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            row = slice(0, n) if padding_side == "right" else slice(L - n, L)
            input_ids[i, row], labels[i, row], modality_ids[i, row] = e["input_ids"], e["labels"], e["modality_ids"]
            attention_mask[i, row] = 1
            if e["patches"] is not None:
                pixel_patches[i], has_image[i] = e["patches"], True
            else:
                pixel_patches[i].zero_()
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
                "labels": torch.from_numpy(labels), "modality_ids": torch.from_numpy(modality_ids),
                self.image_input_name: pixel_patches, "has_image": has_image,
                "sample_kind": torch.tensor([KIND_ID[e["kind"]] for e in encoded], dtype=torch.long)}

    def __call__(self, images=None, text=None, *, texts=_UNSET, add_eos: bool | None = None,
                 return_labels: bool = False, return_tensors: str | None = None, padding: bool | str = True,
                 padding_side: str | None = None, max_length: int | None = None, truncation: bool | None = None,
                 **kwargs) -> BatchFeature:
        """The HF call: `processor(images=im_or_list, text=str_or_list, return_tensors="pt")`.

        Args:
            images: one image (PIL, uint8 array) or a list, one per sample (None: no image; a
                one-image list per sample is accepted too).
            text: one string or a list, one per sample (None / "": no text after the image).
            texts: the training call (the plural keyword): the batch `collate` gives, labels and
                <eos> included, right-padded, as tensors; `add_eos` (default True) as before.
            add_eos: end each prompt with <eos> (default: no, a prompt to continue).
            return_labels: add `labels` (text positions and <eos>; -100 elsewhere).
            return_tensors: "pt", "np", or None for lists (HF convention).
            padding: True / "longest" (to the longest), "max_length" (to max_length), or False /
                "do_not_pad" (the samples must have the same length when tensors are asked for).
            padding_side: "left" or "right" (default: the processor's, left).
            max_length: the token bound of each sample (default: model_max_length); text past it is cut.
            truncation: accepted for HF compatibility; text is always cut to max_length (never images).
        Returns:
            a BatchFeature with input_ids, attention_mask and, with any image, the image key
            (`pixel_patches` or `pixel_values`, zeros for a sample without one)."""
        if kwargs:
            raise TypeError(f"MmoeProcessor: unexpected argument(s) {sorted(kwargs)}; it takes images, text, "
                            "return_tensors, padding, padding_side, max_length, add_eos and return_labels.")
        if texts is not _UNSET:  # the training batch, as the trainer's tools have always called it
            if text is not None:
                raise ValueError("MmoeProcessor: pass text= (a prompt, HF call) or texts= (the training batch), "
                                 "not both.")
            return BatchFeature(self._training_batch(images, texts, True if add_eos is None else add_eos))
        images, text = self._samples(images, text)
        side = padding_side or self.padding_side
        if side not in PADDING_SIDES:
            raise ValueError(f"MmoeProcessor: padding_side must be 'left' or 'right', got {side!r}.")
        max_length = self.model_max_length if max_length is None else max_length
        encoded = [self.encode(im, tx, bool(add_eos), max_length) for im, tx in zip(images, text)]
        lengths = {len(e["input_ids"]) for e in encoded}
        if padding in (False, "do_not_pad") and len(lengths) > 1 and return_tensors is not None:
            raise ValueError(f"MmoeProcessor: padding=False with samples of {sorted(lengths)} tokens cannot make "
                             "tensors; pass padding=True (or return_tensors=None for lists).")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"MmoeProcessor: padding={padding!r}; use True, 'longest', 'max_length' or False.")
        batch = self.collate(encoded, side, max_length if padding == "max_length" else None)
        keys = ["input_ids", "attention_mask"] + (["labels"] if return_labels else [])
        if any(im is not None for im in images):
            keys.append(self.image_input_name)
        data = {k: batch[k] for k in keys}
        if padding in (False, "do_not_pad") and return_tensors is None:  # unpadded lists, as HF tokenizers give
            ragged = {"input_ids": [e["input_ids"] for e in encoded],
                      "attention_mask": [[1] * len(e["input_ids"]) for e in encoded],
                      "labels": [e["labels"] for e in encoded]}
            return BatchFeature({k: ragged[k] if k in ragged else v.tolist() for k, v in data.items()})
        if return_tensors is None:
            return BatchFeature({k: v.tolist() for k, v in data.items()})
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"MmoeProcessor: return_tensors={return_tensors!r}; use 'pt', 'np' or None.")
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def _samples(images, text) -> tuple[list, list]:
        """(images, texts) as parallel per-sample lists, from the HF call's single items or lists."""
        if images is None and text is None:
            raise ValueError("MmoeProcessor: pass images=, text=, or both.")
        single_image = images is not None and not isinstance(images, (list, tuple))
        if single_image:
            images = [images]
        elif images is not None:
            images = [MmoeProcessor._one_image(im, i) for i, im in enumerate(images)]
        if isinstance(text, str):
            text = [text]
        elif text is not None:
            text = list(text)
            bad = [type(t).__name__ for t in text if t is not None and not isinstance(t, str)]
            if bad:
                raise ValueError(f"MmoeProcessor: text= takes strings (or a list of them), got {bad[0]}.")
        n = len(images) if images is not None else len(text)
        images = images if images is not None else [None] * n
        text = text if text is not None else [None] * n
        if len(images) != len(text) or n == 0:
            raise ValueError(f"MmoeProcessor: got {len(images)} images and {len(text)} texts; pass one of each "
                             "per sample (None for a missing one), at least one sample.")
        return images, text

    @staticmethod
    def _one_image(item, index: int):
        if isinstance(item, (list, tuple)):
            if len(item) > 1:
                raise ValueError(f"MmoeProcessor: sample {index} has {len(item)} images; the model takes one image "
                                 "per sample (pass them as separate samples).")
            return item[0] if item else None
        return item

    def _training_batch(self, images, texts, add_eos: bool) -> dict[str, torch.Tensor]:
        """The batch for parallel lists of images and texts; None (or a None entry) for a missing part."""
        images, texts = self._samples(images, texts)
        return self.collate([self.encode(im, tx, add_eos) for im, tx in zip(images, texts)])

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Generated ids [B, L] -> texts (what the image-text-to-text pipeline decodes with)."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        common = {"processor_class": "MmoeProcessor", "max_length": self.max_length,
                  "model_max_length": self._model_max_length, "max_text_bytes": self.max_text_bytes,
                  "padding_side": self.padding_side}
        if self.image_processor is not None:  # the image settings live in preprocessor_config.json
            return dict(common, num_image_tokens=self.num_image_tokens)
        return dict(common, image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
                    image_mean=self.image_mean, image_std=self.image_std)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"MmoeProcessor({self.to_json_string().strip()})"

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Tokenizer files, the image processor's preprocessor_config.json (vision tower path),
        processor_config.json with an `AutoProcessor` auto_map, and this code (processing_mmoe.py and
        what it imports) into `save_directory`, so `AutoProcessor.from_pretrained(dir,
        trust_remote_code=True)` loads this class where mmoe_ds is not installed.
        Returns: the processor config's path."""
        if push_to_hub:
            raise ValueError("MmoeProcessor.save_pretrained: push_to_hub is not supported; save the processor into "
                             "an export and upload it with `mmoe-ds push`.")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(directory)
        write_processor_code(directory)
        config = dict(self.to_dict(), auto_map=dict(AUTO_MAP))
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        return [str(directory / CONFIG_NAME)]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **hub_kwargs) -> "MmoeProcessor":
        """Args: directory: a folder with processor_config.json and the tokenizer files (a prepared
        dataset's processor/ or an export), or a Hub repo id; hub_kwargs: what `AutoProcessor`
        passes on (revision, cache_dir, token, trust_remote_code, ...), used for a repo id only.
        Returns: the processor."""
        hub_kwargs.pop("trust_remote_code", None)
        overrides = {k: hub_kwargs.pop(k) for k in list(hub_kwargs) if k in cls.valid_kwargs}
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
        config.update(overrides)
        if "num_image_tokens" in config:  # the vision tower path: the HF image processor saved beside
            from transformers import AutoImageProcessor

            config["image_processor"] = AutoImageProcessor.from_pretrained(directory, **hub_kwargs)
        return cls(PreTrainedTokenizerFast.from_pretrained(directory, **hub_kwargs), **config)


def write_processor_code(directory: Path) -> None:
    """This module and the modules it imports, under their flat names, into `directory`. From the
    mmoe_ds package they are flattened by `mmoe_ds.export.remote_code`; the shipped copy (already
    flat, loaded by `AutoProcessor`) copies itself and its neighbours as they are."""
    if __name__.rsplit(".", 1)[-1] == REMOTE_MODULE:
        here = Path(__file__).resolve().parent
        for name in REMOTE_FILES:
            if (here / name).resolve() != (Path(directory) / name).resolve():
                shutil.copyfile(here / name, Path(directory) / name)
        return
    # imported by a relative name, so the flattened copy names no package
    importlib.import_module("..export.remote_code", __package__).write_processor_code(Path(directory))
