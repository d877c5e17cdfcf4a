"""The experiment runner: recipes + overrides -> content-hashed training runs, launched with the
real DeepSpeed launcher, reused when finished, resumed when interrupted.

A `Scale` (recipes/experiments/<scale>.json) says how big every run of an experiment is: the
model/data/train overrides laid over a routing recipe from recipes/modes/, how many processes one
run uses, how many runs go at once, the DeepSpeed config, and the `mmoe-ds prepare` arguments of
the datasets. A `RunSpec` is one run: a base recipe, overrides, a seed. Its folder is
`<out>/_runs/<hash>` where the hash covers everything that changes the result (the effective
recipe with the dataset identified by its manifest's content, the DeepSpeed config, the process
count), so experiments that ask for the same run share it (E2, E3, E5 and E6 reuse E1's runs).
A run counts as finished when its `done.json` exists (written after the launcher returned 0);
an unfinished folder is launched again and the trainer resumes from its last checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mmoe_ds.config.launch_env import free_port
from mmoe_ds.errors import ExperimentError
from mmoe_ds.io.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
MODES_DIR = REPO / "recipes" / "modes"
SCALES_DIR = REPO / "recipes" / "experiments"
SCALES = ("tiny", "cpu", "gpu")
MODALITIES = ("image", "text")
# Said by every experiment that reads routing from metrics.jsonl (the trainer's per-window statistics).
TRAINING_ROUTING_CAVEAT = ("Routing is measured on training batches (the trainer's logged statistics), not on a held-out "
                           "probe set, and there padding positions are routed and counted as text tokens (E3, E5 and "
                           "`mmoe-ds analyze` measure on the test split without padding).")


# The experiments' protocol version, recorded in every results.json: 2 = issue 17's (global balance only in
# the recipes, E[m] ~ N(0, 1) from its own generator, per-layer matched targets in routed-fraction space,
# seed-paired contrasts with a pre-declared primary, Holm and power). Results without it predate that.
PROTOCOL = 2



# Dict-valued recipe fields that an override replaces whole (a batch mix, a target, pools are one value each).
LEAF_KEYS = ("composition", "matched_utilization_target", "pools")


def deep_merge(base: dict, overrides: dict) -> dict:
    """A copy of `base` with `overrides` laid over it (nested dicts merged, except LEAF_KEYS and
    non-dicts, which are replaced)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in LEAF_KEYS:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class Scale:
    """How large the runs of an experiment are (one JSON file in recipes/experiments/).

    Attributes:
        name: tiny | cpu | gpu.
        procs: processes per run (`--num_gpus`); expert_parallel_size is set to it.
        parallel: runs launched at the same time.
        ds_config: DeepSpeed config, relative to the repository.
        overrides: {"data", "model", "train"} laid over each routing recipe (router fields are kept).
        prepare: dataset name -> `mmoe-ds prepare` arguments (without --out).
        finetune_fraction: E5's fine-tuning steps as a fraction of train.steps.
        description: what the scale is, said in every results file.
        sizes: the size sweep: name -> model overrides laid over the scale's model ({}: the scale's own).
        seed_counts: part -> how many of the given seeds it uses (the first ones); a part not named
            uses all. Parts: arms (E1's cells other than the primary pair), probe (E1's probe analyses),
            sweep, covariance, e2, e3, e5, e6.
        dataset_overrides: dataset name -> {"data", "model", "train"} overrides of every run on it (laid
            over the scale's, under the run's own), e.g. the covariance data's blind-router model settings.
    """

    name: str
    procs: int
    parallel: int
    ds_config: str
    overrides: dict
    prepare: dict
    finetune_fraction: float = 0.5
    description: str = ""
    sizes: dict = field(default_factory=dict)
    seed_counts: dict = field(default_factory=dict)
    dataset_overrides: dict = field(default_factory=dict)

    @classmethod
    def load(cls, name: str, procs: int | None = None) -> "Scale":
        """Read recipes/experiments/<name>.json; `procs` (e.g. the GPU count) replaces its process count."""
        if name not in SCALES:
            raise ExperimentError(f"--scale {name!r}: choose one of {list(SCALES)}.")
        raw = json.loads((SCALES_DIR / f"{name}.json").read_text())
        scale = cls(name=name, procs=int(procs or raw["procs"]), parallel=int(raw["parallel"]),
                    ds_config=raw["ds_config"], overrides=raw["overrides"], prepare=raw["prepare"],
                    finetune_fraction=float(raw.get("finetune_fraction", 0.5)), description=raw.get("description", ""),
                    sizes=dict(raw.get("sizes", {})), seed_counts={k: int(v) for k, v in raw.get("seed_counts", {}).items()},
                    dataset_overrides=dict(raw.get("dataset_overrides", {})))
        if scale.procs < 1 or scale.parallel < 1:
            raise ExperimentError(f"recipes/experiments/{name}.json: procs and parallel must be >= 1.")
        return scale

    @property
    def steps(self) -> int:
        return int(self.overrides["train"]["steps"])

    def summary(self) -> dict:
        """What a results file records about the scale."""
        model = self.overrides.get("model", {})
        return {"name": self.name, "description": self.description, "steps": self.steps, "procs": self.procs,
                "parallel": self.parallel, "ds_config": self.ds_config,
                "model": {k: model[k] for k in ("hidden_size", "num_hidden_layers", "num_local_experts") if k in model}}


