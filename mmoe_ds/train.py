"""Training entry point, started by the DeepSpeed launcher (or torchrun):

    deepspeed --num_gpus N --module mmoe_ds.train --recipe recipes/X.json --deepspeed_config ds_configs/Y.json

Everything comes from the two JSON files. Configuration is checked before DeepSpeed is even
imported (`--check` only checks). Resumes from `<output_dir>/checkpoints/latest` if present.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import checkpoint
from .recipe import ConfigError, Recipe, load_ds_config, validate_launch


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="mmoe_ds.train", description="Train a multimodal MoE with DeepSpeed.")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--world_size", type=int, default=None, help="with --check: the number of processes")
    return parser.parse_args(argv)


def load_and_validate(args) -> tuple[Recipe, dict, int]:
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    recipe = Recipe.load(args.recipe)
    ds_config = validate_launch(recipe, load_ds_config(args.deepspeed_config), args.deepspeed_config, world_size)
    return recipe, ds_config, world_size


class Trainer:
    def __init__(self, recipe: Recipe, ds_config: dict, world_size: int):
        self.recipe, self.ds_config, self.world_size = recipe, ds_config, world_size
        self.out = Path(recipe.train.output_dir)
        self.metrics_path = self.out / "metrics.jsonl"

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed
        import torch.distributed as dist

        from .data_glue import ensure_dataset, load_processor, make_train_loader
        from .model import MmoeConfig, MmoeForCausalLM

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
        self.processor = load_processor(r.data)
        torch.manual_seed(t.seed)  # identical dense init on every rank; experts are seeded by global id
        tok = self.processor.tokenizer
        self.model_config = MmoeConfig(
            **r.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, image_token_id=tok.convert_tokens_to_ids("<image>"),
            image_size=self.processor.image_size, patch_size=self.processor.patch_size,
            num_channels=self.processor.num_channels, moe_backend="deepspeed", ep_size=t.expert_parallel_size)
        model = MmoeForCausalLM(self.model_config)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                               config=self.ds_config)
        self.device = self.engine.device
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
            if self.rank == 0:
                self._truncate_metrics(self.start_step)

    def _truncate_metrics(self, step: int) -> None:
        """Steps logged after the checkpoint (before a crash) will be logged again."""
        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= step]
            checkpoint.atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    # -- logging ---------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[mmoe-ds] {message}", flush=True)

    def write_metrics(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            scalars = [(f"{record['kind']}/{k}", v, record["step"]) for k, v in record.items()
                       if isinstance(v, (int, float)) and k != "step"]
            monitor.write_events(scalars)

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return (t / self.world_size).tolist()

    # -- loop ------------------------------------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        keep = ("input_ids", "attention_mask", "labels", "modality_ids", "pixel_patches")
        return {k: batch[k].to(self.device) for k in keep}

    def train(self) -> dict:
        from .evaluate import Evaluator
        from .moe.router import RoutingStats

        t = self.recipe.train
        evaluator = Evaluator(self)
        batches = iter(self.loader)
        gas = self.engine.gradient_accumulation_steps()
        progress = None
        if self.rank == 0 and t.progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=t.steps, initial=self.start_step, desc="train", dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0)
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
                          "skipped": self.loader.skip_counts(),
                          "routing": [s.to_dict(self.model_config.router_config().modalities) for s in window_stats]}
                self.write_metrics(record)
                window, window_stats, tic = [], None, time.perf_counter()
            if step % t.eval_every == 0 or step == t.steps:
                last_eval = evaluator.run(step)
                self.write_metrics(dict(last_eval, kind="eval", step=step))
                self.log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
            if step % t.checkpoint_every == 0 or step == t.steps:
                self.save_checkpoint(step, last_eval)
        if progress is not None:
            progress.close()
        report = evaluator.write_report(self.out / "report")
        return {"eval": last_eval, "report": report}

    def save_checkpoint(self, step: int, metrics: dict) -> None:
        t = self.recipe.train
        meta = {"ep_size": t.expert_parallel_size, "world_size": self.world_size,
                "model_config": {k: v for k, v in self.model_config.to_dict().items()
                                 if k not in ("moe_backend", "ep_size", "transformers_version")},
                "processor_dir": str(Path(self.recipe.data.dir, "processor").resolve()),
                "report_dir": str((self.out / "report").resolve()), "recipe": self.recipe.to_dict(), "metrics": metrics}
        rank_state = {"loader": self.loader.state_dict(), "rng": checkpoint.rng_state()}
        tag = checkpoint.save(self.engine, str(self.out), step, meta, rank_state, t.keep_last)
        self.log(f"checkpoint {tag}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe, ds_config, world_size = load_and_validate(args)
    except ConfigError as e:
        print(f"mmoe-ds train: configuration error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"configuration OK: {args.recipe} + {args.deepspeed_config} on {world_size} processes")
        return 0
    trainer = Trainer(recipe, ds_config, world_size)
    trainer.setup()
    result = trainer.train()
    if trainer.rank == 0:
        print(json.dumps({"final_eval": result["eval"], "report": [str(p) for p in result["report"]]}), flush=True)
    trainer.dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
