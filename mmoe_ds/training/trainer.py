"""The training loop and how its parts are built.

`Trainer` runs to `train.steps` over parts it is given (an engine, a loader, an evaluator, a
checkpointer, a metrics writer, a dist-like object for the collectives), logging, checkpointing
and evaluating on schedule: its logic runs in one process with small fakes (tests/test_trainer_unit.py).
`build_trainer` builds the real parts (DeepSpeed engine, the recipe's loader, `Evaluator`,
`Checkpointer`, `MetricsWriter`) and resumes.

Resumes from `<output_dir>/checkpoints/latest` if present; otherwise starts from `train.init_from`
(an HF folder written by `mmoe-ds export` or `mmoe-ds upcycle`) when set, else from a fresh
initialisation. `train.freeze` / `train.reinit` choose what trains (mmoe_ds/training/init_from.py).

At a step that both checkpoints and evaluates, the checkpoint is written first (the evaluation's
metrics are added to its meta.json afterwards), and a failed evaluation is logged and recorded
(`"kind": "eval_error"` in metrics.jsonl) by every rank alike: training goes on, and an
evaluation error never costs a checkpoint (see `Trainer.evaluate` for how ranks stay in step).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from time import perf_counter
from typing import Callable

import torch

from ..config.recipe import Recipe
from ..data.skips import SkipLog
from ..errors import ConfigError
from .checkpoint import Checkpointer, checkpoint_dir, latest_tag
from .checks import check_processor_fits, init_model_kwargs
from .data_plan import check_data
from .evaluate import Evaluator, model_inputs
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


def model_kwargs(recipe: Recipe, processor, source) -> dict:
    """MmoeConfig arguments: the init_from folder's (with the recipe's overrides) when `source` is an
    InitSource, else the recipe's model section with the processor's vocabulary, special tokens and
    image geometry."""
    if source is not None:
        return init_model_kwargs(recipe, source)
    from .data_plan import processor_model_kwargs

    return processor_model_kwargs(recipe.model, processor)


def rank0_log(rank: int) -> Callable[[str], None]:
    """The run's log: `[mmoe-ds] message` on rank 0's stdout, nothing elsewhere."""
    def log(message: str) -> None:
        if rank == 0:
            print(f"[mmoe-ds] {message}", flush=True)
    return log


def save_run_processor(processor, out: Path, rank: int, dist) -> Path:
    """Save the processor this run encodes with to OUT/processor (rank 0, whole or not at all), so
    that exports of the run carry it. Collective."""
    from ..io.atomic import staged_directory

    target = out / "processor"
    if rank == 0:
        with staged_directory(target) as tmp:
            processor.save_pretrained(tmp)
    dist.barrier()
    return target


def checkpoint_meta(recipe: Recipe, model_config, world_size: int, processor_dir: Path, out: Path) -> dict:
    """What each checkpoint's meta.json records about the run (besides step, tag, files and metrics)."""
    return {"ep_size": recipe.train.expert_parallel_size, "world_size": world_size,
            "model_config": {k: v for k, v in model_config.to_dict().items()
                             if k not in ("moe_backend", "ep_size", "transformers_version")},
            "processor_dir": str(processor_dir.resolve()), "report_dir": str((out / "report").resolve()),
            "recipe": recipe.to_dict()}


def skip_counts(loader, dist, world_size: int) -> dict[str, int]:
    """Collective: the distinct bad samples and damaged shards met by all ranks' loaders.

    The ranks' skip records are gathered and merged, not their counts summed: a damaged shard
    that several ranks read (sample-level slots) is one damaged shard, not one per rank."""
    states = [None] * world_size
    dist.all_gather_object(states, loader.skip_log().state())
    return SkipLog.merged(states).counts()


