"""The export's README.md: a Hub model card built with `huggingface_hub.ModelCard`.

Metadata: library_name, pipeline_tag, tags, license, language, datasets and the last evaluation as
`model-index` (with the split each metric was measured on). Body: origin, how to load (with a
complete example and the pipeline), what must be installed, the routing design, the capacity and
bias audit per modality from the training's routing statistics (drops per route), the training
sources with the licenses their shards record, and the routing report when the export carries one.
"""
from __future__ import annotations

import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..data.manifest import manifest_path
from ..model import MmoeConfig

PIPELINE_TAG = "image-text-to-text"  # tested end to end: pipeline(PIPELINE_TAG, model=export, trust_remote_code=True)
LANGUAGE = ["en"]  # the captions and texts of the built-in sources are English
TAGS = ["mixture-of-experts", "multimodal", "custom_code", "mmoe-ds"]
REQUIREMENTS = ("torch", "transformers", "Pillow", "tokenizers", "safetensors", "numpy")
MODEL_ID_PLACEHOLDER = "path/to/this/export"  # the example's model id; a Hub repo id works the same
# Final metrics of the checkpoint's evaluation shown as model-index results: key -> (task, metric name, split):
# the losses come from the validation loaders, ranking and retrieval from the test split (mmoe_ds.training.evaluate).
EVAL_METRICS = {
    "caption_loss": ("image-to-text", "caption cross-entropy (nats/token)", "validation"),
    "caption_rank_acc": ("image-to-text", "zero-shot caption ranking accuracy", "test"),
    "retrieval_r1": ("image-text-retrieval", "image-to-text retrieval R@1", "test"),
    "retrieval_r5": ("image-text-retrieval", "image-to-text retrieval R@5", "test"),
    "text_ppl": ("text-generation", "text perplexity", "validation"),
}
LICENSE_SCAN_BYTES = 1 << 20  # a source's license is read from the .json members of its first shard's first MiB


@dataclass
class ModalityAudit:
    """One modality's share of the MoE layers' work over a training window (all layers summed)."""

    modality: str
    tokens: int  # tokens of this modality entering the MoE layers (summed over layers)
    token_share: float  # of all tokens
    compute_share: float  # kept routes (expert FFN evaluations) of this modality / all kept routes
    drop_rate: float  # routes dropped by capacity / routes chosen (per route: with top-k, k routes per token)
    effective_experts: float  # exp(entropy of the kept per-expert load), mean over layers
    router_effective_experts: float  # exp(mean per-token router entropy), token-weighted over layers


@dataclass
class RoutingAudit:
    step: int | None
    per_modality: list[ModalityAudit]
    per_layer: list[dict[str, dict]]  # the raw `routing` list of the metrics record


def _load_entropy(loads: list[int]) -> float:
    total = sum(loads)
    return -sum(v / total * math.log(v / total) for v in loads if v) if total else 0.0


def routing_audit(record: dict) -> RoutingAudit:
    """Args: record: a metrics.jsonl "train" record with a `routing` list (one {modality: stats} per
    MoE layer, `RoutingStats.to_dict`). Returns: the per-modality audit."""
    layers = record["routing"]
    modalities = list(layers[0]) if layers else []
    all_tokens = sum(s[m]["tokens"] for s in layers for m in modalities)
    all_kept = sum(sum(s[m]["kept_per_expert"]) for s in layers for m in modalities)
    audits = []
    for m in modalities:
        tokens = sum(s[m]["tokens"] for s in layers)
        routed = sum(sum(s[m]["routed_per_expert"]) for s in layers)
        kept = sum(sum(s[m]["kept_per_expert"]) for s in layers)
        eff = [math.exp(_load_entropy(s[m]["kept_per_expert"])) for s in layers if s[m]["tokens"]]
        router_ent = sum(s[m]["entropy"] * s[m]["tokens"] for s in layers) / max(tokens, 1)
        audits.append(ModalityAudit(m, tokens, tokens / max(all_tokens, 1), kept / max(all_kept, 1),
                                    (routed - kept) / max(routed, 1), sum(eff) / max(len(eff), 1),
                                    math.exp(router_ent)))
    return RoutingAudit(record.get("step"), audits, layers)


def last_train_record(metrics_file: Path, max_step: int | None = None) -> dict | None:
    """The last "train" record with routing statistics in a run's metrics.jsonl, at or before
    `max_step` (the exported checkpoint's step; the run may have gone on). None if there is none."""
    last = None
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if isinstance(record, dict) and record.get("kind") == "train" and record.get("routing") and (
                    max_step is None or not isinstance(record.get("step"), int) or record["step"] <= max_step):
                last = record
    return last


