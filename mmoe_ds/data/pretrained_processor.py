"""The processor of a model built from pretrained parts (`mmoe-ds upcycle`): the LM's tokenizer
(with `<image>` added) and, with an HF vision tower, that vision model's own image processor.

It is an `MmoeProcessor` (saved and loaded as one, so exports ship it with the processor's code);
this module only assembles it. Tokenizers of pretrained LMs: without a pad token <eos> pads
(Llama), without a bos token sequences start with no <bos> (Qwen2); see mmoe_ds/data/processor.py.
"""
from __future__ import annotations

import os
from pathlib import Path

from .processor import MmoeProcessor, image_processor_pixels

DEFAULT_TEXT_TOKENS = 64  # room for text after the image tokens when no max_length is given


class PretrainedProcessor(MmoeProcessor):
    """An `MmoeProcessor` from a pretrained tokenizer and (optionally) a vision model's image processor."""

    @classmethod
    def from_components(cls, tokenizer, vision: str | os.PathLike | None, config,
                        max_length: int | None = None) -> "PretrainedProcessor":
        """Args:
            tokenizer: the LM's fast tokenizer with `<image>` added.
            vision: the local vision model folder whose image processor (preprocessor_config.json)
                prepares images, or None for the patch path (the config's image geometry).
            config: the MmoeConfig the processor feeds (vision fields, image geometry).
            max_length: tokens per training sequence (default: the image tokens + 64, within the
                model's max_position_embeddings, which is the processor's model_max_length).
        Returns:
            the processor.
        Raises:
            ValueError naming the fix: no image processor in `vision`, or one whose output size is
            not the vision model's image_size.
        """
        if vision is None:
            tokens = config.num_patches
            kwargs = dict(image_size=config.image_size, patch_size=config.patch_size, num_channels=config.num_channels)
        else:
            from ..model.vision import num_image_tokens

            kwargs = dict(image_processor=image_processor_of(vision, config.vision_config),
                          num_image_tokens=num_image_tokens(config))
            tokens = kwargs["num_image_tokens"]
        if max_length is None:
            max_length = min(tokens + DEFAULT_TEXT_TOKENS, config.max_position_embeddings)
        return cls(tokenizer, max_length=max_length, model_max_length=config.max_position_embeddings, **kwargs)


def image_processor_of(vision: str | os.PathLike, vision_config: dict):
    """The image processor saved with the vision model at `vision`, checked against its image size."""
    from transformers import AutoImageProcessor

    if not (Path(vision) / "preprocessor_config.json").is_file():
        raise ValueError(f"--vision {vision}: no preprocessor_config.json (the vision model's image processor); "
                         f"download the whole model folder (`hf download REPO --local-dir {vision}`) or save one "
                         f"with e.g. SiglipImageProcessor(...).save_pretrained({str(vision)!r}).")
    from PIL import Image

    processor = AutoImageProcessor.from_pretrained(str(vision))
    shape = tuple(image_processor_pixels(processor, Image.new("RGB", (8, 8))).shape)
    size = vision_config.get("image_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    if shape[1:] != (size, size):
        raise ValueError(f"--vision {vision}: its image processor makes {shape[1]}x{shape[2]} images but the vision "
                         f"model takes {size}x{size} (vision_config.image_size); fix `size` in "
                         f"preprocessor_config.json.")
    return processor
