"""One process, no launcher: every shipped DeepSpeed config builds an engine around the model
(DeepSpeed MoE layers) and takes an optimizer step. Prints RESULTS {config: "ok <dtype>" | error}
and OPTIMIZER {config: {"measured": bytes the optimizer holds, "planned": mmoe_ds.training.plan's figure}}."""
from __future__ import annotations

import json
import sys

import deepspeed
import torch

from mmoe_ds.config.recipe import Recipe, load_ds_config, validate_launch
from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
from mmoe_ds.training.plan import plan_run
from mmoe_ds.training.teardown import exit_process


def optimizer_bytes(engine) -> int:
    """What the optimizer holds: the inner torch optimizer's state tensors (Adam's moments) + the
    parameters it updates that are not the model's own (DeepSpeed's fp32 master copies)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    model_ids = {id(p) for p in engine.module.parameters()}
    state = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    masters = sum(p.numel() * p.element_size() for g in inner.param_groups for p in g["params"]
                  if id(p) not in model_ids)
    return state + masters


def main(names: list[str]) -> None:
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    recipe = Recipe.load("recipes/demo_cpu.json")
    recipe.train.expert_parallel_size = 1
    results, optimizer = {}, {}
    for name in names:
        config = validate_launch(recipe, load_ds_config(f"ds_configs/{name}.json"), name, 1)
        config["optimizer"]["params"]["torch_adam"] = True  # no fused CPU Adam build in tests
        config.pop("tensorboard", None)
        torch.manual_seed(0)
        model = MmoeForCausalLM(MmoeConfig(**recipe.model, vocab_size=64, moe_backend="deepspeed", ep_size=1))
        try:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
            ids = torch.randint(4, 64, (recipe.micro_batch_size, 20))
            ids[:, 1:17] = model.config.image_token_id
            out = engine(input_ids=ids, pixel_patches=torch.randn(len(ids), 16, 49), labels=ids)
            engine.backward(out.loss)
            engine.step()
            ok = torch.isfinite(out.loss).item()
            results[name] = f"ok {next(engine.module.parameters()).dtype}" if ok else "non-finite loss"
            planned = plan_run(dict(recipe.model, vocab_size=64), config, 1, 1, len(ids), ids.shape[1])
            optimizer[name] = {"measured": optimizer_bytes(engine), "planned": planned.optimizer_bytes}
        except Exception as e:  # reported per config, so one failure does not hide the others
            results[name] = f"{type(e).__name__}: {e}"
    print("RESULTS " + json.dumps(results), flush=True)
    print("OPTIMIZER " + json.dumps(optimizer), flush=True)
    exit_process(0)  # tear gloo down before the interpreter does (see mmoe_ds/training/teardown.py)


if __name__ == "__main__":
    main(sys.argv[1:])
