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

The recipes are read from a root folder (`Scale.root`, the CLI's --root: an mmoe-ds source checkout,
by default the current directory) and the runs go wherever `out` says, so the package works
installed as well as from the checkout. What a run measured is read by `measure`; the statistics are
in `stats`; results.md and the figures are rendered from results.json by `render` and `plots`.
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
from typing import Any, Sequence

import numpy as np

from mmoe_ds.config.launch_env import free_port
from mmoe_ds.data.manifest import has_manifest, manifest_path
from mmoe_ds.errors import ExperimentError
from mmoe_ds.io.atomic import atomic_write_text

SCALES = ("tiny", "cpu", "gpu")
# Where the experiments' recipes are, relative to the root (a source checkout, `--root`).
MODES = Path("recipes") / "modes"  # the routing recipes every run starts from
SCALES_DIR = Path("recipes") / "experiments"  # one <scale>.json per scale


def check_root(root: str | os.PathLike) -> Path:
    """`root`, resolved, when it holds the experiments' recipes (recipes/modes/ and recipes/experiments/);
    else an ExperimentError that says so in one line and names --root."""
    root = Path(root).resolve()
    missing = [f"{d}/" for d in (MODES, SCALES_DIR) if not (root / d).is_dir()]
    if missing:
        raise ExperimentError(f"--root {root}: no {' and no '.join(missing)} there; the experiments read their "
                              "recipes from an mmoe-ds source checkout: run from it or pass --root CHECKOUT "
                              "(results go to --out).")
    return root


def package_root() -> Path:
    """The folder the running mmoe_ds package is imported from: put on the launched trainer's PYTHONPATH so
    that it runs the same code (an installed package or a source tree), whatever the root."""
    import mmoe_ds

    return Path(mmoe_ds.__file__).resolve().parent.parent


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
        ds_config: DeepSpeed config, relative to `root`.
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
        root: the source checkout the scale was read from (absolute): the routing recipes and the
            DeepSpeed config are read there, and runs are launched from it.
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
    root: Path = field(default_factory=Path.cwd)

    @classmethod
    def load(cls, name: str, procs: int | None = None, root: str | os.PathLike = ".") -> "Scale":
        """Read `root`/recipes/experiments/<name>.json (`check_root`); `procs` (e.g. the GPU count) replaces
        its process count."""
        if name not in SCALES:
            raise ExperimentError(f"--scale {name!r}: choose one of {list(SCALES)}.")
        root = check_root(root)
        raw = json.loads((root / SCALES_DIR / f"{name}.json").read_text())
        scale = cls(name=name, procs=int(procs or raw["procs"]), parallel=int(raw["parallel"]),
                    ds_config=raw["ds_config"], overrides=raw["overrides"], prepare=raw["prepare"],
                    finetune_fraction=float(raw.get("finetune_fraction", 0.5)), description=raw.get("description", ""),
                    sizes=dict(raw.get("sizes", {})),
                    seed_counts={k: int(v) for k, v in raw.get("seed_counts", {}).items()},
                    dataset_overrides=dict(raw.get("dataset_overrides", {})), root=root)
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

    base: str  # path of a recipe JSON, relative to the scale's root (e.g. recipes/modes/agnostic.json)
    seed: int
    overrides: dict = field(default_factory=dict)
    dataset: str = "embedded"
    label: str = ""

    def key(self) -> str:
        return json.dumps([self.base, self.seed, self.overrides, self.dataset], sort_keys=True)