@dataclass(frozen=True)
class RunSpec:
    """One training run: a routing recipe (path) + overrides + seed, on a named dataset."""

    base: str  # path of a recipe JSON (e.g. recipes/modes/agnostic.json)
    seed: int
    overrides: dict = field(default_factory=dict)
    dataset: str = "embedded"
    label: str = ""

    def key(self) -> str:
        return json.dumps([self.base, self.seed, self.overrides, self.dataset], sort_keys=True)


def mode_recipe(name: str) -> str:
    """Path of recipes/modes/<name>.json (checked)."""
    path = MODES_DIR / f"{name}.json"
    if not path.exists():
        raise ExperimentError(f"{path}: no such routing recipe; choose one of "
                              f"{sorted(p.stem for p in MODES_DIR.glob('*.json'))}.")
    return str(path)


@dataclass
class Run:
    """A finished run: its folder, recipe and metrics records."""

    spec: RunSpec
    dir: Path
    recipe: dict
    records: list[dict]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "eval"]

    @property
    def train_records(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "train"]

    def final_eval(self) -> dict:
        if not self.evals:
            raise ExperimentError(f"{self.dir}/metrics.jsonl: no evaluation record; the run's evaluation failed "
                                  f"(see its launch.log).")
        return self.evals[-1]


@dataclass(frozen=True)
class Tally:
    """Where an experiment started (`Runner.tally`): perf_counter seconds and the runner's counters."""
    seconds: float
    launched: int
    reused: int


