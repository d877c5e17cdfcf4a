"""Sample kinds and batch keys shared by preparation, loader, processor and model."""
from mmoe_ds.moe.config import MODALITIES

SAMPLE_KINDS = ("image_text", "text", "image")  # batch dict `sample_kind` holds their index
KIND_ID = {kind: i for i, kind in enumerate(SAMPLE_KINDS)}
IMAGE_MODALITY, TEXT_MODALITY = MODALITIES.index("image"), MODALITIES.index("text")
SPLITS = ("train", "validation", "test")
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
IMAGE_TOKEN = "<image>"
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "modality_ids", "pixel_patches", "has_image", "sample_kind")