def mode_recipe(name: str) -> str:
    """recipes/modes/<name>.json, relative to the root (a RunSpec's base; `Runner.base_recipe` reads it)."""
    return str(MODES / f"{name}.json")


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
            raise ExperimentError(f"recipes/experiments/{self.scale.name}.json: no 'prepare' entry for dataset "
                                  f"{name!r}.")
        path = self.out / "_data" / f"{self.scale.name}-{name}"
        if not has_manifest(path):
            from mmoe_ds.data.prepare import main as prepare

            self.log(f"preparing dataset {name} -> {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            if prepare(list(self.scale.prepare[name]) + ["--out", str(path)]) != 0:
                raise ExperimentError(f"mmoe-ds prepare {' '.join(self.scale.prepare[name])} --out {path} failed "
                                      f"(its message is above).")
        return path

    # -- recipes -----------------------------------------------------------------------------------
    def modes(self) -> list[str]:
        """The routing recipes of the root (recipes/modes/*.json stems), sorted."""
        return sorted(p.stem for p in (self.scale.root / MODES).glob("*.json"))

    def base_recipe(self, base: str) -> dict:
        """The recipe JSON at `base` (relative to the scale's root), checked to exist."""
        path = self.scale.root / base
        if not path.is_file():
            raise ExperimentError(f"{path}: no such routing recipe; choose one of {self.modes()}.")
        return json.loads(path.read_text())

    def recipe(self, spec: RunSpec) -> dict:
        """The effective recipe of `spec` (without output_dir): base, then the scale, then the spec's overrides."""
        base = self.base_recipe(spec.base)
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
        identity["data"]["dir"] = hashlib.sha256(manifest_path(data_dir).read_bytes()).hexdigest()
        identity["train"].pop("output_dir", None)
        init = identity["train"].get("init_from")
        if init:
            identity["train"]["init_from"] = _folder_digest(Path(init))
        ds = json.loads((self.scale.root / self.scale.ds_config).read_text())
        blob = json.dumps({"recipe": identity, "ds_config": ds, "procs": self.scale.procs}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "_runs" / self.run_hash(self.recipe(spec))

    # -- launching ---------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The launched processes' environment: one thread each, this mmoe_ds package first on PYTHONPATH."""
        path = os.pathsep.join(p for p in (str(package_root()), os.environ.get("PYTHONPATH")) if p)
        return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)

    def _launch(self, spec: RunSpec) -> Run:
        recipe = self.recipe(spec)
        folder = self.out / "_runs" / self.run_hash(recipe)
        if not (folder / "done.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            recipe["train"]["output_dir"] = str(folder.resolve())
            recipe_path = folder / "recipe.json"
            atomic_write_text(recipe_path, json.dumps(recipe, indent=1) + "\n")
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(self.scale.procs),
                   "--master_port", str(free_port()), "--module", "mmoe_ds.train",
                   "--recipe", str(recipe_path.resolve()),
                   "--deepspeed_config", str(self.scale.root / self.scale.ds_config)]
            self.log(f"train {spec.label or Path(spec.base).stem} seed {spec.seed} -> {folder}")
            tic = time.perf_counter()
            with open(folder / "launch.log", "ab") as log:
                rc = subprocess.run(cmd, cwd=self.scale.root, env=self.env(), stdout=log,
                                    stderr=subprocess.STDOUT).returncode
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
            done = subprocess.run(cmd, cwd=self.scale.root, env=self.env(), capture_output=True, text=True)
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


def write_results(out: Path, results: dict) -> Path:
    """`out`/results.json, atomically (numpy scalars and arrays as JSON numbers and lists); returns its path.
    The experiment's results.md and figures are rendered from this file (`render.render_folder`)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    atomic_write_text(path, json.dumps(results, indent=1, default=_json_default) + "\n")
    return path


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def experiment_command(exp_id: str, seeds: Sequence[int], scale: Scale) -> str:
    """The command line that reproduces an experiment."""
    procs = f" --procs {scale.procs}" if scale.name == "gpu" else ""
    return f"python -m mmoe_ds.experiments {exp_id} --seeds {','.join(map(str, seeds))} --scale {scale.name}{procs}"


def seeds_for(runner: "Runner", part: str, seeds: list[int]) -> list[int]:
    """The first `scale.seed_counts[part]` of `seeds` (all of them when the scale does not limit `part`)."""
    n = runner.scale.seed_counts.get(part)
    return list(seeds[:n]) if n else list(seeds)
