"""One MoE layer, fwd+bwd: dense-GEMM limit vs DeepSpeed's stock MoE vs mmoe-ds (dropless, grouped GEMM).

    python bench/moe_layer.py                      # GPU: the three issue shapes, 16,384 tokens, bf16
    python bench/moe_layer.py --device cpu --tokens 512 --shapes small --dtype float32   # smoke run
    deepspeed --num_gpus 2 bench/moe_layer.py --device cpu --tokens 512 --shapes small --dtype float32
                                                   # expert parallelism over 2 processes (EP rows only)
    python bench/moe_layer.py --checks-only        # the numerics checks alone (exit 1 if one fails)

One process without a launcher (RANK/WORLD_SIZE/MASTER_* are set here if unset); under a launcher
the expert-parallel size is the world size. Variants, per shape and routing:
  dense                  one SwiGLU FFN over tokens*k rows: the same GEMM FLOPs, no routing (the limit)
  grouped_gemm           the expert GEMMs alone: grouped w13, SwiGLU, grouped w2 over rows already
                         sorted by expert, with the routing's per-expert counts (no routing, no permute)
  deepspeed_stock        deepspeed.moe.layer.MoE, capacity factor 1.25, 2nd-expert sampling off
  deepspeed_dropless     the same with drop_tokens=False (capacity = the largest expert's load)
  mmoe_<mode>            mmoe_ds.moe.TorchMoE, dropless, grouped GEMM, modes agnostic/modality_bias/masked_pools
  mmoe_ds_adapter        mmoe_ds.moe.deepspeed_layer.DeepSpeedMoE (agnostic, dropless): DeepSpeed's dispatch
  dropless_ref           mmoe_ds.moe.dropless.DroplessMoE (agnostic): index dispatch, torch reference kernels
  dropless_fused         the same with the Triton kernels (CUDA sm90+ only; skipped elsewhere)
  dropless_modality_bias DroplessMoE, modality_bias router, kernels chosen automatically
Routing: "balanced" (random gate) and "zipf" (gate logits offset by log p_e, p_e ~ 1/(e+1)^1.2:
skewed expert loads). Expert parallelism (a launcher with WORLD_SIZE > 1) runs the layers that
support it (deepspeed_*, mmoe_ds_adapter, dropless_*) at ep_size = WORLD_SIZE, T tokens per rank;
times are the slowest rank's. TFLOP/s count the useful expert work only, the same for every row:
3 GEMMs of a SwiGLU expert, 2*tokens*k*d*f FLOPs each, x3 for forward+backward (routing, dropped
routes and padding not counted). Loss = mean(y^2) + the layer's aux loss. Times: CUDA events
around each step after --warmup steps, median of --iters. Peak MiB: peak allocated during the
timed steps above what was allocated before (parameters), i.e. activations, gradients and
workspace. Host syncs (CUDA): one extra step of each dropless_* row under
torch.cuda.set_sync_debug_mode("warn"), synchronizing calls counted in forward and backward.
Checks before timing (per shape, on the benchmark's inputs; norm-relative error, tolerance 1e-2
in bf16/fp16, 1e-5 in fp32): TorchMoE's grouped path vs its per-expert loop, and DroplessMoE
(reference kernels, and fused where it runs) vs TorchMoE's loop, forward, input and all weight
gradients. Prints a table and one JSON line; exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import warnings

import torch

SHAPES = {"issue": [(1024, 4096, 8, 2), (2048, 8192, 16, 2), (1024, 2816, 64, 8)],
          "small": [(64, 128, 8, 2), (64, 96, 16, 4)], "tiny": [(32, 64, 4, 2)]}  # tiny: gpu_suite.sh --dry-run
MODES = ("agnostic", "modality_bias", "masked_pools")
CAPACITY_FACTOR = 1.25
ZIPF_EXPONENT = 1.2
DEFAULT_VARIANTS = ("dense,grouped_gemm,deepspeed_stock,deepspeed_dropless," + ",".join(f"mmoe_{m}" for m in MODES)
                    + ",mmoe_ds_adapter,dropless_ref,dropless_fused,dropless_modality_bias")
EP_VARIANTS = ("deepspeed_stock", "deepspeed_dropless", "mmoe_ds_adapter", "dropless_ref", "dropless_fused",
               "dropless_modality_bias")


def init_distributed(device: str):
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a JIT build used only by inference
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    return deepspeed


def router_config(mode: str, E: int, k: int, drop_tokens: bool = False, ep_size: int = 1, backend: str = "deepspeed"):
    from mmoe_ds.moe import RouterConfig

    pools = {"image": list(range(E // 2)), "text": list(range(E // 2, E))} if mode == "masked_pools" else None
    return RouterConfig(num_experts=E, mode=mode, top_k=k, drop_tokens=drop_tokens, pools=pools, ep_size=ep_size,
                        moe_backend=backend)


def fused_runs(device: str) -> bool:
    """The Triton kernels run here (CUDA sm90+ with Triton)."""
    from mmoe_ds.moe.kernels import _fused_device

    return device == "cuda" and _fused_device(torch.cuda.current_device())


def build(name: str, d: int, f: int, E: int, k: int, ep: int):
    """(module, forward(module, x, modality) -> (output, aux loss or None))."""
    from mmoe_ds.moe import ExpertFFN, TorchMoE

    if name == "dense":
        return ExpertFFN(d, f), lambda m, x, mod: (m(x), None)
    if name.startswith("deepspeed_"):
        from deepspeed.moe.layer import MoE

        layer = MoE(hidden_size=d, expert=ExpertFFN(d, f), num_experts=E, ep_size=ep, k=k,
                    capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR, min_capacity=0,
                    drop_tokens=name == "deepspeed_stock", use_rts=False, top2_2nd_expert_sampling=False)
        layer.set_deepspeed_parallelism()
        return layer, lambda m, x, mod: m(x)[:2]
    if name == "mmoe_ds_adapter":
        from mmoe_ds.moe.deepspeed_layer import DeepSpeedMoE

        layer = DeepSpeedMoE(router_config("agnostic", E, k, ep_size=ep), d, f)
        layer.set_deepspeed_parallelism()
        return layer, lambda m, x, mod: m(x, mod)[:2]
    if name.startswith("dropless_"):
        from mmoe_ds.moe.dropless import DroplessMoE

        mode = "modality_bias" if name == "dropless_modality_bias" else "agnostic"
        fused = {"dropless_ref": False, "dropless_fused": True}.get(name)
        layer = DroplessMoE(router_config(mode, E, k, ep_size=ep, backend="dropless"), d, f, fused=fused)
        layer.set_deepspeed_parallelism()
        return layer, lambda m, x, mod: m(x, mod)[:2]
    return TorchMoE(router_config(name.removeprefix("mmoe_"), E, k), d, f), lambda m, x, mod: m(x, mod)[:2]


def construct(device: str, make):
    """make() with parameters initialised on `device` (seconds saved per large expert set on a GPU);
    on the CPU where a module refuses (e.g. a parameter drawn from a CPU generator)."""
    if device != "cpu":
        try:
            with torch.device(device):
                return make()
        except RuntimeError:
            pass
    return make()


def zipf_logits(E: int) -> torch.Tensor:
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** ZIPF_EXPONENT
    return (p / p.sum()).log().float()


def skew_routing(module, x: torch.Tensor, E: int) -> None:
    """Zipf routing: input feature 0 is set to 1 for every token (in the caller's x) and the gate's
    column 0 to log p_e, so every token's logits are offset by log p_e."""
    gate = getattr(getattr(module, "deepspeed_moe", None), "gate", None)
    if gate is not None:
        with torch.no_grad():
            gate.wg.weight[:, 0] = zipf_logits(E).repeat(gate.wg.weight.shape[0] // E).to(gate.wg.weight)


class GroupedGemms(torch.nn.Module):
    """The expert GEMMs alone over rows sorted by expert (fixed per-expert counts)."""

    def __init__(self, d: int, f: int, E: int, counts: list[int]):
        super().__init__()
        from mmoe_ds.moe import LocalExperts

        self.experts = LocalExperts(E, d, f)
        self.counts = counts

    def forward(self, x: torch.Tensor, modality: torch.Tensor):
        from mmoe_ds.moe.dropless import run_local_experts
        from mmoe_ds.moe.kernels import ops_for

        counts = torch.tensor(self.counts, device=x.device)
        return run_local_experts(self.experts, x, counts, self.counts, ops_for(x)), None


def expert_counts(T: int, E: int, k: int, routing: str) -> list[int]:
    """Rows per expert for T*k routes: equal, or proportional to the Zipf probabilities."""
    if routing == "balanced":
        return [T * k // E + (e < T * k % E) for e in range(E)]
    p = zipf_logits(E).double().exp()
    counts = (p * T * k).floor().long().tolist()
    counts[0] += T * k - sum(counts)
    return counts


def dropped_fraction(name: str, module, T: int, E: int, k: int) -> float:
    """Share of the T*k routes the last step dropped (DeepSpeed stock: over its capacity; the rest: dropless)."""
    if name == "deepspeed_stock":
        counts = module.deepspeed_moe.exp_counts.float()  # routes per expert before capacity
        capacity = max(math.ceil(T / E * CAPACITY_FACTOR * k), 0)
        return float((counts - capacity).clamp(min=0).sum()) / (T * k)
    if name in ("dense", "grouped_gemm", "deepspeed_dropless"):
        return 0.0
    return float(module.last_dropped) / (T * k)


def timed(step, warmup: int, iters: int, device: str, reset) -> tuple[float, float | None]:
    """(median ms, peak MiB above the allocation before the timed steps) of step()."""
    for _ in range(warmup):
        step()
    reset()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), None


def count_syncs(module, forward, x, modality) -> dict:
    """Synchronizing CUDA calls in one forward and one backward (torch.cuda.set_sync_debug_mode)."""
    counts = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out, aux = forward(module, x, modality)
            counts["forward"] = sum("synchroniz" in str(w.message) for w in caught)
            caught.clear()
            loss = out.float().square().mean()
            (loss if aux is None else loss + aux).backward()
            counts["backward"] = sum("synchroniz" in str(w.message) for w in caught)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return counts


def norm_rel_errors(results: list[list[tuple[str, torch.Tensor]]]) -> tuple[float, str]:
    """Largest norm-relative error of results[0] against results[-1] (matched by name), and where."""
    worst, where = 0.0, "-"
    expected = dict(results[-1])
    if set(expected) != {name for name, _ in results[0]}:
        return float("inf"), "different outputs or parameters"
    for name, a in results[0]:
        b = expected[name]
        err = float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))
        if err > worst:
            worst, where = err, name
    return worst, where


