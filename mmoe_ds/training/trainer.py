"""The training loop: `Trainer.setup` builds the DeepSpeed engine, the loader and the metrics writer
and resumes; `Trainer.train` runs to `train.steps`, logging, checkpointing and evaluating on schedule.

Resumes from `<output_dir>/checkpoints/latest` if present; otherwise starts from `train.init_from`
(an HF folder written by `mmoe-ds export` or `mmoe-ds upcycle`) when set, else from a fresh
initialisation. `train.freeze` / `train.reinit` choose what trains (mmoe_ds/training/init_from.py).

At a step that both checkpoints and evaluates, the checkpoint is written first (the evaluation's
metrics are added to its meta.json afterwards), and a failed evaluation is logged and recorded
(`"kind": "eval_error"` in metrics.jsonl) by every rank alike: training goes on, and an
evaluation error never costs a checkpoint (see `Trainer.evaluate` for how ranks stay in step).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from ..config.recipe import Recipe
from ..data.skips import SkipLog
from ..errors import ConfigError
from ..io.atomic import atomic_write_text
from . import checkpoint
from .checks import check_processor_fits, init_model_kwargs
from .data_plan import check_data
from .metrics_writer import MetricsWriter


def bind_moe_layers(model) -> None:
    """Give each router its own layer's config (per-layer matched-utilization targets; a no-op otherwise).
    Routers are numbered in module order, which is layer order."""
    from ..moe.router import ModalityRouter

    routers = [m for m in model.modules() if isinstance(m, ModalityRouter)]
    for i, router in enumerate(routers):
        router.cfg = router.cfg.for_moe_layer(i, len(routers))

def optimizer_groups(model, trainable: list, param_groups: list[dict], ds_config: dict, ep_rank: int, ep_size: int,
                     local_experts: int) -> list:
    """What `deepspeed.initialize` gets as model_parameters: the trainable parameters, or with
    `train.param_groups` one group per entry at lr × its multiplier (DeepSpeed's schedulers scale each
    group's own lr, and its MoE split keeps a group's keys) plus the rest at the config's lr."""
    if not param_groups:
        return trainable
    from .init_from import all_ranks_names, global_names, match

    lr = (ds_config.get("optimizer") or {}).get("params", {}).get("lr")
    if lr is None:
        raise ConfigError("train.param_groups needs the DeepSpeed config's optimizer.params.lr (the base rate the "
                          "multipliers scale); set it there or remove train.param_groups.")
    names = global_names(model, ep_rank, local_experts)
    everything = all_ranks_names(model, ep_size, local_experts)
    ids = {id(p) for p in trainable}
    taken: dict[str, int] = {}
    groups = []
    for i, g in enumerate(param_groups):
        picked = [n for n in match(names, g["params"], f"train.param_groups[{i}].params", everything)
                  if id(names[n]) in ids]
        for n in picked:
            if n in taken:
                raise ConfigError(f"train.param_groups[{i}] and [{taken[n]}] both match {n}; a parameter belongs to "
                                  f"one group: narrow the patterns.")
            taken[n] = i
        groups.append({"params": [names[n] for n in picked], "name": f"param_group_{i}",
                       "lr": float(lr) * float(g["lr_multiplier"])})
    rest = [p for n, p in names.items() if n not in taken and id(p) in ids]
    return [{"params": rest, "name": "dense-params"}] + [g for g in groups if g["params"]]

