"""The model's source files shipped inside an export, so `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` works where neither mmoe_ds nor DeepSpeed is installed."""
from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
# Source files shipped with an export, and the flat names they get there.
CODE_FILES = {
    "model/configuration_mmoe.py": "configuration_mmoe.py",
    "model/modeling_mmoe.py": "modeling_mmoe.py",
    "moe/config.py": "moe_config.py",
    "moe/losses.py": "moe_losses.py",
    "moe/router.py": "moe_router.py",
    "moe/experts.py": "moe_experts.py",
    "moe/layer.py": "moe_layer.py",
}
AUTO_MAP = {"AutoConfig": "configuration_mmoe.MmoeConfig", "AutoModelForCausalLM": "modeling_mmoe.MmoeForCausalLM"}


def flatten_imports(source: str, in_moe_package: bool) -> str:
    """Rewrite the package-relative imports for the flat folder (`..moe.x` and `.x` -> `.moe_x`)."""
    source = re.sub(r"from \.\.moe\.(\w+) import", r"from .moe_\1 import", source)
    if in_moe_package:
        source = re.sub(r"from \.(\w+) import", r"from .moe_\1 import", source)
    return source


def write_code(out: Path) -> None:
    """Write the flattened model code into the folder `out`."""
    for src, dst in CODE_FILES.items():
        text = (PACKAGE / src).read_text()
        (out / dst).write_text(flatten_imports(text, src.startswith("moe/")))
