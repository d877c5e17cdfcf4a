"""Training throughput and MFU of a recipe's model on one device.

    python bench/train_step.py                                   # GPU: recipes/gpu_node.json, bf16
    python bench/train_step.py --moe-backend dropless            # the same model with DroplessMoE blocks
    python bench/train_step.py --device cpu --dtype float32 --recipe recipes/demo_cpu.json --steps 5   # smoke

`--moe-backend`: "torch" (TorchMoE, no DeepSpeed; the recipe's routing), "deepspeed" (DeepSpeed's
MOELayer at ep_size 1, the recipe's capacity) or "dropless" (DroplessMoE at ep_size 1, the
recipe's routing with drop_tokens=false); the DeepSpeed-based ones initialise a 1-process group.

Synthetic batches with the recipe's modality mix (image+text, text-only, image-only rows at
max_length). MFU = model FLOPs per token x tokens/s / peak, with model FLOPs = 6 x active
parameters (embeddings excluded, k of E experts per MoE layer) + 12 x layers x d x seq
(attention scores), the PaLM convention. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def active_params(model, config) -> float:
    """Parameters a token uses: all but the embeddings and lm_head, and k/E of the experts (a layer's
    experts are its 3-D `...deepspeed_moe.experts.w13` / `.w2`)."""
    total = 0.0
    for name, p in model.named_parameters():
        if "embed" in name or "lm_head" in name:
            continue
        if ".deepspeed_moe.experts." in name:
            k = config.num_experts_per_tok
            k = max(k.values()) if isinstance(k, dict) else k
            total += p.numel() * k / config.num_local_experts
        else:
            total += p.numel()
    return total


def main() -> None:
    from mmoe_ds.config.recipe import Recipe
    from mmoe_ds.model import MmoeConfig, MmoeForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/gpu_node.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--moe-backend", choices=["torch", "deepspeed", "dropless"], default="torch")
    parser.add_argument("--batch-scale", type=int, default=1,
                        help="repeat the recipe's micro batch this many times (the same mix, more rows per step)")
    parser.add_argument("--profile", type=int, default=0,
                        help="print the N CUDA kernels that took the most time in one profiled step after timing")
    args = parser.parse_args()
    recipe = Recipe.load(args.recipe)
    model_kwargs = dict(recipe.model, vocab_size=args.vocab)
    if args.moe_backend != "torch":
        from moe_layer import init_distributed  # bench/ is on sys.path when this script runs

        init_distributed(args.device)
        model_kwargs.update(moe_backend="deepspeed", ep_size=1)
        if args.moe_backend == "dropless":
            model_kwargs["router"] = dict(model_kwargs.get("router", {}), moe_backend="dropless", drop_tokens=False)
    config = MmoeConfig(**model_kwargs)
    model = MmoeForCausalLM(config).to(args.device, getattr(torch, args.dtype))
    for module in model.modules():
        if hasattr(module, "set_deepspeed_parallelism"):  # what deepspeed.initialize does for MoE layers
            module.set_deepspeed_parallelism()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda")
    B0, L, P = recipe.micro_batch_size, recipe.data.max_length, config.num_patches
    B = B0 * args.batch_scale
    ids = torch.randint(4, args.vocab, (B, L), device=args.device)
    n_img = recipe.data.composition.get("image_text", 0)
    n_txt = recipe.data.composition.get("text", 0)
    rows_of_one = list(range(n_img)) + list(range(n_img + n_txt, B0))  # image+text and image-only rows
    image_rows = [r + B0 * i for i in range(args.batch_scale) for r in rows_of_one]
    ids[image_rows, 1:1 + P] = config.image_token_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "pixel_patches": torch.randn(B, P, config.patch_dim, device=args.device, dtype=getattr(torch, args.dtype))}
    times = []

    def one_step():
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for step in range(args.warmup + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        one_step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens_s = B * L / step_s
    flops_per_token = 6 * active_params(model, config) + 12 * config.num_hidden_layers * config.hidden_size * L
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    mfu = flops_per_token * tokens_s / (peak * 1e12) if peak else None
    total = sum(p.numel() for p in model.parameters())
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            one_step()
            if args.device == "cuda":
                torch.cuda.synchronize()
        sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile, max_name_column_width=60))
    print(f"moe backend: {args.moe_backend}, micro batch {B} x {L} tokens")
    print(f"{'recipe':<24} {'params (M)':>10} {'active (M)':>10} {'step ms':>8} {'tokens/s':>10} {'MFU':>6}")
    print(f"{args.recipe:<24} {total / 1e6:>10.1f} {active_params(model, config) / 1e6:>10.1f} {step_s * 1e3:>8.1f} "
          f"{tokens_s:>10.0f} {mfu if mfu is not None else float('nan'):>6.1%}")
    print(json.dumps({"bench": "train_step", "recipe": args.recipe, "moe_backend": args.moe_backend,
                      "device": device, "dtype": args.dtype, "micro_batch": B, "seq_len": L,
                      "params": total, "step_ms": step_s * 1e3, "tokens_per_s": tokens_s, "mfu": mfu,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
