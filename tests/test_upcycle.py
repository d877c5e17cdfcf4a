"""`mmoe-ds upcycle`: a dense HF Llama-family LM becomes an MoE model that computes the same text logits.

The dense models are tiny random transformers models built from their own configs here (Llama with
grouped-query attention, a non-default rope_theta and linear RoPE scaling; Qwen2 with q/k/v biases
and tied embeddings; Mistral with a sliding window shorter than the sequence), saved with
`save_pretrained` together with a tokenizer made the way users make one (`tokenizers` WordLevel
wrapped in `PreTrainedTokenizerFast`). The reference is the dense model itself, run by
transformers: logits, greedy generation with a KV cache, and an incremental forward.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmoe_ds.export.upcycle import UpcycleError, UpcycleOptions, main, upcycle
from mmoe_ds.model import MmoeForCausalLM
from mmoe_ds.moe.experts import per_expert_names

WORDS = [f"w{i}" for i in range(40)]
TOL = 1e-5
# transformers >= 5.2x names the KV cache `cache` (argument and output field), earlier `past_key_values`
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def save_tokenizer(folder, specials: dict[str, str], words=WORDS, vocab: dict[str, int] | None = None):
    """A WordLevel tokenizer over `specials` + `words` (ids in that order unless `vocab` is given)."""
    names = list(dict.fromkeys(specials.values())) + list(words)
    vocab = vocab or {w: i for i, w in enumerate(names)}
    unk = specials.get("unk_token", names[0])
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.save_pretrained(folder)
    return len(vocab)


LLAMA_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
QWEN_SPECIALS = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}


def dense_llama(folder, **kw):
    n = save_tokenizer(folder, LLAMA_SPECIALS)
    config = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def dense_qwen2(folder):
    n = save_tokenizer(folder, QWEN_SPECIALS)
    config = Qwen2Config(vocab_size=n + 6, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64, rope_theta=1e6,
                         initializer_range=0.2, tie_word_embeddings=True, bos_token_id=None, eos_token_id=1)
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random q/k/v biases, so a dropped bias cannot pass unnoticed
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    return model


def dense_mistral(folder):
    n = save_tokenizer(folder, LLAMA_SPECIALS)
    config = MistralConfig(vocab_size=n, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           sliding_window=4, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(2)
    model = MistralForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


DENSE = {"llama": (dense_llama, dict(experts=4, top_k=2, moe_layers=[0, 2])),
         "qwen2": (dense_qwen2, dict(experts=3, top_k=3, moe_layer_frequency=1)),
         "mistral": (dense_mistral, dict(experts=2, top_k=2, moe_layer_frequency=2))}


def token_ids(vocab_size_limit: int, seed: int, shape=(2, 12)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size_limit, shape, generator=g)


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    """{name: (dense HF model, upcycled MoE model loaded back from its folder, the folder)}, built once."""
    built = {}
    for name, (build, opts) in DENSE.items():
        root = tmp_path_factory.mktemp(name)
        dense = build(root / "dense")
        upcycle(root / "dense", root / "moe", UpcycleOptions(**opts))
        built[name] = dense, MmoeForCausalLM.from_pretrained(root / "moe").eval(), root / "moe"
    return built


@pytest.fixture(params=sorted(DENSE))
def pair(request, upcycled):
    """(name, dense HF model, upcycled MoE model, its folder)."""
    return (request.param, *upcycled[request.param])


def test_text_logits_equal_the_dense_model(pair):
    name, dense, moe, _ = pair
    ids = token_ids(40, seed=3)
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        got = moe(input_ids=ids, use_cache=False).logits
    V = dense.config.vocab_size
    image_id = moe.config.image_token_id
    others = [i for i in range(V) if i != image_id]  # the <image> row is new (or a re-initialised padding row)
    diff = (got[..., others] - expected[..., others]).abs().max().item()
    print(f"{name}: max |logit difference| {diff:.2e} over logits up to {expected.abs().max().item():.2f}")
    assert expected.abs().max() > 1.0  # logits large enough for 1e-5 to mean something
    assert diff < TOL
    assert moe.model.layers[0].attn.num_kv_heads == dense.config.num_key_value_heads


def test_greedy_generation_with_kv_cache_and_incremental_logits_match(pair):
    name, dense, moe, _ = pair
    prompt = token_ids(40, seed=4, shape=(2, 5))
    # Over the dense tokenizer's tokens: ids it does not have (Qwen2's padding rows, one of which
    # becomes <image> with a new row) are never generated.
    n_tokens = moe.config.image_token_id
    common = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                  suppress_tokens=list(range(n_tokens, moe.config.vocab_size)))
    with torch.no_grad():
        assert torch.equal(moe.generate(input_ids=prompt, **common), dense.generate(input_ids=prompt, **common))
        # incremental: the prompt, then one token at a time from the cache, against the dense model's own cache
        ids = token_ids(40, seed=5, shape=(2, 10))
        out_moe = moe(input_ids=ids[:, :4], use_cache=True)
        out_dense = dense(input_ids=ids[:, :4], use_cache=True)
        cache_moe, cache_dense = getattr(out_moe, CACHE), getattr(out_dense, CACHE)
        worst = 0.0
        for t in range(4, 10):
            step_moe = moe(input_ids=ids[:, t:t + 1], use_cache=True, **{CACHE: cache_moe})
            step_dense = dense(input_ids=ids[:, t:t + 1], use_cache=True, **{CACHE: cache_dense})
            cache_moe, cache_dense = getattr(step_moe, CACHE), getattr(step_dense, CACHE)
            worst = max(worst, (step_moe.logits[..., :40] - step_dense.logits[..., :40]).abs().max().item())
        full = moe(input_ids=ids, use_cache=False).logits[:, -1, :40]
    print(f"{name}: incremental max |logit difference| {worst:.2e}")
    assert worst < TOL
    assert (full - step_moe.logits[:, -1, :40]).abs().max() < TOL


def test_upcycled_folder_layout_and_mapping(pair):
    name, dense, moe, out = pair
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "modeling_mmoe.py", "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["position_embedding_type"] == "rope" and config["modality_embedding"] is False
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mmoe.MmoeForCausalLM"
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == config["image_token_id"]
    n_tokens = 43  # 3 specials (Qwen2: 2) + 40 words
    if name == "qwen2":  # 42 tokens in 48 rows: <image> takes the first free padding row, no resize
        assert (image_id, config["vocab_size"], config["tie_word_embeddings"]) == (42, 48, True)
        assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    else:  # 43 tokens in 43 rows: one row added
        assert (image_id, config["vocab_size"]) == (n_tokens, n_tokens + 1)
    emb = dense.model.embed_tokens.weight
    real = emb[: image_id].mean(0)  # the tokenizer's tokens are ids 0..image_id-1 here
    torch.testing.assert_close(moe.model.embed_tokens.weight[image_id], real, rtol=0, atol=1e-6)
    layer = 0 if name != "mistral" else 1
    ffn = moe.model.layers[layer].ffn.deepspeed_moe
    assert torch.count_nonzero(ffn.gate.wg.weight) == 0
    mlp = dense.model.layers[layer].mlp
    for e in range(ffn.experts.num_local_experts):
        expert = ffn.experts.expert(e)  # views into the 3-D w13 / w2 the model holds
        assert torch.equal(expert["w1"], mlp.gate_proj.weight) and torch.equal(expert["w3"], mlp.up_proj.weight)
        assert torch.equal(expert["w2"], mlp.down_proj.weight)
    with safe_open(out / "model.safetensors", framework="pt") as f:  # on disk: per-expert names, as always
        names = set(f.keys())
    prefix = f"model.layers.{layer}.ffn.deepspeed_moe.experts."
    assert {n for n in names if n.startswith(prefix)} == set(per_expert_names(prefix, ffn.experts.num_local_experts))


def run_without_mmoe_ds(tmp_path, runs: list[tuple]) -> list[torch.Tensor]:
    """Logits of each (folder, inputs) in one Python where neither mmoe_ds nor DeepSpeed can be imported:
    the folders' remote code alone (their processors are loaded too)."""
    torch.save(runs, tmp_path / "runs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["deepspeed"] = None   # any import of these now raises ImportError
        sys.modules["mmoe_ds"] = None
        from transformers import AutoModelForCausalLM, AutoProcessor
        results = []
        for folder, inputs in torch.load({str(tmp_path / 'runs.pt')!r}):
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
            with torch.no_grad():
                results.append(model(**inputs).logits)
        torch.save(results, {str(tmp_path / 'out.pt')!r})
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def test_upcycled_folders_load_without_mmoe_ds_or_deepspeed(upcycled, tmp_path):
    """The folders' remote code (RoPE scaling through transformers' own functions, GQA, biases, tied
    embeddings, sliding window) runs where neither mmoe_ds nor DeepSpeed can be imported, and still
    gives the dense models' logits."""
    ids = token_ids(40, seed=7)
    names = sorted(upcycled)
    logits = run_without_mmoe_ds(tmp_path, [(str(upcycled[n][2]), {"input_ids": ids}) for n in names])
    for name, got in zip(names, logits):
        with torch.no_grad():
            expected = upcycled[name][0](input_ids=ids).logits[..., :40]
        assert (got[..., :40] - expected).abs().max() < TOL, name


ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 8},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "longrope": {"rope_type": "longrope", "long_factor": [1.0, 2.0, 3.0, 4.0], "short_factor": [1.0, 1.1, 1.2, 1.3],
                 "original_max_position_embeddings": 8},
}


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_rope_scalings_follow_transformers(tmp_path, kind):
    """Each HF RoPE scaling, at a length inside and one beyond max_position_embeddings (where dynamic
    and longrope change their frequencies)."""
    n = save_tokenizer(tmp_path / "dense", LLAMA_SPECIALS)
    kw = dict(vocab_size=n, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=20, rope_theta=300.0, initializer_range=0.2,
              bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(rope_scaling=ROPE_SCALINGS[kind], **kw)).eval()
    dense.save_pretrained(tmp_path / "dense")
    unscaled = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    unscaled.load_state_dict(dense.state_dict())
    upcycle(tmp_path / "dense", tmp_path / "moe", UpcycleOptions(experts=2, top_k=2))
    moe = MmoeForCausalLM.from_pretrained(tmp_path / "moe").eval()
    scaling_effect = 0.0
    for length in (10, 30):
        ids = token_ids(40, seed=9, shape=(2, length))
        with torch.no_grad():
            expected = dense(input_ids=ids).logits
            scaling_effect = max(scaling_effect, (unscaled(input_ids=ids).logits - expected).abs().max().item())
            assert (moe(input_ids=ids).logits[..., :n] - expected).abs().max() < TOL
    assert scaling_effect > 1e-3  # the scaling changes the dense model's logits at these lengths


