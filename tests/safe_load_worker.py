"""One process, no launcher (RANK/WORLD_SIZE/MASTER_* set by the test): a tiny model on a real
DeepSpeed engine (ZeRO 1, fp32, ep_size 1).

`save OUT`: one training step, then `mmoe_ds.training.checkpoint.save` at step 1 (DeepSpeed's model, expert
and optimizer files, our meta.json and rank0_state.pt). `resume OUT...`: for each run folder,
`mmoe_ds.training.checkpoint.resume` into a freshly initialised engine. Both print
`RESULTS {json}`: the weights' checksum after the step / after each resume, or the error."""
from __future__ import annotations

import json
import sys

import deepspeed
import torch

from mmoe_ds.config.recipe import load_ds_config
from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
from mmoe_ds.training import checkpoint
from mmoe_ds.training.teardown import exit_process

MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
         "moe_intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": {"image": 1, "text": 2},
         "moe_layer_frequency": 2, "max_position_embeddings": 32, "vocab_size": 64}


def build_engine():
    config = load_ds_config("ds_configs/cpu_zero1_fp32.json")
    config["optimizer"]["params"]["torch_adam"] = True  # no fused CPU Adam build in tests
    config["scheduler"]["params"]["total_num_steps"] = 10
    config["train_micro_batch_size_per_gpu"] = 2
    config.pop("tensorboard", None)
    torch.manual_seed(0)
    model = MmoeForCausalLM(MmoeConfig(**MODEL, moe_backend="deepspeed", ep_size=1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    return engine


def checksum(engine) -> float:
    return sum(float(p.detach().double().sum()) for p in engine.module.parameters())


def save(out: str) -> dict:
    engine = build_engine()
    ids = torch.randint(4, 64, (2, 20))
    ids[:, 1:17] = engine.module.config.image_token_id
    loss = engine(input_ids=ids, pixel_patches=torch.randn(2, 16, 49), labels=ids).loss
    engine.backward(loss)
    engine.step()
    meta = {"ep_size": 1, "world_size": 1, "model_config": MODEL}
    rank_state = {"loader": {"format": 1, "batches": 1, "epoch": 0}, "rng": checkpoint.rng_state()}
    checkpoint.save(engine, out, 1, meta, rank_state, keep_last=2)
    return {"checksum": checksum(engine)}


def resume(outs: list[str]) -> dict:
    engine = build_engine()
    results = {}
    for out in outs:
        try:
            meta, rank_state = checkpoint.resume(engine, out, ep_size=1, world_size=1)
            results[out] = {"step": meta["step"], "checksum": checksum(engine), "loader": rank_state["loader"]}
        except Exception as e:  # reported per folder, so one refusal does not hide the others
            results[out] = {"error": type(e).__name__, "message": str(e)}
    return results


if __name__ == "__main__":
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    result = save(sys.argv[2]) if sys.argv[1] == "save" else resume(sys.argv[2:])
    print("RESULTS " + json.dumps(result), flush=True)
    exit_process(0)  # tear gloo down before the interpreter does (see mmoe_ds/training/teardown.py)
