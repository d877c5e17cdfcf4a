"""The memory and compute plan of a run, per GPU, before anything is launched.

`plan_run` counts the model's parameters exactly (the model built on the meta device: no memory,
no weights), split into dense and expert parts and into trained and frozen ones, and lays them out
the way DeepSpeed holds them for the recipe's ZeRO stage, precision and expert-parallel size:

  weights      every dense parameter on every GPU; a GPU holds E/EP experts of each MoE layer.
  gradients    of trained parameters in the training dtype, full size at ZeRO 0/1 and partitioned
               at ZeRO-2, plus (ZeRO >= 1) the fp32 gradient partition DeepSpeed reduces into (4 bytes).
  optimizer    Adam's two moments (8 bytes per trained parameter) + an fp32 master copy (4 bytes)
               whenever DeepSpeed's optimizer wraps the parameters (any ZeRO stage >= 1, and bf16/fp16
               at stage 0).
  Partitioned terms are divided by the data-parallel size: dense ones over all N GPUs, expert ones
  over the N/EP GPUs of their expert-data-parallel group.
  activations  what backward keeps per micro batch without activation checkpointing (formula in
               `activation_bytes`).

These are the terms of DeepSpeed's own estimator (`estimate_zero2_model_states_mem_needs`: 2·P +
18·P/N bytes for bf16/fp16 at ZeRO-2 without offload), which the tests check, and the optimizer
bytes (moments + masters) are checked against a real engine on CPU. Buffers DeepSpeed adds on top (reduce / all-gather
buckets, the CUDA context, fragmentation) are not modelled: `headroom` keeps a share of the GPU free
for them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

# Expert parameters are the ones under a MoE layer's experts module (`...deepspeed_moe.experts.w13` /
# `.w2`, 3-D: every local expert of the layer), the ones DeepSpeed keeps in its expert groups.
EXPERT_MARK = ".deepspeed_moe.experts."
GIB = 1024 ** 3


def human_bytes(n: float) -> str:
    """Bytes in GiB, or MiB / KiB below one GiB."""
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def human_count(n: float) -> str:
    """A count (parameters, FLOPs) with B / M / K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def parse_bytes(text: str) -> int:
    """'80GB' / '80GiB' / '141 GB' / '24e9' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"--gpu-memory {text!r}: give a size such as 80GB, 141GB or 24GiB.")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}[unit]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the whole model (all experts of every MoE layer)."""

    dense_trained: int
    dense_frozen: int
    expert_trained: int
    expert_frozen: int
    vision: int  # of the dense ones: the vision tower's (encoder + projector)

    @property
    def total(self) -> int:
        return self.dense_trained + self.dense_frozen + self.expert_trained + self.expert_frozen


def count_parameters(model_kwargs: dict, freeze: list[str] | None = None) -> ParamCounts:
    """Exact counts from the model built on the meta device; `freeze`: train.freeze patterns (the ones
    the run would freeze: a layer's experts all or none, else ConfigError as in `init_from.freeze`)."""
    from ..model import MmoeConfig, MmoeForCausalLM
    from .init_from import all_ranks_names, match

    with torch.device("meta"):
        model = MmoeForCausalLM(MmoeConfig(**dict(model_kwargs, moe_backend="torch", ep_size=1)))
    named = dict(model.named_parameters())
    frozen = {n for n, p in named.items() if not p.requires_grad}
    experts = model.config.num_local_experts
    frozen |= set(match(named, freeze or [], "train.freeze", all_ranks_names(model, 1, experts)))
    counts = {"dense_trained": 0, "dense_frozen": 0, "expert_trained": 0, "expert_frozen": 0}
    vision = 0
    for name, p in named.items():
        part = "expert" if EXPERT_MARK in name else "dense"
        counts[f"{part}_{'frozen' if name in frozen else 'trained'}"] += p.numel()
        vision += p.numel() if name.startswith("model.vision.") else 0
    return ParamCounts(**counts, vision=vision)


def precision(ds_config: dict) -> str:
    """'bf16' | 'fp16' | 'fp32' as the DeepSpeed config asks."""
    for name in ("bf16", "fp16"):
        if (ds_config.get(name) or {}).get("enabled"):
            return name
    return "fp32"


