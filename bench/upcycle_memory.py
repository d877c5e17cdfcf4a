"""Peak memory of `mmoe-ds upcycle` on a generated Qwen2-shaped bf16 checkpoint (issue 22, acceptance 2).

    python bench/upcycle_memory.py [--layers 24] [--shards 3] [--experts 4] [--dtype bfloat16]
                                   [--workdir /tmp] [--keep]

Writes a Qwen2-0.5B-shaped checkpoint (hidden 896, FFN 4864, 24 layers, 14 heads / 2 KV heads,
vocab 151936, tied embeddings: 494M parameters) with random bf16 weights, shard by shard (only one
shard in memory), in --shards safetensors files with model.safetensors.index.json, plus a small
word-level tokenizer; then runs `mmoe-ds upcycle` on it in a child process and reads that process's
peak resident memory (VmHWM). The child first upcycles a tiny checkpoint of the same shape family
(every import, the tokenizer library, the model code: the fixed cost), takes its resident memory as
the baseline, resets the peak (/proc/self/clear_refs) and then upcycles the big one: the growth is
peak - baseline, compared with the bound (largest input shard + 1 GB). Prints a table and one JSON
line. Everything is written under --workdir and deleted afterwards (unless --keep).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6, tie_word_embeddings=True)
GB = 10**9
MB = 10**6


def qwen2_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Qwen2ForCausalLM's weights in the order save_pretrained writes them."""
    d, f, heads, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], \
        cfg["num_key_value_heads"]
    hd = d // heads
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (heads * hd, d)), (p + "self_attn.q_proj.bias", (heads * hd,)),
                (p + "self_attn.k_proj.weight", (kv * hd, d)), (p + "self_attn.k_proj.bias", (kv * hd,)),
                (p + "self_attn.v_proj.weight", (kv * hd, d)), (p + "self_attn.v_proj.bias", (kv * hd,)),
                (p + "self_attn.o_proj.weight", (d, heads * hd)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f)), (p + "post_attention_layernorm.weight", (d,))]
    out.append(("model.norm.weight", (d,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], d)))
    return out


def write_tokenizer(folder: Path, words: int = 200) -> None:
    """A word-level fast tokenizer (Qwen2's special tokens + `words` words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}
    names = list(dict.fromkeys(specials.values())) + [f"w{i}" for i in range(words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(folder)


def write_checkpoint(folder: Path, cfg: dict, shards: int, seed: int = 0) -> dict:
    """A Qwen2ForCausalLM folder with random bf16 weights in `shards` safetensors files (index included),
    written one shard at a time. Returns: {"parameters", "bytes", "largest_shard", "shards"}."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    config = Qwen2Config(**cfg, bos_token_id=None, eos_token_id=1, initializer_range=0.02)
    config.architectures = ["Qwen2ForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    tensors = qwen2_tensors(cfg)
    total = sum(torch.Size(s).numel() for _, s in tensors) * 2
    target = -(-total // shards)
    groups, current, size = [], [], 0
    for name, shape in tensors:  # consecutive tensors, about total/shards bytes per file
        current.append((name, shape))
        size += torch.Size(shape).numel() * 2
        if size >= target and len(groups) < shards - 1:
            groups.append(current)
            current, size = [], 0
    groups.append(current)
    g = torch.Generator().manual_seed(seed)
    weight_map, sizes = {}, []
    for k, group in enumerate(groups):
        filename = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, shape in group:
            if len(shape) == 1 and "norm" in name:
                shard[name] = (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            else:
                shard[name] = (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            weight_map[name] = filename
        save_file(shard, folder / filename, metadata={"format": "pt"})
        sizes.append((folder / filename).stat().st_size)
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"parameters": total // 2, "bytes": total, "largest_shard": max(sizes), "shards": len(groups)}


CHILD = r"""
import json, sys
from pathlib import Path

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

tiny, big, out, flags = json.loads(sys.argv[1])
from mmoe_ds.cli import main
assert main(["upcycle", "--lm", tiny, "--out", out + ".warmup", *flags]) == 0
baseline = status("VmRSS")
try:
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current resident size
    reset = True
except OSError:
    reset = False
assert main(["upcycle", "--lm", big, "--out", out, *flags]) == 0
print("RESULT " + json.dumps({"baseline_rss": baseline, "peak_rss": status("VmHWM"), "peak_reset": reset}))
"""


def measure_upcycle(tiny: Path, big: Path, out: Path, flags: list[str], timeout: float = 3600) -> dict:
    """Run `mmoe-ds upcycle` in a child process (after a warm-up on `tiny`).
    Returns: {"baseline_rss", "peak_rss", "growth", "peak_reset", "seconds"} (bytes, seconds)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(tiny), str(big), str(out), flags])],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"mmoe-ds upcycle failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result.update(growth=result["peak_rss"] - result["baseline_rss"], seconds=seconds)
    return result


def run(cfg: dict, shards: int, flags: list[str], workdir: Path, keep: bool = False) -> dict:
    """Generate the checkpoint (and the tiny warm-up one), upcycle it in a child, measure. Returns one row."""
    root = Path(tempfile.mkdtemp(prefix="upcycle_memory.", dir=workdir))
    try:
        write_checkpoint(root / "tiny", TINY, shards=1)
        info = write_checkpoint(root / "lm", cfg, shards)
        result = measure_upcycle(root / "tiny", root / "lm", root / "moe", flags)
        out_bytes = sum(p.stat().st_size for p in (root / "moe").glob("*.safetensors"))
        bound = info["largest_shard"] + GB
        return {**info, **result, "output_bytes": out_bytes, "bound": bound, "within_bound": result["growth"] < bound,
                "flags": flags}
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    """Parse the flags, run once, print the table and the JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=QWEN2_05B["num_hidden_layers"])
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = p.parse_args()
    cfg = dict(QWEN2_05B, num_hidden_layers=args.layers)
    flags = ["--experts", str(args.experts), "--top-k", "2", "--dtype", args.dtype]
    row = run(cfg, args.shards, flags, Path(args.workdir), args.keep)
    print("| parameters | checkpoint | shards | largest shard | MoE output | peak RSS growth | bound (shard + 1 GB) "
          "| within | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['parameters'] / 1e6:.0f}M | {row['bytes'] / GB:.2f} GB | {row['shards']} | "
          f"{row['largest_shard'] / GB:.2f} GB | {row['output_bytes'] / GB:.2f} GB | {row['growth'] / GB:.2f} GB | "
          f"{row['bound'] / GB:.2f} GB | {'yes' if row['within_bound'] else 'NO'} | {row['seconds']:.0f} |")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
