"""HF-compatible multimodal MoE model, registered with the Auto classes."""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_mmoe import MmoeConfig
from .modeling_mmoe import MmoeCausalLMOutput, MmoeForCausalLM, MmoeModel

AutoConfig.register("mmoe", MmoeConfig, exist_ok=True)
AutoModelForCausalLM.register(MmoeConfig, MmoeForCausalLM, exist_ok=True)

__all__ = ["MmoeConfig", "MmoeForCausalLM", "MmoeModel", "MmoeCausalLMOutput"]