class Runner:
    """Launches RunSpecs at a Scale under `out`, reusing finished runs.

    Args:
        out: the experiments folder (runs in out/_runs, datasets in out/_data).
        scale: the Scale.
        log: print progress lines (to stderr).
    """

    def __init__(self, out: str | os.PathLike, scale: Scale, log: bool = True):
        self.out, self.scale, self.verbose = Path(out), scale, log
        self.launched = 0  # runs trained by this Runner
        self.reused = 0  # runs found finished
        self._lock = threading.Lock()
        self.seen: dict[str, float] = {}  # run folder -> its training wall time (done.json), for every run used


    def tally(self) -> "Tally":
        """Mark the start of an experiment: its wall clock and this runner's launch / reuse counters."""
        return Tally(time.perf_counter(), self.launched, self.reused)

    def header(self, since: "Tally", exp_id: str, name: str, title: str, seeds: Sequence[int]) -> dict:
        """The fields every results.json starts with: what ran, how to rerun it, and what it cost since `since`."""
        return {"experiment": exp_id, "name": name, "title": title, "protocol": PROTOCOL,
                "command": experiment_command(exp_id, seeds, self.scale), "scale": self.scale.summary(),
                "seeds": list(seeds), "seconds": time.perf_counter() - since.seconds,
                "runs_launched": self.launched - since.launched, "runs_reused": self.reused - since.reused,
                "run_minutes": self.run_minutes()}
    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[experiments] {message}", file=sys.stderr, flush=True)

    # -- data --------------------------------------------------------------------------------------
    def dataset(self, name: str) -> Path:
        """The prepared dataset `name` of this scale (built once under out/_data/<scale>-<name>)."""
        if name not in self.scale.prepare:
            raise ExperimentError(f"recipes/experiments/{self.scale.name}.json: no 'prepare' entry for dataset {name!r}.")
        path = self.out / "_data" / f"{self.scale.name}-{name}"
        if not (path / "manifest.json").exists():
            from mmoe_ds.data.prepare import main as prepare

            self.log(f"preparing dataset {name} -> {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            if prepare(list(self.scale.prepare[name]) + ["--out", str(path)]) != 0:
                raise ExperimentError(f"mmoe-ds prepare {' '.join(self.scale.prepare[name])} --out {path} failed "
                                      f"(its message is above).")
        return path

    # -- recipes -----------------------------------------------------------------------------------
    def recipe(self, spec: RunSpec) -> dict:
        """The effective recipe of `spec` (without output_dir): base, then the scale, then the spec's overrides."""
        base = json.loads(Path(spec.base).read_text())
        recipe = deep_merge(deep_merge(deep_merge(base, self.scale.overrides),
                                       self.scale.dataset_overrides.get(spec.dataset, {})), spec.overrides)
        if recipe["train"].get("init_from"):  # the model is the folder's; only routing/loss fields may change
            recipe["model"] = copy.deepcopy(spec.overrides.get("model", {}))
        recipe.pop("description", None)
        recipe["data"]["dir"] = str(self.dataset(spec.dataset).resolve())
        recipe["data"]["prepare_if_missing"] = False
        recipe["train"].update(seed=spec.seed, expert_parallel_size=self.scale.procs, progress_bar=False)
        return recipe

    def run_hash(self, recipe: dict) -> str:
        """16 hex digits over what changes a run's result (dataset by content, not by path)."""
        data_dir = Path(recipe["data"]["dir"])
        identity = copy.deepcopy(recipe)
        identity["data"]["dir"] = hashlib.sha256((data_dir / "manifest.json").read_bytes()).hexdigest()
        identity["train"].pop("output_dir", None)
        init = identity["train"].get("init_from")
        if init:
            identity["train"]["init_from"] = _folder_digest(Path(init))
        ds = json.loads((REPO / self.scale.ds_config).read_text())
        blob = json.dumps({"recipe": identity, "ds_config": ds, "procs": self.scale.procs}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "_runs" / self.run_hash(self.recipe(spec))

    # -- launching ---------------------------------------------------------------------------------
    def _launch(self, spec: RunSpec) -> Run:
        recipe = self.recipe(spec)
        folder = self.out / "_runs" / self.run_hash(recipe)
        if not (folder / "done.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            recipe["train"]["output_dir"] = str(folder.resolve())
            recipe_path = folder / "recipe.json"
            atomic_write_text(recipe_path, json.dumps(recipe, indent=1) + "\n")
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(self.scale.procs),
                   "--master_port", str(free_port()), "--module", "mmoe_ds.train", "--recipe", str(recipe_path.resolve()),
                   "--deepspeed_config", str(REPO / self.scale.ds_config)]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
            self.log(f"train {spec.label or Path(spec.base).stem} seed {spec.seed} -> {folder}")
            tic = time.perf_counter()
            with open(folder / "launch.log", "ab") as log:
                rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                tail = (folder / "launch.log").read_text(errors="replace")[-3000:]
                raise ExperimentError(f"training {spec.label or spec.base} seed {spec.seed} failed (exit {rc}); "
                                      f"log: {folder / 'launch.log'}\n{tail}")
            atomic_write_text(folder / "done.json", json.dumps({"seconds": time.perf_counter() - tic,
                                                                 "label": spec.label, "cmd": cmd}) + "\n")
            with self._lock:
                self.launched += 1
        else:
            with self._lock:
                self.reused += 1
        with self._lock:
            self.seen[str(folder)] = float(json.loads((folder / "done.json").read_text()).get("seconds", 0.0))
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        return Run(spec, folder, json.loads((folder / "recipe.json").read_text()), records)

    def run_all(self, specs: Sequence[RunSpec]) -> list[Run]:
        """Train (or reuse) every spec, `scale.parallel` at a time; results in the order given."""
        for spec in specs:  # datasets are prepared here, once, before any thread needs them
            self.dataset(spec.dataset)
        if self.scale.parallel == 1 or len(specs) == 1:
            return [self._launch(s) for s in specs]
        with ThreadPoolExecutor(self.scale.parallel) as pool:
            return list(pool.map(self._launch, specs))

    def run_minutes(self) -> float:
        """Sum of the training wall times of every run this Runner used (trained now or earlier), in minutes."""
        return sum(self.seen.values()) / 60

    def export(self, run: Run) -> Path:
        """`mmoe-ds export` of a finished run into <run>/export (once)."""
        out = run.dir / "export"
        if not (out / "config.json").exists():
            cmd = [sys.executable, "-m", "mmoe_ds.cli", "export", str(run.dir), str(out)]
            done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise ExperimentError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        return out


def _folder_digest(path: Path) -> str:
    """Content digest of a model folder (file names, sizes and the config) for run hashes."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(path)}:{p.stat().st_size}".encode())
            if p.suffix == ".json":
                h.update(p.read_bytes())
    return h.hexdigest()


# -- what a run measured -------------------------------------------------------------------------
def routing_counts(run: Run, last_fraction: float = 0.2, key: str = "routed_per_expert") -> list[np.ndarray]:
    """Per MoE layer, the [modality, expert] route counts summed over the last `last_fraction` of the
    logged training windows (at least one) — the routing the run ended with, as trained."""
    records = run.train_records
    if not records:
        raise ExperimentError(f"{run.dir}/metrics.jsonl: no training records.")
    tail = records[-max(1, int(round(len(records) * last_fraction))):]
    return counts_of(tail, key)


def counts_of(records: Sequence[dict], key: str = "routed_per_expert") -> list[np.ndarray]:
    """Per MoE layer, [modality, expert] sums of `key` over training records' routing."""
    layers = len(records[0]["routing"])
    return [np.array([[sum(r["routing"][layer][m][key][e] for r in records)
                       for e in range(len(records[0]["routing"][layer][m][key]))] for m in MODALITIES], dtype=float)
            for layer in range(layers)]


def routing_summary(records: Sequence[dict]) -> dict[str, float]:
    """Routing measures of training records (one window or several), averaged over MoE layers.

    Returns: tv (0..1) and nmi (Miller-Madow I(M;E)/H(M)) of the routes chosen; per modality m:
    drop_{m} (share of m's routes dropped by capacity), eff_{m} (effective experts exp H(E|m)),
    share_{m} (m's share of the expert compute actually spent, i.e. of kept routes), entropy_{m}
    (mean per-token router entropy, nats: lower = more confident); and tv_L{i} / nmi_L{i} per layer.
    """
    from mmoe_ds.analysis.metrics import effective_experts, nmi, total_variation

    routed, kept = counts_of(records, "routed_per_expert"), counts_of(records, "kept_per_expert")
    out: dict[str, float] = {}
    tvs, nmis = [], []
    for i, (r, k) in enumerate(zip(routed, kept)):
        p = r / np.maximum(r.sum(1, keepdims=True), 1)
        tvs.append(total_variation(p[0], p[1]) if (r.sum(1) > 0).all() else float("nan"))
        nmis.append(nmi(r, miller_madow=True) if (r.sum(1) > 0).all() else float("nan"))
        out[f"tv_L{i}"], out[f"nmi_L{i}"] = tvs[-1], nmis[-1]
    out["tv"], out["nmi"] = float(np.mean(tvs)), float(np.mean(nmis))
    total_kept = sum(k.sum() for k in kept)
    for j, m in enumerate(MODALITIES):
        r_m = sum(r[j].sum() for r in routed)
        k_m = sum(k[j].sum() for k in kept)
        out[f"drop_{m}"] = float(1 - k_m / r_m) if r_m else float("nan")
        out[f"share_{m}"] = float(k_m / total_kept) if total_kept else float("nan")
        out[f"eff_{m}"] = float(np.mean([effective_experts(r[j] / r[j].sum()) for r in routed if r[j].sum() > 0]))
        tokens = sum(rec["routing"][layer][m]["tokens"] for rec in records for layer in range(len(routed)))
        ent = sum(rec["routing"][layer][m]["entropy"] * rec["routing"][layer][m]["tokens"]
                  for rec in records for layer in range(len(routed)))
        out[f"entropy_{m}"] = float(ent / tokens) if tokens else float("nan")
    return out


def run_metrics(run: Run, last_fraction: float = 0.2) -> dict[str, float]:
    """Final evaluation (caption_rank_acc, caption_loss, text_ppl, retrieval_r1 when measured) and the
    routing summary of the last `last_fraction` of training windows."""
    records = run.train_records
    tail = records[-max(1, int(round(len(records) * last_fraction))):]
    final = run.final_eval()
    out = {k: float(final[k]) for k in ("caption_rank_acc", "caption_loss", "text_ppl", "retrieval_r1") if k in final}
    out.update(chance_levels(run))
    out.update(routing_summary(tail))
    return out


def vocab_size(data_dir: str | os.PathLike) -> int:
    """Tokens of a prepared dataset's tokenizer (its processor/tokenizer.json: vocabulary + added tokens)."""
    tok = json.loads((Path(data_dir) / "processor" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    return len(vocab) + sum(1 for t in tok.get("added_tokens", []) if t["content"] not in vocab)


def chance_levels(run: Run) -> dict[str, float]:
    """The chance level of each quality readout of `run`'s final evaluation, as chance_<metric>:
    caption ranking: 1 / classes (the evaluator's caption_rank_chance); retrieval R@1: 1 / candidates;
    caption loss: ln V and text perplexity: V (a uniform guess over the V tokens)."""
    final = run.final_eval()
    out = {}
    if "caption_rank_chance" in final:
        out["chance_caption_rank_acc"] = float(final["caption_rank_chance"])
    if final.get("retrieval_candidates"):
        out["chance_retrieval_r1"] = 1.0 / float(final["retrieval_candidates"])
    data_dir = run.recipe.get("data", {}).get("dir")
    if data_dir and (Path(data_dir) / "processor" / "tokenizer.json").exists():
        v = vocab_size(data_dir)
        out["chance_caption_loss"], out["chance_text_ppl"] = float(np.log(v)), float(v)
    return out


# Quality readouts: metric -> (higher is, name); their chance levels are run_metrics' chance_<metric>.
QUALITY = {"caption_loss": ("worse", "caption loss"), "caption_rank_acc": ("better", "caption ranking accuracy"),
           "retrieval_r1": ("better", "retrieval R@1"), "text_ppl": ("worse", "text perplexity")}


# -- summaries over seeds ------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict:
    """{"mean", "ci95" (half-width of the 95% t interval; None for one seed), "n", "values"}."""
    from mmoe_ds.analysis.metrics import mean_ci95

    vals = [float(v) for v in values]
    if not vals:
        raise ExperimentError("summarize: no values.")
    if len(vals) == 1 or any(np.isnan(vals)):
        return {"mean": float(np.mean(vals)), "ci95": None, "n": len(vals), "values": vals}
    s = mean_ci95(vals)
    return {"mean": s.mean, "ci95": s.half_width, "n": s.n, "values": vals}


ALPHA = 0.05  # two-sided level of every interval and test
POWER = 0.8  # the power at which the smallest detectable difference is stated


def paired_t(diffs: Sequence[float]) -> dict:
    """Paired t statistics of per-seed differences: {"p" (two-sided), "sd", "mdd"}; mdd is the smallest
    true mean difference a two-sided paired t-test at ALPHA detects with POWER at this n and the
    observed SD: (t_{1-α/2, n-1} + t_{POWER, n-1}) · sd / √n (None below 2 seeds)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    n = d.size
    if n < 2 or not np.all(np.isfinite(d)):
        return {"p": None, "sd": None, "mdd": None}
    sd = float(d.std(ddof=1))
    t_a, t_b = stats.t.ppf(1 - ALPHA / 2, n - 1), stats.t.ppf(POWER, n - 1)
    if sd == 0:
        p = 1.0 if d.mean() == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(d.mean()) / (sd / np.sqrt(n)), n - 1))
    return {"p": p, "sd": sd, "mdd": float((t_a + t_b) * sd / np.sqrt(n))}


def welch_half_width(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Half-width of the unpaired (Welch) 95% interval of mean(a) - mean(b): what the same seeds would
    give without pairing, shown beside the paired one (pairing pays when it is much smaller)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or b.size < 2:
        return None
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = np.sqrt(va + vb)
    if se == 0:
        return 0.0
    dof = se ** 4 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return float(stats.t.ppf(1 - ALPHA / 2, dof) * se)


def contrast(name: str, metric: str, a_label: str, a: Mapping[int, float], b_label: str, b: Mapping[int, float],
             higher_is: str = "better", chance: float | None = None, primary: bool = False,
             target_half_width: float | None = None) -> dict:
    """A comparison paired by seed: per-seed differences a[s] - b[s], summarized with a 95% CI.

    Args:
        name: what is compared, said in the docs.
        metric: the metric's name.
        a_label, b_label: the two arms; a, b: {seed: value}; both arms must have the same seeds.
        higher_is: "better", "worse" or "neutral" (how the docs phrase a difference).
        chance: the metric's chance level (quality readouts): the docs say "cannot tell" when an arm
            is not above it.
        primary: the experiment's one pre-declared contrast (judged by its CI; the others are judged
            after Holm's correction, `holm`).
        target_half_width: for the primary contrast, the half-width its seeds were chosen to reach.
    """
    if set(a) != set(b):
        raise ExperimentError(f"contrast {name}: seeds {sorted(a)} vs {sorted(b)}; pair them by seed.")
    seeds = sorted(a)
    va, vb = [float(a[s]) for s in seeds], [float(b[s]) for s in seeds]
    diffs = [x - y for x, y in zip(va, vb)]
    return {"name": name, "metric": metric, "a": a_label, "b": b_label, "higher_is": higher_is, "seeds": seeds,
            "a_summary": summarize(va), "b_summary": summarize(vb), "diff": summarize(diffs),
            "test": paired_t(diffs), "unpaired_ci95": welch_half_width(va, vb), "chance": chance,
            "primary": primary, "target_half_width": target_half_width}


def holm(contrasts: list[dict]) -> list[dict]:
    """Holm's step-down adjustment of the paired-t p-values of the non-primary contrasts (in place,
    as test["p_holm"]); the primary contrast keeps its own level. Returns `contrasts`."""
    rest = [c for c in contrasts if not c.get("primary") and c["test"]["p"] is not None]
    order = sorted(rest, key=lambda c: c["test"]["p"])
    running = 0.0
    for i, c in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * c["test"]["p"]))
        c["test"]["p_holm"] = running
    return contrasts


def by_seed(seeds: Sequence[int], values: Sequence[float]) -> dict[int, float]:
    """{seed: value} from two parallel sequences."""
    if len(seeds) != len(values):
        raise ExperimentError(f"by_seed: {len(seeds)} seeds for {len(values)} values.")
    return {int(s): float(v) for s, v in zip(seeds, values)}


def write_results(out: Path, results: dict, markdown: str) -> None:
    """results.json and results.md in `out`, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=_json_default) + "\n")
    atomic_write_text(out / "results.md", markdown)


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save_figure(fig, path: Path) -> str:
    """Save a matplotlib figure atomically as PNG; returns the file name."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path.name


def bar_panel(ax, labels: Sequence[str], summaries: Sequence[dict], ylabel: str, colors=None) -> None:
    """Bars of means with 95% CI error bars (none for a single seed) and the per-seed values as dots."""
    x = np.arange(len(labels))
    means = [s["mean"] for s in summaries]
    errs = [s["ci95"] or 0.0 for s in summaries]
    ax.bar(x, means, yerr=errs, capsize=3, color=colors or "#4c72b0", alpha=0.85)
    for i, s in enumerate(summaries):
        ax.plot([i] * len(s["values"]), s["values"], "k.", ms=3)
    ax.set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(ylabel, fontsize=8)


def new_figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.4):
    """A matplotlib figure (Agg backend) with an nrows x ncols grid of axes (always 2-D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def experiment_command(exp_id: str, seeds: Sequence[int], scale: Scale) -> str:
    """The command line that reproduces an experiment."""
    procs = f" --procs {scale.procs}" if scale.name == "gpu" else ""
    return f"python -m mmoe_ds.experiments {exp_id} --seeds {','.join(map(str, seeds))} --scale {scale.name}{procs}"


def seeds_for(runner: "Runner", part: str, seeds: list[int]) -> list[int]:
    """The first `scale.seed_counts[part]` of `seeds` (all of them when the scale does not limit `part`)."""
    n = runner.scale.seed_counts.get(part)
    return list(seeds[:n]) if n else list(seeds)