@dataclass
class Plan:
    """Bytes per GPU, by term, and FLOPs per token."""

    world_size: int
    ep_size: int
    zero_stage: int
    dtype: str
    params: ParamCounts
    micro_batch: int
    seq_len: int
    terms: dict[str, int] = field(default_factory=dict)  # name -> bytes per GPU
    flops_per_token: dict[str, float] = field(default_factory=dict)  # forward FLOPs per token, by part
    gpu_memory: int | None = None
    headroom: float = 0.1

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def optimizer_bytes(self) -> int:
        return self.terms["optimizer (dense)"] + self.terms["optimizer (experts)"]

    def fits(self) -> bool:
        return self.gpu_memory is None or self.total <= self.gpu_memory * (1 - self.headroom)

    def table(self) -> str:
        """The per-GPU table `--check` and `mmoe-ds plan` print."""
        p = self.params
        lines = [f"memory plan per GPU: {self.world_size} GPUs, expert-parallel {self.ep_size}, "
                 f"ZeRO-{self.zero_stage}, "
                 f"{self.dtype}, micro batch {self.micro_batch} x {self.seq_len} tokens",
                 f"  parameters: {human_count(p.total)} in all ({human_count(p.expert_trained + p.expert_frozen)} in "
                 f"experts, {human_count(p.vision)} vision), {human_count(p.dense_frozen + p.expert_frozen)} frozen"]
        width = max(len(k) for k in self.terms)
        for name, value in self.terms.items():
            lines.append(f"  {name:<{width}}  {human_bytes(value):>11}")
        verdict = ""
        if self.gpu_memory:
            verdict = (f" of {human_bytes(self.gpu_memory)} ({'fits' if self.fits() else 'does NOT fit'}, "
                       f"{self.headroom:.0%} kept for buffers)")
        lines.append(f"  {'total':<{width}}  {human_bytes(self.total):>11}{verdict}")
        f = self.flops_per_token
        lines.append("  forward FLOPs per token: " + ", ".join(f"{k} {human_count(v)}" for k, v in f.items())
                     + f"; a training step ≈ 3x forward = {human_count(3 * sum(f.values()))}")
        return "\n".join(lines)

    def refusal(self) -> str:
        """One line: the largest term and two ways out."""
        name, value = max(self.terms.items(), key=lambda kv: kv[1])
        return (f"the plan needs {human_bytes(self.total)} per GPU but the GPU has {human_bytes(self.gpu_memory)} "
                f"({self.headroom:.0%} kept for buffers); the largest term is {name} ({human_bytes(value)}): "
                f"raise the ZeRO stage (now {self.zero_stage}; stage 2 also partitions the gradients over the "
                f"data-parallel GPUs) or spread the experts over more GPUs (expert-parallel size now {self.ep_size} "
                f"of {self.world_size} processes: a larger expert-parallel size or more processes divide each GPU's "
                f"experts), or shrink the micro batch / sequence (activations).")


