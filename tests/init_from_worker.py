"""Run by tests/test_init_from.py on 2 processes: the real trainer (`build_trainer` + `train`) with
the recipe's train.init_from / freeze / reinit, recording what the test cannot see from outside.

Arguments: those of mmoe_ds.train plus `--out PREFIX` and optionally `--kill-at-step N`: rank 1
then dies of SIGKILL at step N (a test double of the evaluator does it when step N's evaluation
starts, after any checkpoint of that step; the recipe must evaluate at N), as a crashed node would.
Writes, per rank:
  PREFIX.rank{r}.json  {"ep_rank", "frozen": names with requires_grad False,
                        "in_optimizer": names whose parameter DeepSpeed's optimizer holds,
                        "frozen_parameters": the model's own parameter names with requires_grad False
                        (a layer's experts: `...experts.w13` / `.w2`),
                        "resumed_from": the step the run resumed at (0: none)}
  PREFIX.rank{r}.before.pt / .after.pt  {global name: tensor} right after setup / after training
Names are as an export names its tensors: global expert ids, one entry per expert and projection
(slices of the 3-D expert parameters, which requires_grad and the optimizer see whole).
"""
from __future__ import annotations

import json
import os
import signal
import sys

import torch

from mmoe_ds.training.checks import load_and_validate
from mmoe_ds.training.evaluate import Evaluator
from mmoe_ds.training.init_from import global_names, named_tensors
from mmoe_ds.training.main import parse_args
from mmoe_ds.training.teardown import exit_process
from mmoe_ds.training.trainer import build_trainer


def optimizer_params(engine) -> list:
    """The parameters DeepSpeed's optimizer updates: ZeRO's bit16 groups, the bf16 optimizer's (ZeRO-0
    bf16), else the torch param groups."""
    groups = getattr(engine.optimizer, "bit16_groups", None) or getattr(engine.optimizer, "bf16_groups", None)
    if groups is None:
        groups = [g["params"] for g in engine.optimizer.param_groups]
    return [p for group in groups for p in group]


class KillingEvaluator(Evaluator):
    """The real evaluation; on rank 1 at step `kill_at` the process is SIGKILLed first."""

    kill_at: int | None = None

    def prepare(self, step: int) -> None:
        if step == self.kill_at and self.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        super().prepare(step)


def take_option(argv: list[str], name: str) -> str | None:
    """Remove `name VALUE` from argv; returns VALUE (None if absent)."""
    if name not in argv:
        return None
    i = argv.index(name)
    value = argv[i + 1]
    del argv[i:i + 2]
    return value


def snapshot(named: dict) -> dict:
    return {n: p.detach().clone() for n, p in named.items()}


def parameter_of(tensor):
    """The parameter a per-expert view slices (the tensor itself for a parameter)."""
    return tensor if tensor._base is None else tensor._base


def main() -> int:
    argv = sys.argv[1:]
    out = take_option(argv, "--out")
    kill_at = take_option(argv, "--kill-at-step")
    recipe, ds_config, world_size, _ = load_and_validate(parse_args(argv))
    trainer = build_trainer(recipe, ds_config, world_size, evaluator_factory=KillingEvaluator)
    config, ep = trainer.model_config, recipe.train.expert_parallel_size
    ep_rank = trainer.rank % ep
    module, local_experts = trainer.engine.module, config.num_local_experts // ep
    named = named_tensors(module, ep_rank, local_experts)
    held = {id(p) for p in optimizer_params(trainer.engine)}
    torch.save(snapshot(named), f"{out}.rank{trainer.rank}.before.pt")
    result = {"ep_rank": ep_rank, "resumed_from": trainer.start_step,
              "frozen": sorted(n for n, t in named.items() if not parameter_of(t).requires_grad),
              "in_optimizer": sorted(n for n, t in named.items() if id(parameter_of(t)) in held),
              "frozen_parameters": sorted(n for n, p in global_names(module, ep_rank, local_experts).items()
                                          if not p.requires_grad)}
    trainer.evaluator.kill_at = int(kill_at) if kill_at else None
    trainer.train()
    # views taken again: they must see the parameters as training left them
    torch.save(snapshot(named_tensors(module, ep_rank, local_experts)), f"{out}.rank{trainer.rank}.after.pt")
    with open(f"{out}.rank{trainer.rank}.json", "w") as f:
        json.dump(result, f)
    trainer.dist.barrier()
    exit_process(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