def _manifest(meta: dict) -> tuple[Path, dict] | None:
    """(data folder, manifest) beside the checkpoint's processor folder, or None."""
    manifest = manifest_path(Path(meta["processor_dir"]).parent) if meta.get("processor_dir") else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return None
    return (manifest.parent, data) if isinstance(data, dict) else None


def training_sources(meta: dict) -> list[str]:
    """The training data's sources, from the manifest beside the checkpoint's processor folder."""
    found = _manifest(meta)
    sources = found[1].get("sources", []) if found else []
    return [str(s) for s in sources] if isinstance(sources, list) else []


def source_licenses(meta: dict) -> dict[str, list[str]]:
    """{source: the distinct licenses its samples record}, read from the `license` of the .json
    members of each source's first listed shard (`mmoe-ds prepare` writes one per sample); a source
    whose shard is missing or records none maps to []."""
    found = _manifest(meta)
    if found is None:
        return {}
    root, manifest = found
    first_shard: dict[str, str] = {}
    shards = manifest.get("shards")
    for name, info in sorted(shards.items()) if isinstance(shards, dict) else []:
        if isinstance(info, dict) and isinstance(info.get("source"), str):
            first_shard.setdefault(info["source"], name)
    return {source: _shard_licenses(root / first_shard[source]) if source in first_shard else []
            for source in training_sources(meta)}


def _shard_licenses(shard: Path) -> list[str]:
    licenses: list[str] = []
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.offset > LICENSE_SCAN_BYTES:
                    break
                if not (member.isfile() and member.name.endswith(".json") and member.size <= 1 << 16):
                    continue
                try:
                    record = json.loads(tar.extractfile(member).read())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                lic = record.get("license") if isinstance(record, dict) else None
                if isinstance(lic, str) and lic and lic not in licenses:
                    licenses.append(lic)
    except (OSError, tarfile.TarError):  # a shard gone or damaged since training: no license to report
        return []
    return licenses


def eval_results(metrics: dict, model_name: str, dataset: str) -> list[EvalResult]:
    return [EvalResult(task_type=task, dataset_type=dataset, dataset_name=f"{dataset} ({split} split)",
                       dataset_split=split, metric_type=key, metric_name=name, metric_value=float(metrics[key]))
            for key, (task, name, split) in EVAL_METRICS.items() if isinstance(metrics.get(key), (int, float))]


def _routing_design(config: MmoeConfig) -> list[str]:
    rc = config.router_config()
    lines = ["## Routing design", "",
             f"Mode `{rc.mode}`, {rc.num_experts} experts per MoE layer ("
             + (f"MoE blocks in layers {config.moe_layers}" if config.moe_layers is not None
                else f"an MoE block every {config.moe_layer_frequency} layers")
             + f"), drop tokens: {rc.drop_tokens} (policy `{rc.drop_policy}`, "
             f"min capacity {rc.min_capacity}).", "",
             "| modality | top-k | capacity factor (train) | capacity factor (eval) | experts it may use |",
             "|---|---|---|---|---|"]
    for i, m in enumerate(rc.modalities):
        pool = rc.pool_members[i]
        pool_text = "all" if len(pool) == rc.num_experts else ", ".join(map(str, pool))
        lines.append(f"| {m} | {rc.top_k_per_modality[i]} | {rc.capacity_factor_per_modality[i]:g} | "
                     f"{rc.eval_capacity_factor_per_modality[i]:g} | {pool_text} |")
    return lines + [""]


def _audit_section(audit: RoutingAudit | None) -> list[str]:
    lines = ["## Capacity and bias audit per modality", ""]
    if audit is None or not audit.per_modality:
        return lines + ["No training routing statistics were available to this export.", ""]
    lines += [f"From **training-time routing statistics** (the last logged training window, step {audit.step}, "
              "as counted on rank 0 with the training capacity factors), not from a held-out analysis. "
              "Share of expert compute = this modality's routes that reached an expert / all such routes; "
              "drop rate = routes dropped by capacity / routes chosen (per route, not per token: with top-k each "
              "token makes k routes); effective experts = exp(entropy of the "
              "per-expert load), mean over MoE layers (router: exp of the mean per-token router entropy).", "",
              "| modality | tokens | share of tokens | share of expert compute | drop rate (of routes) | effective "
              "experts (load) | effective experts (router) |", "|---|---|---|---|---|---|---|"]
    for a in audit.per_modality:
        lines.append(f"| {a.modality} | {a.tokens} | {a.token_share:.1%} | {a.compute_share:.1%} | "
                     f"{a.drop_rate:.2%} | {a.effective_experts:.2f} | {a.router_effective_experts:.2f} |")
    lines += ["", "Per MoE layer (kept routes per expert, dropped routes):", ""]
    for i, layer in enumerate(audit.per_layer):
        parts = [f"{m}: kept {s['kept_per_expert']}, dropped {s['dropped']}" for m, s in layer.items()]
        lines.append(f"- MoE layer {i}: " + "; ".join(parts))
    return lines + [""]