def activation_bytes(config, micro_batch: int, seq_len: int, dtype_bytes: int) -> dict[str, int]:
    """Activations backward keeps per micro batch, by part (no activation checkpointing).

    Per decoder layer with b·s tokens, width h, q/k/v widths (heads·head_dim, 2·kv_heads·head_dim), a heads:
      attention: the norm's input and output (2h), qkv output (q + 2kv), the attention output and the
                 o_proj input (2·q), and eager softmax scores + probabilities (2·a·s per token, fp32);
      dense FFN: norm in/out (2h), w1 and w3 outputs, silu output, their product (4·f);
      MoE FFN:   norm in/out (2h), router logits and probabilities (2·E, fp32), and per kept route the
                 gathered input (h), w1/w3/silu/product (4·f_moe) and the expert output (h), with
                 max top-k routes per token (dropless upper bound; capacity padding adds up to cf×).
    Plus the embeddings, final norm and the logits (vocab, fp32 for the loss). A frozen vision tower
    keeps nothing (no gradient flows into it); its projector keeps its input and hidden (2 widths).
    """
    tokens = micro_batch * seq_len
    h, a = config.hidden_size, config.num_attention_heads
    hd = config.attention_head_dim
    q, kv = a * hd, 2 * config.num_key_value_heads * hd
    rc = config.router_config()
    k = rc.max_top_k
    attention = dense = moe = 0
    for i in range(config.num_hidden_layers):
        attention += tokens * ((2 * h + q + kv + 2 * q) * dtype_bytes + 2 * a * seq_len * 4)
        if config.is_moe_layer(i):
            f = config.moe_intermediate_size
            moe += tokens * (2 * h * dtype_bytes + 2 * config.num_local_experts * 4 + k * (2 * h + 4 * f) * dtype_bytes)
        else:
            dense += tokens * (2 * h + 4 * config.intermediate_size) * dtype_bytes
    other = tokens * (3 * h * dtype_bytes + config.vocab_size * (dtype_bytes + 4))
    out = {"attention": attention, "dense FFN": dense, "MoE FFN": moe, "embeddings + logits": other}
    if config.vision_encoder == "hf":
        from ..model.vision import patch_grid

        width = patch_grid(config.vision_config)[2]
        out["vision projector"] = tokens * (width + h) * dtype_bytes  # upper bound: every token an image token
    return out


def forward_flops_per_token(config, counts: ParamCounts, seq_len: int) -> dict[str, float]:
    """2 FLOPs per multiply-add: dense weights (embeddings excluded), the active experts (top-k of E
    per MoE layer), attention scores and values (2·2·s·q per layer, causal: half), the vision tower
    once per image token (its parameters, upper bound)."""
    rc = config.router_config()
    embed = config.vocab_size * config.hidden_size  # a lookup, no FLOPs
    dense = counts.dense_trained + counts.dense_frozen - counts.vision - embed
    if config.position_embedding_type == "learned":
        dense -= config.max_position_embeddings * config.hidden_size
    experts = counts.expert_trained + counts.expert_frozen
    active = experts * rc.max_top_k / config.num_local_experts
    q = config.num_attention_heads * config.attention_head_dim
    attention = config.num_hidden_layers * 2 * 2 * seq_len * q / 2
    out = {"dense": 2.0 * dense, "active experts": 2.0 * active, "attention": float(attention)}
    if counts.vision:
        out["vision"] = 2.0 * counts.vision
    return out


def plan_run(model_kwargs: dict, ds_config: dict, world_size: int, ep_size: int, micro_batch: int, seq_len: int,
             freeze: list[str] | None = None, gpu_memory: int | None = None, headroom: float = 0.1) -> Plan:
    """The per-GPU memory plan (see the module docstring)."""
    from ..model import MmoeConfig

    if world_size % ep_size:
        raise ConfigError(f"expert_parallel_size={ep_size} must divide the {world_size} processes.")
    config = MmoeConfig(**dict(model_kwargs, moe_backend="torch", ep_size=1))
    counts = count_parameters(model_kwargs, freeze)
    dtype = precision(ds_config)
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    pb = 4 if dtype == "fp32" else 2
    dp_dense = world_size if stage >= 1 else 1
    dp_expert = world_size // ep_size if stage >= 1 else 1
    per_param_state = 8 + (4 if (stage >= 1 or dtype != "fp32") else 0)  # moments + fp32 master

    def grads(n: float, dp: int) -> int:
        return int(n * pb / (dp if stage >= 2 else 1) + (n * 4 / dp if stage >= 1 else 0))

    dense_all = counts.dense_trained + counts.dense_frozen
    expert_local = (counts.expert_trained + counts.expert_frozen) / ep_size
    expert_trained_local = counts.expert_trained / ep_size
    plan = Plan(world_size=world_size, ep_size=ep_size, zero_stage=stage, dtype=dtype, params=counts,
                micro_batch=micro_batch, seq_len=seq_len, gpu_memory=gpu_memory, headroom=headroom)
    plan.terms = {
        "weights (dense)": int(dense_all * pb),
        "weights (experts)": int(expert_local * pb),
        "gradients (dense)": grads(counts.dense_trained, dp_dense),
        "gradients (experts)": grads(expert_trained_local, dp_expert),
        "optimizer (dense)": int(counts.dense_trained * per_param_state / dp_dense),
        "optimizer (experts)": int(expert_trained_local * per_param_state / dp_expert),
    }
    for name, value in activation_bytes(config, micro_batch, seq_len, pb).items():
        plan.terms[f"activations: {name}"] = int(value)
    plan.flops_per_token = forward_flops_per_token(config, counts, seq_len)
    return plan


