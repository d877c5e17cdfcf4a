"""The data a recipe trains and evaluates on: its prepared dataset checked against the recipe
(before any worker starts), its loaders, what evaluation can measure on it, and samples drawn
across a test split (retrieval, class ranking, the caption demo).

Used by `mmoe_ds.train`, `mmoe_ds.training.evaluate` and `mmoe_ds.export.caption`. Reads only the manifest for
the checks (no DeepSpeed, no shard reads), so `train --check` stays fast.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config.recipe import EVAL_METRICS, DataSection
from ..data.captions import CLASS_NAMES
from ..data.loader import BalancedLoader, LoaderConfig, shard_location
from ..data.manifest import has_manifest, read_manifest, sample_counts, shard_kinds
from ..data.processor import MmoeProcessor
from ..data.schema import SAMPLE_KINDS
from ..data.shards import decode, iter_raw
from ..errors import ConfigError

CLASS_RANK_SOURCES = ("fashion_mnist", "digits", "covariance")  # labelled sources, in order of preference


# -- the prepared dataset -------------------------------------------------------------------------
EMBEDDED_DIR = DataSection.dir  # the embedded default dataset: the only one a run may build itself


def builds_embedded(data: DataSection) -> bool:
    """Whether a missing `data.dir` is built by the run: only the embedded default dataset, and only
    with `data.prepare_if_missing`. Any other missing folder is an error, never other data: a
    misspelled path must not train on the embedded dataset instead."""
    return data.prepare_if_missing and Path(data.dir).resolve() == Path(EMBEDDED_DIR).resolve()


def missing_dataset(data: DataSection) -> str:
    """The one-line problem for a `data.dir` without a prepared dataset."""
    if Path(data.dir).is_dir():
        what = "has no manifest.json (not a prepared dataset)"
    else:
        parent = Path(data.dir).parent
        what = "does not exist" + ("" if parent.is_dir() else f" (nor does {parent})")
    fix = (f"prepare it (`mmoe-ds prepare --out {data.dir}`, `mmoe-ds index ... --out {data.dir}`) or fix the path"
           + ("" if not data.prepare_if_missing else
              f"; data.prepare_if_missing builds only the embedded dataset at {EMBEDDED_DIR}"))
    return f"data.dir={data.dir} {what}; {fix}"


def ensure_dataset(data: DataSection) -> None:
    """Build the embedded dataset at `data.dir` if it is missing and the recipe allows it."""
    if has_manifest(data.dir):
        return
    if not builds_embedded(data):
        raise ConfigError(missing_dataset(data))
    from ..data.prepare import main as prepare

    prepare(["--source", "embedded", "--out", data.dir, "--max-length", str(data.max_length)])


def _test_pair_shards(manifest: dict, source: str | None = None) -> list[tuple[str, dict]]:
    """(manifest key, entry) of the test shards holding image+caption pairs, sorted."""
    return [(rel, info) for rel, info in sorted(manifest["shards"].items())
            if info["split"] == "test" and shard_kinds(info).get("image_text", 0) > 0
            and (source is None or info["source"] == source)]


def class_rank_source(manifest: dict) -> str | None:
    """The labelled source whose test images class ranking scores, or None (user data has no labels)."""
    test_sources = {info["source"] for _, info in _test_pair_shards(manifest)}
    classes = manifest.get("classes", CLASS_NAMES)
    return next((s for s in CLASS_RANK_SOURCES if s in test_sources and s in classes), None)


# -- what evaluation can measure --------------------------------------------------------------------
@dataclass
class EvalPlan:
    """The metrics a run's evaluation computes, and why each other one is left out."""
    caption_loss: bool = False
    text_ppl: bool = False
    retrieval: bool = False
    class_rank_source: str | None = None
    left_out: dict[str, str] = field(default_factory=dict)  # metric -> reason

    @property
    def metrics(self) -> list[str]:
        on = {"caption_loss": self.caption_loss, "text_ppl": self.text_ppl, "retrieval": self.retrieval,
              "class_rank": self.class_rank_source is not None}
        return [m for m in EVAL_METRICS if on[m]]


