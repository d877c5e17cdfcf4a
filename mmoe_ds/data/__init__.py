"""Data: embedded real dataset, WebDataset shards, processor, modality-balanced loader."""
from .loader import BalancedLoader, LoaderConfig
from .processor import MmoeProcessor
from .schema import SAMPLE_KINDS
from .sources import CLASS_NAMES, class_caption

__all__ = ["BalancedLoader", "LoaderConfig", "MmoeProcessor", "SAMPLE_KINDS", "CLASS_NAMES", "class_caption"]