def _image_input(config: MmoeConfig) -> str:
    if config.vision_encoder == "hf":
        vc = config.vision_config
        return (f"images through the pretrained `{vc.get('model_type')}` vision tower ({vc.get('image_size')} px, "
                f"{config.vision_projector} projector"
                + (f", at most {config.vision_max_tokens} image tokens" if config.vision_max_tokens else "") + ").")
    return (f"images {config.image_size}x{config.image_size} px, {config.num_channels} channel(s), "
            f"{config.patch_size}x{config.patch_size} patches.")


def _usage(model_id: str) -> list[str]:
    return ["## How to use", "",
            "The model and its processor are custom code shipped in this repository (`trust_remote_code=True`); "
            "mmoe-ds and DeepSpeed are not needed. Install: `pip install " + " ".join(REQUIREMENTS) + "`.", "",
            "```python",
            "import torch",
            "from PIL import Image",
            "from transformers import AutoModelForCausalLM, AutoProcessor",
            "",
            f'model_id = "{model_id}"  # a local export folder or a Hub repo id',
            "processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)",
            "model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True).eval()",
            'image = Image.new("RGB", (64, 64), "white")  # or Image.open("photo.jpg")',
            "inputs = processor(images=image, return_tensors=\"pt\")  # a caption prompt: <bos> + <image> tokens",
            "with torch.no_grad():",
            "    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)",
            'caption = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]',
            "print(caption)",
            "```", "",
            "A text prompt continues after the image: `processor(images=image, text=\"a photo of\", "
            "return_tensors=\"pt\")`; "
            "lists of images and texts make a batch (left-padded, so it generates as each prompt alone). "
            "The image is resized to the model's image size and converted to its channels. The pipeline works "
            "too: `pipeline(\"" + PIPELINE_TAG + "\", model=model_id, trust_remote_code=True)(images=image, "
            "text=\"\")`.", "",
            "`processor(images=[...], texts=[...])` (the plural keyword) gives the training batch (labels and "
            "`<eos>` included, right-padded) for fine-tuning.", ""]


def model_card(meta: dict, config: MmoeConfig, report_md: Path | None, routing_record: dict | None = None,
               license: str = "apache-2.0", model_name: str = "mmoe-ds multimodal MoE",
               model_id: str = MODEL_ID_PLACEHOLDER) -> ModelCard:
    """Args:
        meta: the checkpoint's meta.json ({} for a model not from a checkpoint).
        config: the model's config.
        report_md: the routing report copied into the export, if any: linked and appended.
        routing_record: the run's last metrics.jsonl "train" record (for the capacity and bias audit).
        license: the card's license id.
        model_name: the model-index name.
        model_id: the id the usage example loads.
    Returns:
        the card (`str(card)` / `card.save(path)` give the README.md)."""
    sources = training_sources(meta)
    metrics = meta.get("metrics") or {}
    licenses = source_licenses(meta)
    data = ModelCardData(library_name="transformers", pipeline_tag=PIPELINE_TAG, tags=list(TAGS), license=license,
                         language=list(LANGUAGE), datasets=sources or None, model_name=model_name,
                         eval_results=eval_results(metrics, model_name, "mmoe-ds-" + "+".join(sources or ["data"]))
                         or None)
    origin = (f"Exported from step {meta['step']} of a run with expert-parallel size {meta['ep_size']} on "
              f"{meta['world_size']} processes." if "step" in meta else "Not exported from a training checkpoint.")
    rc = config.router_config()
    lines = [f"# {model_name}", "",
             "A multimodal mixture-of-experts language model (image patches + text -> text) trained with "
             f"mmoe-ds. {origin}", "",
             f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_local_experts} experts "
             f"per MoE layer, routing mode `{rc.mode}`; " + _image_input(config), ""]
    lines += _usage(model_id) + _routing_design(config)
    lines += _audit_section(routing_audit(routing_record) if routing_record else None)
    if metrics:
        lines += ["## Evaluation", "", "The checkpoint's own evaluation (also in the metadata as `model-index`):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    if sources:
        lines += ["## Training data", "", "Each sample's license is recorded in its shard's JSON; per source:", "",
                  "| source | license |", "|---|---|"]
        lines += [f"| {src} | {'; '.join(licenses.get(src) or []) or 'not recorded in its shards'} |"
                  for src in sources]
        lines += [""]
    if report_md is not None and report_md.exists():
        png = report_md.parent / "routing_report.png"
        link = f"See [{report_md.name}]({report_md.name})" + (f" and [{png.name}]({png.name})" if png.exists() else "")
        lines += ["## Routing report", "", link + ".", "", report_md.read_text(), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