def recipe_model_kwargs(recipe) -> tuple[dict | None, str]:
    """The model a recipe will build, without building data or loading weights: train.init_from's
    config.json (with the recipe's overrides), else the recipe's model section with the prepared
    dataset's processor. Returns (kwargs, "") or (None, why the plan cannot be made yet)."""
    from pathlib import Path

    from .data_plan import load_processor, processor_model_kwargs

    path = recipe.train.init_from
    if path:
        if not (Path(path) / "config.json").is_file():
            return None, f"no memory plan yet: it needs {path}/config.json (run `mmoe-ds upcycle` first)"
        from .checks import init_model_kwargs
        from .init_from import read_init_source

        return init_model_kwargs(recipe, read_init_source(path, need_weights=False)), ""
    if not (Path(recipe.data.dir) / "processor").is_dir():
        return None, f"no memory plan yet: it needs the prepared dataset's processor ({recipe.data.dir}/processor)"
    return processor_model_kwargs(recipe.model, load_processor(recipe.data)), ""


def plan_recipe(recipe, ds_config: dict, world_size: int, gpu_memory: int | None = None) -> tuple[Plan | None, str]:
    """The plan of a recipe's run on `world_size` GPUs, or (None, why not yet)."""
    kwargs, why = recipe_model_kwargs(recipe)
    if kwargs is None:
        return None, why
    t = recipe.train
    return plan_run(kwargs, ds_config, world_size, t.expert_parallel_size, recipe.micro_batch_size,
                    recipe.data.max_length, freeze=t.freeze, gpu_memory=gpu_memory), ""


def print_plan(recipe, ds_config: dict, world_size: int, gpu_memory: str | None, prog: str,
               not_yet_ok: bool) -> int:
    """Print the plan's table. Returns 2 after one line on stderr when the plan cannot fit
    `gpu_memory` or the configuration is wrong; when the plan cannot be made yet (no init_from
    config, no prepared data) says why, on stdout with rc 0 if `not_yet_ok` (`--check`), else rc 2."""
    import sys

    try:
        plan, why = plan_recipe(recipe, ds_config, world_size, parse_bytes(gpu_memory) if gpu_memory else None)
    except ConfigError as e:
        print(f"{prog}: configuration error: {e}", file=sys.stderr)
        return 2
    if plan is None:
        print(why if not_yet_ok else f"{prog}: {why}", file=sys.stdout if not_yet_ok else sys.stderr)
        return 0 if not_yet_ok else 2
    print(plan.table())
    if not plan.fits():
        print(f"{prog}: configuration error: does not fit: {plan.refusal()}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`mmoe-ds plan RECIPE DS_CONFIG --world_size N [--gpu-memory 80GB]`: the table; exit 2 if it cannot fit."""
    import argparse
    import sys

    from ..config.recipe import Recipe, load_ds_config, validate_launch

    parser = argparse.ArgumentParser(prog="mmoe-ds plan", description="Per-GPU memory and FLOPs of a run.")
    parser.add_argument("recipe")
    parser.add_argument("deepspeed_config")
    parser.add_argument("--world_size", "--world-size", type=int, required=True)
    parser.add_argument("--gpu-memory", default=None, help="e.g. 80GB (H100), 141GB (H200); refuses what cannot fit")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = Recipe.load(args.recipe)
        ds_config = validate_launch(recipe, load_ds_config(args.deepspeed_config), args.deepspeed_config,
                                    args.world_size)
    except ConfigError as e:
        print(f"mmoe-ds plan: configuration error: {e}", file=sys.stderr)
        return 2
    return print_plan(recipe, ds_config, args.world_size, args.gpu_memory, "mmoe-ds plan", not_yet_ok=False)
