"""The export's README.md (model card): origin, architecture, how to load, last evaluation."""
from __future__ import annotations

import json
from pathlib import Path

from ..model import MmoeConfig


def model_card(meta: dict, config: MmoeConfig, report_md: Path | None) -> str:
    """Args: meta: the checkpoint's meta.json ({} for a model not from a checkpoint); config: the model's
    config; report_md: a routing report to append, if any. Returns: the card's markdown."""
    origin = (f"Exported from step {meta['step']} of a run with expert-parallel size {meta['ep_size']} on "
              f"{meta['world_size']} processes." if "step" in meta else "")
    lines = ["---", "library_name: transformers", "tags: [mixture-of-experts, multimodal, mmoe-ds]", "---", "",
             "# mmoe-ds multimodal MoE", "", origin,
             f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_local_experts} experts "
             f"(top-k {config.num_experts_per_tok}), routing mode `{config.router_config().mode}`.", "",
             "```python", "from transformers import AutoModelForCausalLM",
             "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)", "```", ""]
    if meta.get("metrics"):
        lines += ["## Last evaluation", "", "```json", json.dumps(meta["metrics"], indent=1), "```", ""]
    if report_md is not None and report_md.exists():
        lines += [report_md.read_text()]
    return "\n".join(lines)