def init_distributed() -> int:
    """torch.distributed through DeepSpeed (NCCL on GPUs, each process on its LOCAL_RANK's; gloo on
    CPUs); returns this process's rank."""
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed's ZeRO step all-gathers through `all_gather_into_tensor`, which torch 2.13 deprecates
    # with a FutureWarning on every call: two lines per step in every log. Silence exactly that one.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op, 30 s JIT build
    if on_gpu:  # before NCCL initialises, so each process talks from its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    return dist.get_rank()


def build_model(recipe: Recipe, ds_config: dict, processor, source, rank: int, out: Path,
                log: Callable[[str], None]) -> tuple:
    """The run's model before DeepSpeed wraps it: config (from `source`, an InitSource, or the recipe
    and processor), the seeded initialisation, `source`'s weights unless the run has a checkpoint of
    its own, `train.freeze`. Returns (model_config, model, what `deepspeed.initialize` gets as
    model_parameters). Raises ConfigError when nothing is left to train or the processor does not fit."""
    from ..model import MmoeConfig, MmoeForCausalLM
    from .init_from import freeze, load_init_weights, trainable_parameters

    t = recipe.train
    torch.manual_seed(t.seed)  # identical dense init on every rank; experts are seeded by global id
    model_config = MmoeConfig(**model_kwargs(recipe, processor, source), moe_backend="deepspeed",
                              ep_size=t.expert_parallel_size)
    if source is not None:
        check_processor_fits(processor, model_config, source)
    model = MmoeForCausalLM(model_config)
    bind_moe_layers(model)
    ep = t.expert_parallel_size
    ep_rank, local_experts = rank % ep, model_config.num_local_experts // ep
    if source is not None and latest_tag(checkpoint_dir(out)) is None:
        log(load_init_weights(model, source, ep_rank, ep, t.reinit).summary(source.path))
    elif source is not None:  # the run's own checkpoint is loaded later and takes precedence
        log(f"a checkpoint of this run exists: resuming from it, not from train.init_from={source.path}")
    frozen = freeze(model, t.freeze, ep_rank, ep, local_experts)
    trainable = trainable_parameters(model)
    if not trainable:
        raise ConfigError(f"{recipe.path}: train.freeze (and model.freeze_vision_tower) leave no parameter to train; "
                          f"narrow the patterns.")
    if len(trainable) < len(list(model.parameters())):
        n_trainable, n_all = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
        log(f"training {n_trainable:,} of {n_all:,} parameters on rank 0 ({len(frozen)} tensors frozen by "
            f"train.freeze)")
    # Frozen parameters stay out of the optimizer: no state, no update (DeepSpeed's ZeRO 1/2 and its
    # expert / non-expert groups only see these).
    groups = optimizer_groups(model, trainable, t.param_groups, ds_config, ep_rank, ep, local_experts)
    return model_config, model, groups


