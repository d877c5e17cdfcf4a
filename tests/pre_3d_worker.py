"""Launched with 1 process by tests/test_pre_3d_layout.py: resume the checkpoint written before the 3-D
expert parameters (tests/fixtures/pre_3d_experts/run, copied to --run), then save and resume one of our own.

Reports: the resumed meta's `optimizer_restarted`; the logits after resuming vs the old run's logits;
the loss of a step after it; and for our own checkpoint, whether its meta carries the layout mark and
whether a resumed engine's next step equals the step of the engine that wrote it (the Adam state came back).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from ep_worker import finish_worker, start_worker

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "pre_3d_experts"))
from make import CONFIG, ds_config, fixed_batch  # noqa: E402  (the fixture's own definitions)

from mmoe_ds.model import MmoeConfig, MmoeForCausalLM  # noqa: E402
from mmoe_ds.training import checkpoint  # noqa: E402


def engine_of(seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = MmoeForCausalLM(MmoeConfig(**CONFIG, moe_backend="deepspeed", ep_size=1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config())
    return engine


def step(engine) -> float:
    engine.train()
    loss = engine(**fixed_batch()).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def logits(engine) -> torch.Tensor:
    engine.eval()
    with torch.no_grad():
        return engine(**fixed_batch()).logits


def main() -> None:
    out, rank = start_worker()
    run = Path(out).parent / "run"
    old_logits = torch.load(Path(__file__).parent / "fixtures" / "pre_3d_experts" / "logits.pt")["run"]
    engine = engine_of(seed=5)  # other initial weights: only the checkpoint can make the logits match
    before = float((logits(engine) - old_logits).abs().max())
    meta, _ = checkpoint.resume(engine, str(run), ep_size=1, world_size=1)
    result = {"restarted": meta.get("optimizer_restarted"), "before_resume_gap": before,
              "resumed_gap": float((logits(engine) - old_logits).abs().max()),
              "scale": float(old_logits.abs().max()), "next_loss": step(engine)}

    ours = Path(out).parent / "ours"
    step(engine)
    checkpoint.save(engine, str(ours), 4, {"ep_size": 1, "world_size": 1, "model_config": dict(CONFIG)},
                    {"loader": {}, "rng": checkpoint.rng_state()}, keep_last=1)
    tag = checkpoint.latest_tag(ours / "checkpoints")
    result["our_layout"] = json.loads((ours / "checkpoints" / tag / "meta.json").read_text()).get("parameter_layout")
    continued = [step(engine) for _ in range(2)]
    again = engine_of(seed=6)
    meta2, _ = checkpoint.resume(again, str(ours), ep_size=1, world_size=1)
    resumed = [step(again) for _ in range(2)]
    result.update(ours_restarted=meta2.get("optimizer_restarted"), continued=continued, resumed=resumed)
    finish_worker(out, rank, result)


if __name__ == "__main__":
    main()