class Trainer:
    def __init__(self, recipe: Recipe, ds_config: dict, world_size: int):
        self.recipe, self.ds_config, self.world_size = recipe, ds_config, world_size
        self.out = Path(recipe.train.output_dir)
        self.rank = int(os.environ.get("RANK", 0))

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed
        import torch.distributed as dist

        from ..model import MmoeConfig, MmoeForCausalLM
        from .data_plan import ensure_dataset, load_processor, make_train_loader
        from .init_from import freeze, load_init_weights, read_init_source, trainable_parameters

        # DeepSpeed's ZeRO step all-gathers through `all_gather_into_tensor`, which torch 2.13 deprecates
        # with a FutureWarning on every call: two lines per step in every log. Silence exactly that one.
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

        self.dist = dist
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op, 30 s JIT build
        if on_gpu:  # before NCCL initialises, so each process talks from its own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        self.rank = dist.get_rank()
        r, t = self.recipe, self.recipe.train
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            ensure_dataset(r.data)
        dist.barrier()
        data_check = check_data(r.data, self.world_size)  # again: the data may have been built just now
        if not data_check.ok:
            raise ConfigError(f"{r.path}: " + "; ".join(data_check.problems))
        self.eval_plan = data_check.plan
        source = read_init_source(t.init_from) if t.init_from else None
        self.processor = load_processor(r.data, source.path if source is not None and source.has_processor else None)
        self.processor_dir = self.save_run_processor() if source is not None else Path(r.data.dir, "processor")
        torch.manual_seed(t.seed)  # identical dense init on every rank; experts are seeded by global id
        self.model_config = MmoeConfig(**self.model_kwargs(source), moe_backend="deepspeed",
                                       ep_size=t.expert_parallel_size)
        if source is not None:
            check_processor_fits(self.processor, self.model_config, source)
        model = MmoeForCausalLM(self.model_config)
        bind_moe_layers(model)
        ep = t.expert_parallel_size
        ep_rank, local_experts = self.rank % ep, self.model_config.num_local_experts // ep
        if source is not None and checkpoint.latest_tag(checkpoint.checkpoint_dir(self.out)) is None:
            self.log(load_init_weights(model, source, ep_rank, ep, t.reinit).summary(source.path))
        elif source is not None:  # the run's own checkpoint is loaded below and takes precedence
            self.log(f"a checkpoint of this run exists: resuming from it, not from train.init_from={source.path}")
        frozen = freeze(model, t.freeze, ep_rank, ep, local_experts)
        trainable = trainable_parameters(model)
        if not trainable:
            raise ConfigError(f"{r.path}: train.freeze (and model.freeze_vision_tower) leave no parameter to train; "
                              f"narrow the patterns.")
        if len(trainable) < len(list(model.parameters())):
            self.log(f"training {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,} "
                     f"parameters on rank 0 ({len(frozen)} tensors frozen by train.freeze)")
        # Frozen parameters stay out of the optimizer: no state, no update (DeepSpeed's ZeRO 1/2 and its
        # expert / non-expert groups only see these).
        groups = optimizer_groups(model, trainable, t.param_groups, self.ds_config, ep_rank, ep, local_experts)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=self.ds_config)
        self.device = self.engine.device
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", enabled=self.rank == 0,
                                     monitor=getattr(self.engine, "monitor", None))
        self.loader = make_train_loader(r.data, self.processor, self.rank, self.world_size, t.seed)
        self.start_step = 0
        torch.manual_seed(t.seed * 1000 + self.rank)  # per-rank stream (router jitter, random drops)
        resumed = checkpoint.resume(self.engine, str(self.out), t.expert_parallel_size, self.world_size)
        if resumed is not None:
            meta, rank_state = resumed
            self.start_step = meta["step"]
            if rank_state is not None:
                self.loader.load_state_dict(rank_state["loader"])
                checkpoint.set_rng_state(rank_state["rng"])
            self.log(f"resumed from step {self.start_step} (written at ep_size={meta['ep_size']})")
        self.metrics.restart(self.start_step)  # a restart without a checkpoint starts metrics.jsonl anew

    def model_kwargs(self, source) -> dict:
        """MmoeConfig arguments: the init_from folder's (with the recipe's overrides), or the recipe's
        model section with the processor's vocabulary, special tokens and image geometry."""
        if source is not None:
            return init_model_kwargs(self.recipe, source)
        from .data_plan import processor_model_kwargs

        return processor_model_kwargs(self.recipe.model, self.processor)

    def save_run_processor(self) -> Path:
        """Save the processor this run encodes with to OUT/processor (rank 0, whole or not at all), so
        that exports of the run carry it. Collective."""
        from ..io.atomic import staged_directory

        target = self.out / "processor"
        if self.rank == 0:
            with staged_directory(target) as tmp:
                self.processor.save_pretrained(tmp)
        self.dist.barrier()
        return target

    # -- logging ---------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[mmoe-ds] {message}", flush=True)

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Collective: element-wise sums of a fixed-length vector over all ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return t.tolist()

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        return [v / self.world_size for v in self.sum_over_ranks(values)]

    def skip_counts(self) -> dict[str, int]:
        """Collective: the distinct bad samples and damaged shards met by all ranks' loaders.

        The ranks' skip records are gathered and merged, not their counts summed: a damaged shard
        that several ranks read (sample-level slots) is one damaged shard, not one per rank."""
        states = [None] * self.world_size
        self.dist.all_gather_object(states, self.loader.skip_log().state())
        return SkipLog.merged(states).counts()

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, evaluator, step: int) -> dict | None:
        """Collective: run `evaluator` (prepare / forward / finish, see mmoe_ds.evaluate) at `step`.

        Every rank takes the same branches: after the local `prepare` the ranks agree whether any
        failed before running forward passes (whose all-to-alls need every rank); the forward
        sums travel with a failure flag in one fixed-length all_reduce. Evaluation runs under its
        own RNG so that it does not change training's random stream (exact resume either side).

        Returns:
            the metrics, or None when the evaluation failed on some rank (logged, recorded as
            `eval_error` in metrics.jsonl).
        """
        error = None
        with torch.random.fork_rng(devices=[self.device] if torch.cuda.is_available() else []):
            torch.manual_seed(self.recipe.train.seed * 1000 + 777 + self.rank)
            try:
                evaluator.prepare(step)
            except Exception as e:  # any failure is reported, not fatal
                error = e
            failed = self.sum_over_ranks([1.0 if error is not None else 0.0])[0]
            sums = None
            if not failed:
                try:
                    sums = evaluator.forward(step)
                except Exception as e:  # e.g. the same data error on every rank
                    error = e
            zeros = [0.0] * evaluator.num_sums  # the same length on every rank, whatever failed
            totals = self.sum_over_ranks([1.0 if error is not None else 0.0] + (sums if sums is not None else zeros))
            if totals[0] == 0:
                return evaluator.finish(totals[1:])
        failed_ranks = int(max(failed, totals[0]))
        if error is not None:
            print(f"[mmoe-ds] rank {self.rank}: evaluation at step {step} failed: {type(error).__name__}: {error}",
                  file=sys.stderr, flush=True)
        message = f"{type(error).__name__}: {error}" if error is not None else "on other ranks (see their stderr)"
        self.log(f"step {step}: evaluation failed on {failed_ranks} rank(s): {message}; training continues")
        self.metrics.write({"kind": "eval_error", "step": step, "failed_ranks": failed_ranks, "error": message[:500]})
        return None

    # -- loop ------------------------------------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        """The model's inputs of a loader batch (image patches, or pixel values for a vision tower)."""
        keep = ("input_ids", "attention_mask", "labels", "modality_ids", "pixel_patches", "pixel_values")
        return {k: batch[k].to(self.device) for k in keep if k in batch}

    def train(self, evaluator=None) -> dict:
        """Collective: train to `train.steps`, evaluating and checkpointing on schedule.

        Args:
            evaluator: the evaluation to run (prepare / forward / finish / write_report); by
                default an `Evaluator` of this run's evaluation plan.
        Returns:
            {"eval": the last successful evaluation's metrics, "report": routing report paths}.
        """
        from ..analysis.alarms import routing_alarms
        from ..moe.router import RoutingStats
        from .evaluate import Evaluator

        t = self.recipe.train
        evaluator = Evaluator(self, self.eval_plan) if evaluator is None else evaluator
        batches = iter(self.loader)
        gas = self.engine.gradient_accumulation_steps()
        progress = None
        if self.rank == 0 and t.progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=t.steps, initial=self.start_step, desc="train", dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0)
        moe_layers = [i for i in range(self.model_config.num_hidden_layers) if self.model_config.is_moe_layer(i)]
        window: list = []
        window_stats: list[RoutingStats] | None = None
        last_eval: dict = {}
        tic = time.perf_counter()
        for step in range(self.start_step + 1, t.steps + 1):
            for _ in range(gas):
                out = self.engine(**self.to_device(next(batches)))
                self.engine.backward(out.loss)
                self.engine.step()
                window.append([float(v.detach()) if v is not None else 0.0
                               for v in (out.loss, out.text_loss, out.aux_loss, out.image_loss)])
                stats = out.routing_stats
                window_stats = stats if window_stats is None else [RoutingStats.merge([a, b]) for a, b in zip(window_stats, stats)]
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{window[-1][0]:.3f}")
            if step % t.log_every == 0 or step == t.steps:
                means = self.mean_over_ranks([sum(c) / len(window) for c in zip(*window)])
                elapsed = time.perf_counter() - tic
                record = {"kind": "train", "step": step, "loss": means[0], "text_loss": means[1], "aux_loss": means[2],
                          "image_loss": means[3], "lr": self.engine.get_lr()[0],
                          "samples_per_s": len(window) * self.recipe.micro_batch_size * self.world_size / max(elapsed, 1e-9),
                          "skipped": self.skip_counts(),
                          "routing": [s.to_dict(self.model_config.router_config().modalities) for s in window_stats]}
                record.update(routing_alarms(record["routing"], moe_layers).fields())
                if record["alarm_total"]:
                    self.log(f"step {step}: {record['alarm_total']} routing alarm(s); first: {record['alarms'][0]['message']}")
                self.metrics.write(record)
                window, window_stats, tic = [], None, time.perf_counter()
            saved = step % t.checkpoint_every == 0 or step == t.steps
            if saved:  # before evaluating: an evaluation error must not cost this checkpoint
                tag = self.save_checkpoint(step, last_eval)
            if step % t.eval_every == 0 or step == t.steps:
                result = self.evaluate(evaluator, step)
                if result is not None:
                    last_eval = result
                    self.metrics.write(dict(result, kind="eval", step=step))
                    self.log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
                    if saved and self.rank == 0:
                        self.record_eval_in_checkpoint(tag, result)
        if progress is not None:
            progress.close()
        report = evaluator.write_report(self.out / "report")
        return {"eval": last_eval, "report": report}

    def save_checkpoint(self, step: int, metrics: dict) -> str:
        t = self.recipe.train
        meta = {"ep_size": t.expert_parallel_size, "world_size": self.world_size,
                "model_config": {k: v for k, v in self.model_config.to_dict().items()
                                 if k not in ("moe_backend", "ep_size", "transformers_version")},
                "processor_dir": str(self.processor_dir.resolve()),
                "report_dir": str((self.out / "report").resolve()), "recipe": self.recipe.to_dict(), "metrics": metrics}
        rank_state = {"loader": self.loader.state_dict(), "rng": checkpoint.rng_state()}
        tag = checkpoint.save(self.engine, str(self.out), step, meta, rank_state, t.keep_last)
        self.log(f"checkpoint {tag}")
        return tag

    def record_eval_in_checkpoint(self, tag: str, metrics: dict) -> None:
        """The evaluation of a checkpoint's own step, in its meta.json (the export's model card shows it)."""
        meta_path = checkpoint.checkpoint_dir(self.out) / tag / "meta.json"
        meta = json.loads(meta_path.read_text())
        atomic_write_text(meta_path, json.dumps(dict(meta, metrics=metrics), indent=1))
