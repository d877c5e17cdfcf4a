"""Started by tests/test_ep_dp.py through the DeepSpeed launcher on 4 CPU processes.

Expert parallelism below the world size (expert data parallelism): the demo-shaped model at
EP 2 x DP 2, EP 4 x DP 1 and EP 1 x DP 4 on the same global batch (each rank its quarter), against
a naive reference: the whole model with every expert in one process (`moe_backend="torch"`), its
loss the mean of the four ranks' losses, computed on every rank without communication. The
optimizer is plain SGD through DeepSpeed (ZeRO-1), so the parameters after a step show the reduced
gradient itself: p - lr * g. Then a checkpoint written at EP 2 x DP 2 (mmoe_ds.training.checkpoint.save) is
resumed at EP 4 and at EP 1 (mmoe_ds.training.checkpoint.resume), and each takes the next step, against
the EP 2 x DP 2 run that continues.

Routing is dropless, so no token is dropped in any layout (with a capacity, the slots are agreed
within each expert-parallel group and the drops would differ by design).
Each rank writes --out.rank<r>.json: relative differences (max |a-b| / max |b|).
"""
from __future__ import annotations

import os

import deepspeed
import torch
import torch.distributed as dist
from ep_worker import finish_worker, start_worker

from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
from mmoe_ds.moe.experts import to_per_expert
from mmoe_ds.training import checkpoint

LR, WORLD, PER_RANK, SEQ, VOCAB = 0.5, 4, 2, 24, 64
MODEL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             moe_intermediate_size=48, num_local_experts=4, num_experts_per_tok={"image": 1, "text": 2},
             moe_layer_frequency=1, max_position_embeddings=32, image_size=8, patch_size=4, num_channels=1,
             router={"mode": "modality_bias", "drop_tokens": False, "load_balance_coef": 0.01,
                     "modality_load_balance_coef": 0.01, "z_loss_coef": 0.001, "modality_bias_init_std": 0.5})


def global_batch(step: int) -> dict:
    """WORLD * PER_RANK samples: 4 image tokens, then text; the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(4, VOCAB, (WORLD * PER_RANK, SEQ), generator=g)
    ids[:, 1:5] = 3  # <image> (MmoeConfig's default image_token_id)
    return {"input_ids": ids, "labels": ids.clone(), "pixel_patches": torch.randn(len(ids), 4, 16, generator=g)}


def my_slice(batch: dict, rank: int) -> dict:
    return {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}


def local_state(full: dict, ep: int, ep_rank: int, experts: int) -> dict:
    """The state dict of expert-parallel rank `ep_rank` at size `ep`: its experts, renumbered from 0."""
    per = experts // ep
    out = {}
    for key, value in full.items():
        if ".deepspeed_experts." in key:
            prefix, rest = key.split(".deepspeed_experts.")
            gid, name = rest.split(".", 1)
            if int(gid) // per == ep_rank:
                out[f"{prefix}.deepspeed_experts.{int(gid) % per}.{name}"] = value
        else:
            out[key] = value
    return out


def global_state(engine, ep: int, experts: int) -> dict:
    """Every rank's parameters gathered into the full model's names (experts by global id)."""
    per = experts // ep
    mine = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (dist.get_rank() % ep, mine))
    full = {}
    for ep_rank, state in everyone:
        for key, value in state.items():
            if ".deepspeed_experts." in key:
                prefix, rest = key.split(".deepspeed_experts.")
                lid, name = rest.split(".", 1)
                key = f"{prefix}.deepspeed_experts.{ep_rank * per + int(lid)}.{name}"
            full[key] = value
    return full


def engine_at(ep: int, full_state: dict):
    model = MmoeForCausalLM(MmoeConfig(**MODEL, moe_backend="deepspeed", ep_size=ep))
    model.load_state_dict(local_state(full_state, ep, dist.get_rank() % ep, MODEL["num_local_experts"]))
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    config = {"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups, lr=LR), config=config)
    return engine


def engine_step(engine, batch: dict) -> float:
    out = engine(**batch)
    engine.backward(out.loss)
    engine.step()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    return float(loss) / dist.get_world_size()


def reference_step(model, step: int) -> float:
    """The naive model on the whole global batch: mean of the per-rank losses, then SGD."""
    batch = global_batch(step)
    losses = [model(**my_slice(batch, r)).loss for r in range(WORLD)]
    loss = torch.stack(losses).mean()
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return float(loss)


def rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp(min=1e-12)) for k in b)


def main() -> None:
    out, rank = start_worker()
    assert dist.get_world_size() == WORLD
    torch.manual_seed(0)
    reference = MmoeForCausalLM(MmoeConfig(**MODEL, moe_backend="torch"))
    start = {k: v.clone() for k, v in to_per_expert(reference.state_dict()).items()}
    result = {}

    # 1. one step in each layout = the naive reference
    ref_loss = reference_step(reference, 0)
    after_ref = {k: v.detach().clone() for k, v in to_per_expert(reference.state_dict()).items()}
    moved = max(float((after_ref[k] - start[k]).abs().max()) for k in start)  # how far the step moved anything
    engines = {}
    for ep in (2, 4, 1):
        engines[ep] = engine_at(ep, start)
        loss = engine_step(engines[ep], my_slice(global_batch(0), rank))
        after = global_state(engines[ep], ep, MODEL["num_local_experts"])
        result[f"ep{ep}"] = {"loss": loss, "ref_loss": ref_loss, "params_vs_reference": rel(after, after_ref),
                             "step_size": moved}
    # At EP 2 the expert-data-parallel group of rank r is {r, r+2}: both hold the same experts, which must
    # still be equal after the step (their gradients were reduced within that group, and only there: a
    # reduction over the other group's ranks, which hold other experts, would not match the reference).
    mine = {k: v for k, v in engines[2].module.state_dict().items() if ".deepspeed_experts." in k}
    peers = [None] * WORLD
    dist.all_gather_object(peers, mine)
    result["ep2_expert_dp_peer_equal"] = rel(peers[(rank + 2) % 4], mine)

    # 2. checkpoint at EP 2 x DP 2, resume at EP 4 and EP 1; the next step equals EP 2's own next step
    out_dir = os.path.join(os.path.dirname(out), "ckpt")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    meta = {"ep_size": 2, "world_size": WORLD,
            "model_config": {k: v for k, v in engines[2].module.config.to_dict().items()
                             if k not in ("moe_backend", "ep_size", "transformers_version")}}
    checkpoint.save(engines[2], out_dir, 1, meta, {"rng": checkpoint.rng_state()}, keep_last=1)
    saved = global_state(engines[2], 2, MODEL["num_local_experts"])
    continued_loss = engine_step(engines[2], my_slice(global_batch(1), rank))
    continued = global_state(engines[2], 2, MODEL["num_local_experts"])
    for ep in (4, 1):
        engine = engine_at(ep, start)  # fresh weights: the checkpoint must bring the step-1 ones
        resumed_meta, rank_state = checkpoint.resume(engine, out_dir, ep, WORLD)
        loaded = global_state(engine, ep, MODEL["num_local_experts"])
        loss = engine_step(engine, my_slice(global_batch(1), rank))
        result[f"resume_ep{ep}"] = {"step": resumed_meta["step"], "rank_state": rank_state is not None,
                                    "loaded_vs_saved": rel(loaded, saved),
                                    "next_loss": loss, "continued_loss": continued_loss,
                                    "next_params_vs_continued": rel(
                                        global_state(engine, ep, MODEL["num_local_experts"]), continued)}
    finish_worker(out, rank, result)

if __name__ == "__main__":
    main()