def run_for_check(module, x, modality) -> list[tuple[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    out = module(xi, modality)
    (out.hidden_states.float().square().mean() + out.aux_loss).backward()
    return ([("output", out.hidden_states.detach()), ("input grad", xi.grad)]
            + [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None])


def check_paths(d, f, E, k, x, modality) -> dict:
    """TorchMoE grouped vs its per-expert loop; DroplessMoE (reference, and fused where it runs) vs
    the same loop. Single-rank (ep_size 1)."""
    from mmoe_ds.moe import TorchMoE
    from mmoe_ds.moe.dropless import DroplessMoE
    from mmoe_ds.moe.experts import _grouped_mm_supported

    torch.manual_seed(0)
    torch_moe = construct(x.device.type, lambda: TorchMoE(router_config("agnostic", E, k), d, f)).to(x.device, x.dtype)
    torch_moe.use_grouped = False
    loop = run_for_check(torch_moe, x, modality)
    torch_moe.use_grouped = True
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2
    out = {}
    err, where = norm_rel_errors([run_for_check(torch_moe, x, modality), loop])
    kernel = "grouped_mm" if _grouped_mm_supported(x, torch_moe.deepspeed_moe.experts.w13) else "loop"
    out["grouped_vs_loop"] = {"kernel": kernel, "max_rel_err": err, "worst": where, "tol": tol, "ok": err <= tol}
    for fused in (False, True):
        if fused and not fused_runs(x.device.type):
            continue
        layer = construct(x.device.type, lambda: DroplessMoE(router_config("agnostic", E, k, backend="dropless"), d, f,
                                                             fused=fused)).to(x.device, x.dtype)
        layer.load_state_dict(torch_moe.state_dict())
        err, where = norm_rel_errors([run_for_check(layer, x, modality), loop])
        out[f"dropless_{'fused' if fused else 'ref'}_vs_loop"] = {"kernel": kernel, "max_rel_err": err,
                                                                 "worst": where, "tol": tol, "ok": err <= tol}
    return out


def training_step(module, forward, xi, modality):
    """One timed step: zero the gradients, forward, loss = mean(y^2) + the layer's aux loss, backward."""
    def step():
        module.zero_grad(set_to_none=True)
        xi.grad = None
        out, aux = forward(module, xi, modality)
        loss = out.float().square().mean()
        (loss if aux is None else loss + aux).backward()

    return step


def bench_variant(name, d, f, E, k, T, x, modality, routing, args, ep) -> dict | None:
    device, dtype = args.device, x.dtype
    torch.manual_seed(0)
    if name == "grouped_gemm":
        module = construct(device, lambda: GroupedGemms(d, f, E, expert_counts(T, E, k, routing)))
        forward = lambda m, xx, mod: m(xx, mod)  # noqa: E731
    else:
        module, forward = construct(device, lambda: build(name, d, f, E, k, ep))
    module.to(device, dtype)
    if routing == "zipf":
        skew_routing(module, x, E)
    g = torch.Generator().manual_seed(1)
    rows = name in ("dense", "grouped_gemm")
    xi = (torch.randn(T * k, d, generator=g).to(device, dtype) if rows else x.clone()).requires_grad_(True)

    step = training_step(module, forward, xi, modality)

    def reset():
        module.zero_grad(set_to_none=True)
        xi.grad = None

    module.last_dropped = 0
    if name.startswith(("mmoe", "dropless")):
        module.register_forward_hook(lambda m, i, o: setattr(m, "last_dropped", o[2].stats.dropped.sum()))
    ms, mib = timed(step, args.warmup, args.iters, device, reset)
    if ep > 1:  # the slowest rank's time
        slowest = torch.tensor([ms], dtype=torch.float64)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        ms = float(slowest)
    result = {"ms": ms, "peak_mib": mib, "dropped": dropped_fraction(name, module, T, E, k)}
    if device == "cuda" and name.startswith("dropless"):
        result["host_syncs"] = count_syncs(module, forward, xi, modality)
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="issue")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated subset (default: all)")
    parser.add_argument("--routing", default="balanced,zipf", help="comma-separated: balanced, zipf")
    parser.add_argument("--checks-only", action="store_true", help="run the numerics checks, no timing")
    parser.add_argument("--skip-checks", action="store_true", help="timing only (gpu_suite.sh ran the checks)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args()
    deepspeed = init_distributed(args.device)
    ep = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    dtype, T, device = getattr(torch, args.dtype), args.tokens, args.device
    names = [n for n in args.variants.split(",") if ep == 1 or n in EP_VARIANTS]
    skipped = {}
    if "dropless_fused" in names and not fused_runs(device):
        names.remove("dropless_fused")
        skipped["dropless_fused"] = "needs CUDA sm90+ with Triton"
    rows, checks = [], {}
    for d, f, E, k in SHAPES[args.shapes]:
        shape = f"d{d}/f{f}/E{E}/k{k}"
        flops = 3 * (3 * 2 * T * k * d * f)
        g = torch.Generator().manual_seed(0 + rank)
        x = torch.randn(T, d, generator=g).to(device, dtype)
        modality = (torch.randperm(T, generator=g) >= T // 2).long().to(device)  # half image (0), half text (1)
        if ep == 1 and not args.skip_checks:
            checks[shape] = check_paths(d, f, E, k, x, modality)
        if args.checks_only:
            continue
        for routing in args.routing.split(","):
            xr = x.clone()
            if routing == "zipf":
                xr[:, 0] = 1.0
            results = {name: bench_variant(name, d, f, E, k, T, xr, modality, routing, args, ep) for name in names}
            for r in results.values():
                r["tflops"] = flops / r["ms"] / 1e9
                r["vs_dense"] = results["dense"]["ms"] / r["ms"] if "dense" in results else None
                r["vs_deepspeed"] = results["deepspeed_stock"]["ms"] / r["ms"] if "deepspeed_stock" in results else None
            rows.append({"shape": shape, "routing": routing, "flops": flops, "results": results})

    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    triton_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        pass
    meta = {"bench": "moe_layer", "device": gpu, "ep_size": ep, "tokens_per_rank": T, "dtype": args.dtype,
            "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
            "triton": triton_version, "warmup": args.warmup, "iters": args.iters,
            "capacity_factor_deepspeed": CAPACITY_FACTOR, "zipf_exponent": ZIPF_EXPONENT, "skipped": skipped,
            "flops_convention": "useful expert GEMM work: 3 GEMMs x 2*T*k*d*f, x3 for fwd+bwd, same for every row"}
    ok = all(c["ok"] for shape_checks in checks.values() for c in shape_checks.values())
    if rank == 0:
        print_report(gpu, deepspeed.__version__, T, args, ep, rows, checks, skipped)
        print(json.dumps({**meta, "checks": checks, "rows": rows}))
    return 0 if ok else 1


def print_report(gpu, ds_version, T, args, ep, rows, checks, skipped) -> None:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\n{gpu}, torch {torch.__version__}, deepspeed {ds_version}, ep_size {ep}, {T} tokens per rank, "
          f"{args.dtype}, fwd+bwd, median of {args.iters}; TFLOP/s = 3 GEMMs x 2*T*k*d*f x 3 (fwd+bwd)")
    if rows:
        print(f"{'shape':<20} {'routing':<9} {'variant':<23} {'ms':>8} {'TFLOP/s':>8} {'x dense':>8} {'x DS':>6} "
              f"{'peak MiB':>9} {'dropped':>8} {'syncs f/b':>9}")
    for row in rows:
        for name, r in row["results"].items():
            syncs = r.get("host_syncs")
            syncs = f"{syncs['forward']}/{syncs['backward']}" if syncs else "-"
            print(f"{row['shape']:<20} {row['routing']:<9} {name:<23} {r['ms']:>8.2f} {r['tflops']:>8.2f} "
                  f"{fmt(r['vs_dense'], '.2f'):>8} {fmt(r['vs_deepspeed'], '.2f'):>6} {fmt(r['peak_mib'], '.0f'):>9} "
                  f"{r['dropped']:>8.1%} {syncs:>9}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for shape, shape_checks in checks.items():
        for what, c in shape_checks.items():
            print(f"check {shape} {what} ({c['kernel']}): max norm-rel err {c['max_rel_err']:.2e} ({c['worst']}), "
                  f"tol {c['tol']:.0e}: {'ok' if c['ok'] else 'FAIL'}")


if __name__ == "__main__":
    raise SystemExit(main())
