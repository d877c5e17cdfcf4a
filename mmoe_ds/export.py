"""`mmoe-ds export CKPT OUT`: one HF folder from a DeepSpeed checkpoint of any expert-parallel size.

DeepSpeed writes each expert of each MoE layer to its own file under its *global* id, so
gathering is a merge of state dicts, whatever ep_size wrote them. The folder carries the model
code (flattened, relative imports only) so `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` works where neither mmoe_ds nor DeepSpeed is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig

from .checkpoint import latest_tag
from .model import MmoeConfig, MmoeForCausalLM

PACKAGE = Path(__file__).resolve().parent
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


def flatten_imports(source: str, in_moe_package: bool) -> str:
    source = re.sub(r"from \.\.moe\.(\w+) import", r"from .moe_\1 import", source)
    if in_moe_package:
        source = re.sub(r"from \.(\w+) import", r"from .moe_\1 import", source)
    return source


def write_code(out: Path) -> None:
    for src, dst in CODE_FILES.items():
        text = (PACKAGE / src).read_text()
        (out / dst).write_text(flatten_imports(text, src.startswith("moe/")))


def resolve_tag_dir(ckpt: Path) -> Path:
    """Accepts a run's output dir, its checkpoints dir, or one tag dir."""
    for candidate in (ckpt, ckpt / "checkpoints"):
        if (candidate / "meta.json").exists():
            return candidate
        tag = latest_tag(candidate) if candidate.is_dir() else None
        if tag:
            return candidate / tag
    raise FileNotFoundError(f"{ckpt}: no complete mmoe-ds checkpoint (meta.json or checkpoints/latest) found.")


def gather_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Non-expert weights plus every per-expert file, keyed by global expert id."""
    # weights_only=False: DeepSpeed's files also hold its config objects; these are our own files.
    state = dict(torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"])
    for expert_file in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(torch.load(expert_file, map_location="cpu", weights_only=False))
    return state


def load_checkpoint_model(ckpt: str | os.PathLike) -> tuple[MmoeForCausalLM, dict, Path]:
    tag_dir = resolve_tag_dir(Path(ckpt))
    meta = json.loads((tag_dir / "meta.json").read_text())
    config = MmoeConfig(**dict(meta["model_config"], moe_backend="torch", ep_size=1))
    model = MmoeForCausalLM(config)
    model.load_state_dict(gather_state_dict(tag_dir), strict=True)
    return model.eval(), meta, tag_dir


def model_card(meta: dict, config: MmoeConfig, report_md: Path | None) -> str:
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


def save_export(model: MmoeForCausalLM, out: str | os.PathLike, meta: dict | None = None,
                processor_dir: str | os.PathLike | None = None, report_dir: str | os.PathLike | None = None) -> Path:
    """Write an HF folder (weights, config with auto_map, code, processor, generation config,
    model card) to a temp dir, then swap it in: a failure never leaves a half-written export."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.auto_map = {"AutoConfig": "configuration_mmoe.MmoeConfig",
                             "AutoModelForCausalLM": "modeling_mmoe.MmoeForCausalLM"}
    model.save_pretrained(tmp)
    write_code(tmp)
    if processor_dir is not None:
        for f in Path(processor_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    c = model.config
    GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                     max_new_tokens=16, do_sample=False).save_pretrained(tmp)
    report_md = None
    if report_dir is not None:
        for name in ("routing_report.png", "routing_report.md"):
            if (Path(report_dir) / name).exists():
                shutil.copy2(Path(report_dir) / name, tmp / name)
        report_md = Path(report_dir) / "routing_report.md"
    (tmp / "README.md").write_text(model_card(meta or {}, c, report_md))
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def export(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    model, meta, _ = load_checkpoint_model(ckpt)
    return save_export(model, out, meta, meta.get("processor_dir"), meta.get("report_dir"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmoe-ds export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="run output dir, its checkpoints/ dir, or a tag dir")
    parser.add_argument("out", help="folder to write the HF model to")
    args = parser.parse_args(argv)
    path = export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {path}")
    return 0
