"""Run by tests/test_training_folder.py on 2 processes: a training run whose evaluation fails on
purpose (a test double built by `build_trainer(..., evaluator_factory=...)`): at step 2 while reading
data on rank 1 only, at step 3 in the forward phase on every rank. Same arguments as mmoe_ds.train."""
from __future__ import annotations

import sys

from mmoe_ds.training.checks import load_and_validate
from mmoe_ds.training.evaluate import Evaluator
from mmoe_ds.training.main import parse_args
from mmoe_ds.training.trainer import build_trainer


class FailingEvaluator(Evaluator):
    """The real evaluation, made to fail at chosen steps."""

    def prepare(self, step: int) -> None:
        if step == 2 and self.rank == 1:
            raise OSError("test double: validation shard unreadable on rank 1")
        super().prepare(step)

    def forward(self, step: int) -> list[float]:
        if step == 3:
            raise RuntimeError("test double: forward failed")
        return super().forward(step)


def main() -> int:
    recipe, ds_config, world_size, _ = load_and_validate(parse_args(sys.argv[1:]))
    trainer = build_trainer(recipe, ds_config, world_size, evaluator_factory=FailingEvaluator)
    trainer.train()
    trainer.dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