def test_top1_is_not_function_preserving_and_noise_makes_experts_differ(tmp_path):
    """The equality above depends on the top-k renormalisation: top-1 scales the block by 1/E."""
    dense = dense_llama(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "top1", UpcycleOptions(experts=4, top_k=1, moe_layers=[1]))
    upcycle(tmp_path / "dense", tmp_path / "noisy", UpcycleOptions(experts=4, top_k=2, moe_layers=[1], noise=0.01))
    ids = token_ids(40, seed=6)
    top1 = MmoeForCausalLM.from_pretrained(tmp_path / "top1").eval()
    noisy = MmoeForCausalLM.from_pretrained(tmp_path / "noisy").eval()
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        assert (top1(input_ids=ids).logits[..., :43] - expected).abs().max() > 1e-2
        diff = (noisy(input_ids=ids).logits[..., :43] - expected).abs().max()
    assert 1e-6 < diff < 0.5
    experts = noisy.model.layers[1].ffn.deepspeed_moe.experts
    assert not torch.equal(experts.expert(0)["w1"], experts.expert(1)["w1"])


def test_noise_magnitude_is_relative_to_each_weight(tmp_path):
    """`--noise` is a standard deviation relative to each weight's own: for every expert weight, std(expert -
    dense) / std(dense) is within 10% of it, with weights whose scales differ by 100x (so neither an
    absolute std nor one shared scale passes), mean ~0, and each expert drawn independently."""
    dense = dense_llama(tmp_path / "plain")
    scales = {"gate_proj": 1.0, "up_proj": 10.0, "down_proj": 0.1}
    with torch.no_grad():
        for layer in dense.model.layers:
            for name, scale in scales.items():
                getattr(layer.mlp, name).weight.mul_(scale)
    dense.save_pretrained(tmp_path / "dense")
    save_tokenizer(tmp_path / "dense", LLAMA_SPECIALS)
    noise = 0.05
    upcycle(tmp_path / "dense", tmp_path / "moe", UpcycleOptions(experts=4, top_k=2, moe_layers=[0, 2], noise=noise))
    moe = MmoeForCausalLM.from_pretrained(tmp_path / "moe")
    checked = 0
    for i in (0, 2):
        experts = moe.model.layers[i].ffn.deepspeed_moe.experts
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            w = getattr(dense.model.layers[i].mlp, theirs).weight.detach().double()
            deltas = [(experts.expert(e)[ours].detach().double() - w).flatten()
                      for e in range(experts.num_local_experts)]
            for delta in deltas:
                assert delta.std() / w.std() == pytest.approx(noise, rel=0.1), (i, ours)
                assert abs(delta.mean()) < 0.2 * noise * w.std()
                checked += 1
            correlation = torch.corrcoef(torch.stack(deltas))
            assert (correlation - torch.eye(len(deltas), dtype=correlation.dtype)).abs().max() < 0.15
    assert checked == 2 * 3 * 4
    assert torch.equal(moe.model.layers[1].ffn.w1.weight, dense.model.layers[1].mlp.gate_proj.weight)