def plan_evaluation(data: DataSection, manifest: dict, world_size: int) -> EvalPlan:
    """What the prepared data serves: a loss needs a validation sample per rank; retrieval needs
    test image+caption pairs (at least 2, and one per rank); class ranking a labelled source."""
    counts, plan = sample_counts(manifest), EvalPlan()
    for metric, kind in (("caption_loss", "image_text"), ("text_ppl", "text")):
        n = counts[("validation", kind)]
        if n >= world_size:
            setattr(plan, metric, True)
        else:
            plan.left_out[metric] = (f"no {kind!r} samples in split 'validation'" if n == 0 else
                                     f"only {n} {kind!r} samples in split 'validation', fewer than the {world_size} "
                                     f"processes")
    n_test = counts[("test", "image_text")]
    if data.retrieval_candidates == 0:
        plan.left_out["retrieval"] = "data.retrieval_candidates is 0"
    elif n_test >= max(2, world_size):
        plan.retrieval = True
    else:
        plan.left_out["retrieval"] = (f"{n_test} 'image_text' samples in split 'test', fewer than "
                                      f"{max(2, world_size)}")
    source = class_rank_source(manifest)
    if source is not None and data.ranking_images >= world_size:
        plan.class_rank_source = source
    else:
        plan.left_out["class_rank"] = ("data.ranking_images is below the number of processes" if source else
                                       f"no labelled test images of a source with class names "
                                       f"({'/'.join(CLASS_RANK_SOURCES)})")
    if data.eval_metrics != "auto":  # only what the recipe asks for
        for metric in plan.metrics:
            if metric not in data.eval_metrics:
                plan.left_out[metric] = "not in data.eval_metrics"
                if metric == "class_rank":
                    plan.class_rank_source = None
                else:
                    setattr(plan, metric, False)
    return plan


# -- the check ------------------------------------------------------------------------------------
@dataclass
class DataCheck:
    """Outcome of checking a prepared dataset against a recipe: problems (each naming the fix),
    the evaluation plan, and a one-line summary for `train --check`."""
    problems: list[str]
    plan: EvalPlan | None
    summary: str

    @property
    def ok(self) -> bool:
        return not self.problems


def _suggested_composition(composition: dict[str, int], available: set[str]) -> dict[str, int]:
    """The composition restricted to kinds the data has, same batch size (counts moved to the largest)."""
    kept = {k: v for k, v in composition.items() if k in available and v > 0}
    if not kept:
        return {}
    moved = sum(composition.values()) - sum(kept.values())
    largest = max(kept, key=lambda k: (kept[k], k == "image_text"))
    kept[largest] += moved
    return kept


