"""Data: the embedded real dataset, WebDataset shards, the processor and the modality-balanced loader."""
from .captions import CLASS_NAMES, class_caption, class_captions
from .loader import BalancedLoader, LoaderConfig
from .processor import MmoeProcessor
from .schema import BATCH_KEYS, SAMPLE_KINDS, SKIP_REASONS

__all__ = ["BalancedLoader", "LoaderConfig", "MmoeProcessor", "SAMPLE_KINDS", "SKIP_REASONS", "BATCH_KEYS",
           "CLASS_NAMES", "class_caption", "class_captions"]
