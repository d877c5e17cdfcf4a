"""mmoe-ds: multimodal Mixture-of-Experts with modality-aware routing on DeepSpeed."""

__version__ = "0.1.0"

from .moe.config import MODALITIES  # noqa: F401