def check_data(data: DataSection, world_size: int) -> DataCheck:
    """Check the prepared dataset at `data.dir` against the recipe's data section.

    Args:
        data: the recipe's data section (composition, workers, evaluation settings).
        world_size: the number of training processes.
    Returns:
        DataCheck: problems are empty when every composition kind has enough train samples for
        every loader slot and evaluation has something to measure (everything the recipe's
        `data.eval_metrics` lists, if it lists any).
    """
    where = data.dir
    if not has_manifest(where):
        if builds_embedded(data):
            return DataCheck([], None, f"data: {where} is not prepared yet; the run builds the embedded dataset there "
                                       f"first (data.prepare_if_missing), which serves every kind and metric")
        return DataCheck([missing_dataset(data)], None, "")
    try:
        manifest = read_manifest(where)
        counts = sample_counts(manifest)
    except (ValueError, KeyError, TypeError) as e:
        return DataCheck([f"{where}/manifest.json is unreadable ({type(e).__name__}: {e}); prepare the dataset "
                          f"again with `mmoe-ds prepare --out {where}`"], None, "")
    problems = []
    slots = world_size * max(data.num_workers, 1)
    train_kinds = {k for k in SAMPLE_KINDS if counts[("train", k)] >= slots}
    lacking = [k for k, per_batch in data.composition.items() if per_batch > 0 and k not in train_kinds]
    if lacking:
        what = ", ".join(f"{k!r} ({data.composition[k]} per batch; " +
                         ("no samples)" if counts[("train", k)] == 0 else
                          f"{counts[('train', k)]} samples, fewer than the {slots} loader slots)") for k in lacking)
        suggestion = _suggested_composition(data.composition, train_kinds)
        fix = (f"set data.composition to {json.dumps(suggestion)} (the kinds this data has, same batch size) or "
               f"prepare data with {' and '.join(map(repr, lacking))} samples" if suggestion else
               f"prepare data with {' and '.join(map(repr, lacking))} samples")
        problems.append(f"{where}: split 'train' lacks what data.composition asks for: {what}; {fix}")
    plan = plan_evaluation(data, manifest, world_size)
    if data.eval_metrics != "auto":
        for metric in data.eval_metrics:
            if metric not in plan.metrics:
                problems.append(f"{where}: data.eval_metrics asks for {metric} but {plan.left_out.get(metric)}; "
                                f"remove {metric!r} from data.eval_metrics (or set it to \"auto\") or prepare data "
                                f"that has it")
    elif not plan.metrics:
        reasons = "; ".join(f"{m}: {r}" for m, r in plan.left_out.items())
        problems.append(f"{where}: evaluation has nothing to measure ({reasons}); prepare the dataset with validation "
                        f"and test splits (`mmoe-ds prepare --validation-fraction 0.1 --test-fraction 0.1`, the "
                        f"default for inputs without them; `mmoe-ds index --validation PATTERN --test PATTERN`, or "
                        f"--shards PATTERN with --validation-fraction/--test-fraction)")
    have = ", ".join(f"{k}={counts[('train', k)]}" for k in SAMPLE_KINDS if counts[("train", k)])
    left = ", ".join(f"{m} ({r})" for m, r in plan.left_out.items())
    measured = [f"retrieval (among up to {data.retrieval_candidates} test captions)" if m == "retrieval" else m
                for m in plan.metrics]
    summary = f"data {where}: train {have}; evaluation: {', '.join(measured) or 'nothing'}"
    if left:
        summary += f"; not measured: {left}"
    return DataCheck(problems, plan, summary)


# -- loaders --------------------------------------------------------------------------------------
def load_processor(data: DataSection, directory: str | Path | None = None) -> MmoeProcessor:
    """The processor a run encodes with: the one saved in `directory` (a `train.init_from` folder that
    has one), else the prepared dataset's; `data.max_length` and `data.max_caption_bytes` (the text
    bound, the loader's) apply either way."""
    processor = MmoeProcessor.from_pretrained(Path(directory) if directory is not None
                                              else Path(data.dir) / "processor")
    processor.max_text_bytes = data.max_caption_bytes
    try:
        processor.max_length = data.max_length
    except ValueError as e:  # too short for the image tokens
        raise ConfigError(f"data.max_length={data.max_length}: {e}") from None
    return processor


def processor_model_kwargs(model_section: dict, processor) -> dict:
    """MmoeConfig arguments of a from-scratch run: the recipe's model section with the processor's
    vocabulary, special tokens and image geometry."""
    tok = processor.tokenizer
    return dict(model_section, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, image_token_id=tok.convert_tokens_to_ids("<image>"),
                image_size=processor.image_size, patch_size=processor.patch_size,
                num_channels=processor.num_channels)


def loader_caps(data: DataSection) -> dict:
    """The recipe's loader caps, as LoaderConfig fields."""
    return {"max_caption_bytes": data.max_caption_bytes, "max_image_pixels": data.max_image_pixels,
            "verify_sha256": data.verify_sha256}