def build_trainer(recipe: Recipe, ds_config: dict, world_size: int,
                  evaluator_factory: Callable[..., Evaluator] = Evaluator) -> "Trainer":
    """Collective: initialise torch.distributed through DeepSpeed, check the data, build the processor,
    the model (`build_model`), the DeepSpeed engine, the loader, the evaluator (`evaluator_factory`,
    called as `Evaluator` is), the checkpointer and the metrics writer, resume from the run's latest
    checkpoint, and return the `Trainer` of these parts.

    Raises: ConfigError when the data (built just now if missing) or the model does not fit the recipe.
    """
    import deepspeed
    import torch.distributed as dist

    from .data_plan import ensure_dataset, load_processor, make_train_loader
    from .init_from import read_init_source

    rank = init_distributed()
    log = rank0_log(rank)
    r, t = recipe, recipe.train
    out = Path(t.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ensure_dataset(r.data)
    dist.barrier()
    data_check = check_data(r.data, world_size)  # again: the data may have been built just now
    if not data_check.ok:
        raise ConfigError(f"{r.path}: " + "; ".join(data_check.problems))
    source = read_init_source(t.init_from) if t.init_from else None
    processor = load_processor(r.data, source.path if source is not None and source.has_processor else None)
    processor_dir = save_run_processor(processor, out, rank, dist) if source is not None \
        else Path(r.data.dir, "processor")
    model_config, model, groups = build_model(recipe, ds_config, processor, source, rank, out, log)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    metrics = MetricsWriter(out / "metrics.jsonl", enabled=rank == 0, monitor=getattr(engine, "monitor", None))
    loader = make_train_loader(r.data, processor, rank, world_size, t.seed)
    checkpointer = Checkpointer(engine, out, checkpoint_meta(recipe, model_config, world_size, processor_dir, out),
                                loader, t.keep_last)
    start_step = 0
    torch.manual_seed(t.seed * 1000 + rank)  # per-rank stream (router jitter, random drops)
    resumed = checkpointer.resume()  # the loader's position and the RNG states too
    if resumed is not None:
        start_step = resumed["step"]
        restarted = resumed.get("optimizer_restarted")
        log(f"resumed from step {start_step} (written at ep_size={resumed['ep_size']})"
            + (f"; weights only, the optimizer state starts afresh ({restarted})" if restarted else ""))
    metrics.restart(start_step)  # a restart without a checkpoint starts metrics.jsonl anew
    evaluator = evaluator_factory(engine, processor, r.data, data_check.plan, seed=t.seed, rank=rank,
                                  world_size=world_size, dist=dist, device=engine.device, run_name=Path(r.path).name,
                                  log=log)
    return Trainer(recipe, world_size=world_size, rank=rank, dist=dist, engine=engine, loader=loader,
                   evaluator=evaluator, checkpointer=checkpointer, metrics=metrics, model_config=model_config,
                   out=out, start_step=start_step, log=log)


class Trainer:
    """Collective: the training loop over the parts it is given (`build_trainer` builds the real ones).

    Args:
        recipe: the run's recipe (`train.steps`, `log_every`, `checkpoint_every`, `eval_every`,
            `progress_bar`, `seed`; `micro_batch_size` for the throughput).
        world_size, rank: the processes and this one.
        dist: the collectives (`all_reduce`, `all_gather_object`, `barrier`), as `torch.distributed`.
        engine: forward (`engine(**batch)` -> loss, text_loss, aux_loss, image_loss, routing_stats),
            `backward`, `step`, `get_lr`, `gradient_accumulation_steps`, `device`: a DeepSpeed engine.
        loader: the training batches (iterable; `skip_log()` of what it skipped).
        evaluator: `prepare` / `forward` / `finish` / `write_report` and `num_sums` (`Evaluator`).
        checkpointer: `save(step, metrics) -> tag`, `record_eval(tag, metrics)` (`Checkpointer`).
        metrics: `write(record)` (`MetricsWriter`, enabled on rank 0).
        model_config: the `MmoeConfig` (which layers are MoE, the router's modalities).
        out: the run's folder (the routing report goes to `out/report`).
        start_step: the step the run resumes after (0: from the start).
        log: rank 0's log (default: `rank0_log(rank)`).
    """

    def __init__(self, recipe: Recipe, *, world_size: int, rank: int, dist, engine, loader, evaluator, checkpointer,
                 metrics: MetricsWriter, model_config, out: str | os.PathLike, start_step: int = 0,
                 log: Callable[[str], None] | None = None):
        self.recipe, self.world_size, self.rank, self.dist = recipe, world_size, rank, dist
        self.engine, self.loader, self.evaluator, self.checkpointer = engine, loader, evaluator, checkpointer
        self.metrics, self.model_config, self.out, self.start_step = metrics, model_config, Path(out), start_step
        self.log = log or rank0_log(rank)
        self.device = engine.device

    # -- collectives -------------------------------------------------------------------------------
    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Collective: element-wise sums of a fixed-length vector over all ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return t.tolist()

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        """Collective: element-wise means of a fixed-length vector over all ranks."""
        return [v / self.world_size for v in self.sum_over_ranks(values)]

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict | None:
        """Collective: run the evaluator (prepare / forward / finish, see mmoe_ds.training.evaluate) at `step`.

        Every rank takes the same branches: after the local `prepare` the ranks agree whether any
        failed before running forward passes (whose all-to-alls need every rank); the forward
        sums travel with a failure flag in one fixed-length all_reduce. Evaluation runs under its
        own RNG so that it does not change training's random stream (exact resume either side).

        Returns:
            the metrics, or None when the evaluation failed on some rank (logged, recorded as
            `eval_error` in metrics.jsonl).
        """
        evaluator, error = self.evaluator, None
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
        """The model's inputs of a loader batch, on the engine's device."""
        return model_inputs(batch, self.device)

    def train(self) -> dict:
        """Collective: train from `start_step` to `train.steps`, evaluating and checkpointing on schedule.

        Returns:
            {"eval": the last successful evaluation's metrics, "report": routing report paths}.
        """
        from ..analysis.alarms import routing_alarms
        from ..moe.router import RoutingStats

        t = self.recipe.train
        batches = iter(self.loader)
        gas = self.engine.gradient_accumulation_steps()
        progress = None
        if self.rank == 0 and t.progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=t.steps, initial=self.start_step, desc="train", dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0)
        moe_layers = [i for i in range(self.model_config.num_hidden_layers) if self.model_config.is_moe_layer(i)]
        modalities = self.model_config.router_config().modalities
        window: list = []
        window_stats: list[RoutingStats] | None = None
        last_eval: dict = {}
        tic = perf_counter()
        for step in range(self.start_step + 1, t.steps + 1):
            for _ in range(gas):
                out = self.engine(**self.to_device(next(batches)))
                self.engine.backward(out.loss)
                self.engine.step()
                window.append([float(v.detach()) if v is not None else 0.0
                               for v in (out.loss, out.text_loss, out.aux_loss, out.image_loss)])
                stats = out.routing_stats
                window_stats = stats if window_stats is None else [RoutingStats.merge([a, b])
                                                                   for a, b in zip(window_stats, stats)]
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{window[-1][0]:.3f}")
            if step % t.log_every == 0 or step == t.steps:
                means = self.mean_over_ranks([sum(c) / len(window) for c in zip(*window)])
                window_stats = RoutingStats.sum_over_ranks(window_stats, self.dist.all_reduce)  # the whole job's
                elapsed = perf_counter() - tic
                samples = len(window) * self.recipe.micro_batch_size * self.world_size
                record = {"kind": "train", "step": step, "loss": means[0], "text_loss": means[1], "aux_loss": means[2],
                          "image_loss": means[3], "lr": self.engine.get_lr()[0],
                          "samples_per_s": samples / max(elapsed, 1e-9),
                          "skipped": skip_counts(self.loader, self.dist, self.world_size),
                          "routing": [s.to_dict(modalities) for s in window_stats]}
                record.update(routing_alarms(record["routing"], moe_layers).fields())
                if record["alarm_total"]:
                    self.log(f"step {step}: {record['alarm_total']} routing alarm(s); first: "
                             f"{record['alarms'][0]['message']}")
                self.metrics.write(record)
                window, window_stats, tic = [], None, perf_counter()
            saved = step % t.checkpoint_every == 0 or step == t.steps
            if saved:  # before evaluating: an evaluation error must not cost this checkpoint
                tag = self.checkpointer.save(step, last_eval)
                self.log(f"checkpoint {tag}")
            if step % t.eval_every == 0 or step == t.steps:
                result = self.evaluate(step)
                if result is not None:
                    last_eval = result
                    self.metrics.write(dict(result, kind="eval", step=step))
                    self.log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
                    if saved and self.rank == 0:
                        self.checkpointer.record_eval(tag, result)
        if progress is not None:
            progress.close()
        report = self.evaluator.write_report(self.out / "report")
        return {"eval": last_eval, "report": report}
