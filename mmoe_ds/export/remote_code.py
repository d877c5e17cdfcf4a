"""The model's and the processor's source files shipped inside an export, so
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(path, trust_remote_code=True)` work where neither mmoe_ds nor
DeepSpeed is installed."""
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
# Shipped when the package has them (the HF vision tower, imported by modeling_mmoe.py for
# vision_encoder="hf"; transformers copies every relatively imported file, so it must be there).
OPTIONAL_CODE_FILES = {
    "model/vision.py": "vision.py",
}
# The processor's code, shipped when the export carries a processor (and by `MmoeProcessor.save_pretrained`,
# which needs the schema's own import, moe_config.py, too).
PROCESSOR_CODE_FILES = {
    "data/processor.py": "processing_mmoe.py",
    "data/schema.py": "data_schema.py",
}
PROCESSOR_DEPENDENCIES = {"moe/config.py": "moe_config.py"}
# The causal LM is also the image-text-to-text model (images in, text out): registered for both, so
# `pipeline("image-text-to-text", model=export, trust_remote_code=True)` finds it.
AUTO_MAP = {"AutoConfig": "configuration_mmoe.MmoeConfig", "AutoModelForCausalLM": "modeling_mmoe.MmoeForCausalLM",
            "AutoModelForImageTextToText": "modeling_mmoe.MmoeForCausalLM"}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_mmoe.MmoeProcessor"}


def flatten_imports(source: str, in_moe_package: bool, in_data_package: bool = False) -> str:
    """Rewrite the package imports for the flat folder: `..moe.x`, `mmoe_ds.moe.x` (and `.x` inside
    moe/) -> `.moe_x`; `.x` inside data/ -> `.data_x`."""
    if in_moe_package:  # package-local imports first: the rule below writes `.moe_x` itself
        source = re.sub(r"from \.(\w+) import", r"from .moe_\1 import", source)
    if in_data_package:
        source = re.sub(r"from \.(\w+) import", r"from .data_\1 import", source)
    return re.sub(r"from (?:\.\.|mmoe_ds\.)moe\.(\w+) import", r"from .moe_\1 import", source)


def write_code(out: Path, with_processor: bool = False) -> None:
    """Write the flattened model code (and the processor's, if `with_processor`) into the folder `out`."""
    files = dict(CODE_FILES, **{src: dst for src, dst in OPTIONAL_CODE_FILES.items() if (PACKAGE / src).is_file()},
                 **(PROCESSOR_CODE_FILES if with_processor else {}))
    _write_flat(out, files)


def write_processor_code(out: Path) -> None:
    """Write the processor's flattened code and what it imports (`MmoeProcessor.save_pretrained`)."""
    _write_flat(out, dict(PROCESSOR_CODE_FILES, **PROCESSOR_DEPENDENCIES))


def _write_flat(out: Path, files: dict[str, str]) -> None:
    for src, dst in files.items():
        text = (PACKAGE / src).read_text()
        flat = flatten_imports(text, src.startswith("moe/"), src.startswith("data/"))
        if "mmoe_ds" in re.sub(r'""".*?"""|#.*', "", flat, flags=re.S):
            raise RuntimeError(f"remote code {dst}: an import of mmoe_ds is left after flattening; "
                               f"add its rule to flatten_imports.")
        (out / dst).write_text(flat)