def make_train_loader(data: DataSection, processor, rank: int, world_size: int, seed: int) -> BalancedLoader:
    cfg = LoaderConfig(data.dir, "train", dict(data.composition), seed=seed, rank=rank, world_size=world_size,
                       num_workers=data.num_workers, resampled=True, max_length=data.max_length, **loader_caps(data))
    return BalancedLoader(cfg, processor)


def make_eval_loader(data: DataSection, processor, kind: str, rank: int, world_size: int, seed: int,
                     verify: bool = True) -> BalancedLoader:
    """The same held-out batches of one kind at every evaluation (fixed seed, fresh positions).
    `verify=False` skips the recipe's sha256 check (shards already verified by an earlier one)."""
    caps = dict(loader_caps(data), verify_sha256=data.verify_sha256 and verify)
    cfg = LoaderConfig(data.dir, "validation", {kind: sum(data.composition.values())}, seed=seed + 12345, rank=rank,
                       world_size=world_size, num_workers=0, resampled=True, max_length=data.max_length, **caps)
    return BalancedLoader(cfg, processor)


# -- test samples ---------------------------------------------------------------------------------
@dataclass
class TestSample:
    image: object  # PIL image
    caption: str
    source: str
    key: str
    label: int | None


def sample_test_set(data_dir: str, n: int, seed: int = 0, source: str | None = None,
                    distinct_captions: bool = False, max_scan: int | None = None) -> list[TestSample]:
    """Up to n image+caption samples spread over the test split (every source, every shard), seeded.

    Shards are visited in a seeded order and each gives its share of randomly chosen positions,
    so a demo or a metric never sees only the first files. With `distinct_captions`, samples whose
    caption was already taken are passed over; a second pass in file order (reading at most
    `max_scan` more samples, default 20 n + 1000) tops up when the first falls short.

    Args:
        data_dir: a prepared dataset (manifest.json).
        n: how many samples.
        seed: the choice of shards and positions.
        source: only this source's shards (e.g. a labelled embedded source).
        distinct_captions: no two samples with the same caption (retrieval candidates).
    Returns:
        the samples, in the order chosen; fewer than n when the split holds fewer.
    """
    shards = _test_pair_shards(read_manifest(data_dir), source)
    if n <= 0 or not shards:
        return []
    rng = np.random.default_rng([seed, 0x7e57])
    shards = [shards[i] for i in rng.permutation(len(shards))]
    out: list[TestSample] = []
    captions: set[str] = set()
    visited: set[tuple[str, int]] = set()
    skips: Counter = Counter()

    def take(rel: str, info: dict, wanted, budget: list[int] | None) -> None:
        for i, (key, files) in enumerate(iter_raw(shard_location(data_dir, rel), skips)):
            if len(out) >= n or (budget is not None and budget[0] <= 0):
                return
            if (rel, i) in visited or (wanted is not None and i not in wanted):
                continue
            visited.add((rel, i))
            if budget is not None:
                budget[0] -= 1
            sample = decode(rel, key, files, None, skips)  # a mixed shard's other kinds are passed over
            if sample is None or sample["kind"] != "image_text" or (distinct_captions and sample["text"] in captions):
                continue
            captions.add(sample["text"])
            meta = sample["meta"] if isinstance(sample["meta"], dict) else {}
            out.append(TestSample(sample["image"], sample["text"], str(meta.get("source", info["source"])), key,
                                  meta.get("label")))

    for j, (rel, info) in enumerate(shards):
        share = math.ceil((n - len(out)) / (len(shards) - j))
        if share > 0:
            take(rel, info, set(rng.choice(info["samples"], min(share, info["samples"]), replace=False).tolist()),
                 None)
    budget = [20 * n + 1000 if max_scan is None else max_scan]
    for rel, info in shards:
        if len(out) >= n or budget[0] <= 0:
            break
        take(rel, info, None, budget)
    return out