def test_a_sharded_bf16_checkpoint_as_hub_lms_ship(tmp_path):
    """Hub LMs come in bf16 and in several safetensors shards with an index; upcycling reads them like
    transformers does: the upcycled fp32 model equals the dense one loaded from the same files."""
    dense_llama(tmp_path / "fp32")
    shipped = LlamaForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    shipped.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    save_tokenizer(tmp_path / "dense", LLAMA_SPECIALS)
    shards = sorted(p.name for p in (tmp_path / "dense").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "dense" / "model.safetensors.index.json").is_file()
    upcycle(tmp_path / "dense", tmp_path / "moe", UpcycleOptions(experts=4, top_k=2, moe_layers=[0, 2]))
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    moe = MmoeForCausalLM.from_pretrained(tmp_path / "moe").eval()
    ids = token_ids(40, seed=9)
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        got = moe(input_ids=ids, use_cache=False).logits[..., :expected.shape[-1]]
    image_id = moe.config.image_token_id
    others = [i for i in range(expected.shape[-1]) if i != image_id]
    assert (got[..., others] - expected[..., others]).abs().max() < TOL


def test_cli_writes_the_folder_and_prints_a_summary(tmp_path, capsys):
    dense_llama(tmp_path / "dense")
    rc = main(["--lm", str(tmp_path / "dense"), "--experts", "2", "--top-k", "2", "--moe-layers", "1",
               "--router-init", "normal", "--dtype", "bfloat16", "--out", str(tmp_path / "out")])
    assert rc == 0
    assert "MoE layers [1]" in capsys.readouterr().out
    moe = MmoeForCausalLM.from_pretrained(tmp_path / "out")
    assert moe.model.layers[1].ffn.deepspeed_moe.gate.wg.weight.abs().max() > 0
    assert moe.config.dtype in (torch.bfloat16, "bfloat16")


