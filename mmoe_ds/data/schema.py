"""Names shared by preparation, loader, processor and model: one place, so they cannot drift."""
from mmoe_ds.moe.config import MODALITIES

SAMPLE_KINDS = ("image_text", "text", "image")  # the batch dict's `sample_kind` holds their index
KIND_ID = {kind: i for i, kind in enumerate(SAMPLE_KINDS)}
IMAGE_MODALITY, TEXT_MODALITY = MODALITIES.index("image"), MODALITIES.index("text")  # per-token modality ids
SPLITS = ("train", "validation", "test")

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
IMAGE_TOKEN = "<image>"  # fills the image-patch positions of `input_ids`
IGNORE_INDEX = -100  # label of positions without a next-token target (HF convention)

# Tensors of the batch dict; the loader adds `keys` (a list of "source/key" strings) for logging.
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "modality_ids", "pixel_patches", "has_image", "sample_kind")

# Why a sample (or a shard's remainder) was left out, in a fixed order: `SkipLog.counts()` and the
# loader's `skip_counts()` list them in this order, so count vectors line up across ranks.
# Shard level: `corrupt_tar` (a cut, a damaged header, junk after the end, a damaged compressed
# stream, an archive without files), `unreadable_shard` (missing file, network, failing pipe).
# Sample level: `member_too_large` (a non-text member over the reader's max_member_bytes),
# `image_too_large` (over max_image_pixels, refused from the header), `duplicate_key` (a second sample
# with a key already read in the shard: the first is kept). `dead_source`: a source with
# no readable sample left for a loader slot, dropped from the mix.
# `caption_truncated` is a note, not a skip: the sample is kept with its caption cut to
# max_caption_bytes (listed here so it is counted, logged and summed like the others).
SKIP_REASONS = ("corrupt_tar", "missing_key", "bad_json", "unknown_modality", "modality_mismatch", "bad_image",
                "bad_text", "empty_caption", "dead_source", "unreadable_shard", "member_too_large", "image_too_large",
                "caption_truncated", "duplicate_key")
KEPT_REASONS = ("caption_truncated",)  # counted like skips, but the sample is used
