"""mmoe-ds: multimodal Mixture-of-Experts with modality-aware routing on DeepSpeed."""

__version__ = "0.1.0"

# Modality ids used everywhere: per-token ids index this tuple.
MODALITIES = ("image", "text")