# -- bad input: one line naming the problem and the fix, nothing written ----------------------------------------

def run_cli_error(capsys, tmp_path, argv) -> str:
    capsys.readouterr()  # what building the inputs printed
    rc = main(argv + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    return err


def test_unsupported_architecture_is_named(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    save_tokenizer(tmp_path / "gpt2", LLAMA_SPECIALS)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=43)).save_pretrained(tmp_path / "gpt2")
    err = run_cli_error(capsys, tmp_path, ["--lm", str(tmp_path / "gpt2"), "--experts", "2"])
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err


def test_missing_folder_and_bad_expert_count_are_named(tmp_path, capsys):
    err = run_cli_error(capsys, tmp_path, ["--lm", str(tmp_path / "nowhere"), "--experts", "2"])
    assert "config.json" in err and "hf download" in err
    dense_llama(tmp_path / "dense")
    err = run_cli_error(capsys, tmp_path, ["--lm", str(tmp_path / "dense"), "--experts", "2", "--top-k", "3"])
    assert "top_k" in err and "--top-k" in err


def test_tokenizer_without_room_for_image_token(tmp_path, capsys):
    dense_llama(tmp_path / "dense")  # 43 tokens fill the 43 embedding rows
    err = run_cli_error(capsys, tmp_path, ["--lm", str(tmp_path / "dense"), "--experts", "2", "--no-resize"])
    assert "--no-resize" in err and "43 rows" in err


def test_image_token_already_an_ordinary_word(tmp_path, capsys):
    folder = tmp_path / "dense"
    dense_llama(folder)
    save_tokenizer(folder, LLAMA_SPECIALS, words=WORDS[:-1] + ["<image>"])  # the BPE/word list learned "<image>"
    err = run_cli_error(capsys, tmp_path, ["--lm", str(folder), "--experts", "2"])
    assert "'<image>'" in err and "ordinary text token" in err and "id 42" in err


def test_image_token_id_colliding_with_an_existing_token(tmp_path, capsys):
    folder = tmp_path / "dense"
    dense_llama(folder)
    # ids with a hole: 43 entries, the last word at id 43, so the next free id by count (43) is taken
    names = list(LLAMA_SPECIALS.values()) + WORDS
    vocab = {w: i for i, w in enumerate(names)}
    vocab[WORDS[-1]] = 43
    save_tokenizer(folder, LLAMA_SPECIALS, vocab=vocab)
    err = run_cli_error(capsys, tmp_path, ["--lm", str(folder), "--experts", "2"])
    assert "<image>" in err and WORDS[-1] in err and "not contiguous" in err


def test_unsupported_llama_variant_is_named(tmp_path, capsys):
    dense_llama(tmp_path / "dense", mlp_bias=True)
    err = run_cli_error(capsys, tmp_path, ["--lm", str(tmp_path / "dense"), "--experts", "2"])
    assert "mlp_bias" in err


def test_options_are_validated_before_anything_is_read(tmp_path):
    with pytest.raises(UpcycleError, match="--router-init"):
        upcycle(tmp_path, tmp_path / "out", UpcycleOptions(experts=2, router_init="uniform"))
    with pytest.raises(UpcycleError, match=r"--noise: a standard deviation >= 0, got -0.01"):
        upcycle(tmp_path, tmp_path / "out", UpcycleOptions(experts=2, noise=-0.01))


def test_each_norm_is_copied_from_its_own_dense_norm(tmp_path):
    """Fresh dense models have every RMSNorm weight 1, so a norm copied from the wrong place would go
    unseen: with random norm weights the upcycled model's text logits still equal the dense model's."""
    dense = dense_llama(tmp_path / "plain")
    torch.manual_seed(5)
    with torch.no_grad():
        for module in dense.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)
    dense.save_pretrained(tmp_path / "dense")
    save_tokenizer(tmp_path / "dense", LLAMA_SPECIALS)
    upcycle(tmp_path / "dense", tmp_path / "moe", UpcycleOptions(experts=4, top_k=2, moe_layers=[0, 2]))
    moe = MmoeForCausalLM.from_pretrained(tmp_path / "moe").eval()
    ids = token_ids(40, seed=11)
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        got = moe(input_ids=ids, use_cache=False).logits[..., :expected.shape[-1]]
    others = [i for i in range(expected.shape[-1]) if i != moe.config.image_token_id]
    assert (got[..., others] - expected[..., others]).abs().max() < TOL


# -- with a vision tower -----------------------------------------------------------------------------------------

def save_siglip(folder):
    """A tiny random SiglipVisionModel with its image processor, as `save_pretrained` writes them."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(3)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=16, patch_size=4))
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return model


def test_vision_upcycle_keeps_text_logits_and_loads_the_tower(tmp_path):
    from PIL import Image

    from mmoe_ds.data.processor import MmoeProcessor

    dense = dense_llama(tmp_path / "dense")
    siglip = save_siglip(tmp_path / "siglip")
    rc = main(["--lm", str(tmp_path / "dense"), "--vision", str(tmp_path / "siglip"), "--experts", "2",
               "--moe-layers", "1,2", "--projector", "linear", "--vision-max-tokens", "4",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["vision_encoder"], config["vision_projector"], config["vision_max_tokens"]) == ("hf", "linear", 4)
    assert config["vision_config"]["model_type"] == "siglip_vision_model" and config["freeze_vision_tower"] is True
    assert (tmp_path / "out" / "preprocessor_config.json").is_file() and (tmp_path / "out" / "vision.py").is_file()
    moe = MmoeForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not hasattr(moe.model, "patch_embed")
    tower = moe.model.vision.encoder.state_dict()
    for name, tensor in siglip.state_dict().items():  # the pretrained encoder, weight for weight
        if name in tower:
            assert torch.equal(tower[name], tensor), name
    assert sum(n in tower for n in siglip.state_dict()) >= 10
    processor = MmoeProcessor.from_pretrained(tmp_path / "out")
    batch = processor(images=[Image.new("RGB", (20, 30), "red"), None], texts=["w1 w2 w3", "w4 w5"])
    assert int((batch["input_ids"][0] == moe.config.image_token_id).sum()) == 4  # 4x4 patches pooled to 2x2
    with torch.no_grad():
        out = moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"], labels=batch["labels"])
        assert torch.isfinite(out.loss)
        ids = token_ids(40, seed=8)
        diff = (moe(input_ids=ids).logits[..., :43] - dense(input_ids=ids).logits).abs().max()
    assert diff < TOL
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    [bare] = run_without_mmoe_ds(tmp_path, [(str(tmp_path / "out"), inputs)])  # the tower travels with the folder
    assert (bare - out.logits).abs().max() < TOL


def test_vision_model_without_patch_outputs_is_refused(tmp_path, capsys):
    from transformers import ResNetConfig, ResNetModel

    dense_llama(tmp_path / "dense")
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(tmp_path / "rn")
    err = run_cli_error(capsys, tmp_path, ["--lm", str(tmp_path / "dense"), "--vision", str(tmp_path / "rn"),
                                           "--experts", "2"])
    assert "--vision" in err and "patch" in err
