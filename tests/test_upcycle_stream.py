"""Bounded-memory upcycling (issue 22, item 2): `upcycle` builds the MoE model on the meta device, reads
each source tensor when it is needed and writes each output tensor straight to its place in the
safetensors shards, so it never holds the model.

The reference is the in-memory path `upcycle` had before (`upcycle_in_memory` below, test-only): the dense
LM loaded whole by transformers in fp32, the whole fp32 MoE model built and filled, the vision tower
loaded by transformers' loader, cast, and saved by `write_model` (`save_pretrained`). The streamed
folder must equal it file for file, byte for byte (weights, shards and index, config, generation
config, tokenizer / processor, code, card).

Checked once against the code before this change (git HEAD `mmoe_ds/export/upcycle.py` run side by side
on the cases of `CASES` plus a bf16-sharded source): every file byte-identical except the new
patch embedding / vision projector, which that code drew from the global torch RNG (two upcycles of
identically shaped models gave different values); they are now drawn from `--seed` with the same
distribution (normal(0, initializer_range) weights, zero biases), which `upcycle_in_memory` uses too.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_upcycle import (
    LLAMA_SPECIALS,
    dense_llama,
    dense_mistral,
    dense_qwen2,
    save_siglip,
    save_tokenizer,
)
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from mmoe_ds.export import write_model
from mmoe_ds.export.upcycle import (
    DTYPES,
    SafetensorsShardWriter,
    UpcycleOptions,
    fresh_weights,
    init_routers,
    main,
    map_weights,
    prepare_upcycle,
    upcycle,
    write_upcycled,
)
from mmoe_ds.model import MmoeForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import upcycle_memory  # noqa: E402  (bench/, not a package)


def upcycle_in_memory(lm, out, options: UpcycleOptions, vision=None) -> None:
    """`upcycle` as it was before streaming: the whole fp32 model in memory, written by `write_model`."""
    from mmoe_ds.model.vision import load_tower_weights

    _, arch, config, prepared, processor = prepare_upcycle(lm, options, vision)
    dense = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32, local_files_only=True)
    model = MmoeForCausalLM(config)
    missing, unexpected = model.load_state_dict(map_weights(dense.state_dict(), config, prepared, options),
                                                strict=False)
    assert not unexpected
    del dense
    init_routers(model, options)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in fresh_weights(model, options):
            params[name].copy_(value)
    if vision is not None:
        load_tower_weights(model.model.vision, vision)
    model = model.to(DTYPES[options.dtype]).eval()
    write_upcycled(out, lambda tmp: write_model(model, tmp, options.max_shard_size), model.config, processor,
                   prepared.image_token_id, lm, arch, options, vision)


def sharded_bf16(folder: Path) -> None:
    """The tiny Llama as Hub LMs ship: bf16, several safetensors shards with an index."""
    dense_llama(folder.parent / "fp32")
    shipped = LlamaForCausalLM.from_pretrained(folder.parent / "fp32", dtype=torch.bfloat16)
    shipped.save_pretrained(folder, max_shard_size="20KB")
    save_tokenizer(folder, LLAMA_SPECIALS)


CASES = {  # name: (dense LM builder, with a vision tower, options)
    "llama_resized": (dense_llama, False, dict(experts=4, top_k=2, moe_layers=[0, 2])),
    "qwen2_tied_modality_bias": (dense_qwen2, False, dict(experts=3, top_k=3, router_mode="modality_bias")),
    "mistral_every_2nd": (dense_mistral, False, dict(experts=2, top_k=2, moe_layer_frequency=2)),
    "noise_normal_router_bf16": (dense_llama, False, dict(experts=4, top_k=2, moe_layers=[1], noise=0.01,
                                                          router_init="normal", dtype="bfloat16", seed=3)),
    "vision_mlp_projector": (dense_qwen2, True, dict(experts=2, top_k=2, vision_max_tokens=4)),
    "sharded_output": (dense_llama, True, dict(experts=4, top_k=2, noise=0.05, projector="linear",
                                               max_shard_size="30KB")),
    "sharded_bf16_source": (sharded_bf16, False, dict(experts=4, top_k=2, moe_layers=[0, 2], noise=0.05)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_folder_is_byte_identical_to_the_in_memory_path(tmp_path, case):
    build, with_vision, kw = CASES[case]
    build(tmp_path / "dense")
    vision = None
    if with_vision:
        save_siglip(tmp_path / "siglip")
        vision = tmp_path / "siglip"
    options = UpcycleOptions(**kw)
    upcycle_in_memory(tmp_path / "dense", tmp_path / "reference", options, vision)
    upcycle(tmp_path / "dense", tmp_path / "streamed", options, vision)
    files = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "streamed").iterdir())
    if case == "sharded_output":
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 2
    else:
        assert "model.safetensors" in files
    read = {f: ((tmp_path / "reference" / f).read_bytes(), (tmp_path / "streamed" / f).read_bytes()) for f in files}
    different = [f for f, (expected, got) in read.items() if expected != got]
    assert different == []
    moe = MmoeForCausalLM.from_pretrained(tmp_path / "streamed")  # and transformers reads it back
    assert moe.config.num_local_experts == options.experts


def random_tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"b.weight": (7, 3), "a.bias": (5,), "scalar": (), "empty": (0, 4), "z.big": (33, 17), "m.x": (2, 3, 4)}
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in shapes.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_writer_writes_safetensors_bytes_in_any_order(tmp_path, dtype):
    """One file (the tensors given in a shuffled order) equals safetensors' own `save_file`."""
    tensors = random_tensors(dtype)
    save_file(tensors, tmp_path / "expected.safetensors", metadata={"format": "pt"})
    specs = {name: (tuple(t.shape), dtype) for name, t in tensors.items()}
    (tmp_path / "out").mkdir()
    order = list(tensors)
    random.Random(1).shuffle(order)
    with SafetensorsShardWriter(tmp_path / "out", specs, "1GB", total_parameters=0) as writer:
        for name in order:
            writer.write(name, tensors[name].float())  # cast to the planned dtype on the way
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "expected.safetensors").read_bytes()


def test_shard_writer_refuses_what_does_not_fit_the_plan(tmp_path):
    tensors = random_tensors(torch.float32)
    specs = {name: (tuple(t.shape), torch.float32) for name, t in tensors.items()}
    writer = SafetensorsShardWriter(tmp_path, specs, "1GB", total_parameters=0)
    with pytest.raises(RuntimeError, match="'nope' is not in the MoE model"):
        writer.write("nope", torch.zeros(1))
    with pytest.raises(ValueError, match=r"b.weight: shape \(3, 7\), the MoE model's config asks for \(7, 3\)"):
        writer.write("b.weight", torch.zeros(3, 7))
    writer.write("a.bias", tensors["a.bias"])
    with pytest.raises(RuntimeError, match="'a.bias' is written twice"):
        writer.write("a.bias", tensors["a.bias"])
    with pytest.raises(RuntimeError, match=r"5 weight\(s\) were not written"):
        writer.close()
    with pytest.raises(ValueError, match="one dtype per file"):
        SafetensorsShardWriter(tmp_path, {"a": ((2,), torch.float32), "b": ((2,), torch.bfloat16)}, "1GB", 0)


def test_a_pytorch_bin_lm_gives_the_same_folder(tmp_path):
    """An LM saved the older way (pytorch_model.bin, read weights-only) upcycles to the same bytes."""
    dense = dense_llama(tmp_path / "safetensors")
    (tmp_path / "bin").mkdir()
    for f in (tmp_path / "safetensors").iterdir():
        if f.name != "model.safetensors":
            (tmp_path / "bin" / f.name).write_bytes(f.read_bytes())
    torch.save(dense.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    options = UpcycleOptions(experts=2, top_k=2, noise=0.01)
    upcycle(tmp_path / "safetensors", tmp_path / "a", options)
    upcycle(tmp_path / "bin", tmp_path / "b", options)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_a_checkpoint_lacking_a_tensor_is_named_and_nothing_is_written(tmp_path, capsys):
    dense = dense_llama(tmp_path / "dense")
    state = {k: v for k, v in dense.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(state, tmp_path / "dense" / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    rc = main(["--lm", str(tmp_path / "dense"), "--experts", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "'model.layers.1.mlp.up_proj.weight'" in err and "--lm" in err
    assert not (tmp_path / "out").exists()


def test_vision_weights_that_do_not_fit_go_through_the_loader_and_are_refused(tmp_path, capsys):
    """Where the encoder's tensors are not found by name with their shapes, transformers' loader reads the
    folder (so renamed layouts still load) and its refusal names the fix."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    dense_llama(tmp_path / "dense")
    save_siglip(tmp_path / "siglip")
    other = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=16, patch_size=4))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "siglip" / "model.safetensors",
              metadata={"format": "pt"})
    capsys.readouterr()
    rc = main(["--lm", str(tmp_path / "dense"), "--vision", str(tmp_path / "siglip"), "--experts", "2",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "do not fit MmoeConfig.vision_config" in err, err
    assert not (tmp_path / "out").exists()


SMALL_QWEN2 = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=1e6,
                   tie_word_embeddings=True)
MB = 10**6


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    """`mmoe-ds upcycle` in a child process (bench/upcycle_memory.py) on Qwen2-shaped bf16 checkpoints of
    20M and 79M parameters (18 and 78 layers of the same width, 3 shards each), 2 experts, bf16 out: the
    peak resident growth stays under the largest input shard + 64 MB and grows by less than 48 MB from
    the small model to the 4x larger one.

    Measured on the 2-core CI machine: streamed 18 MB and 23 MB; the in-memory path before this change
    (git HEAD, the same harness) 234 MB and 934 MB, which fails both assertions."""
    flags = ["--experts", "2", "--top-k", "2", "--dtype", "bfloat16"]
    small = upcycle_memory.run(SMALL_QWEN2, 3, flags, tmp_path)
    large = upcycle_memory.run(dict(SMALL_QWEN2, num_hidden_layers=78), 3, flags, tmp_path)
    print(f"peak growth {small['growth'] / MB:.0f} MB ({small['parameters'] / 1e6:.0f}M parameters), "
          f"{large['growth'] / MB:.0f} MB ({large['parameters'] / 1e6:.0f}M)")
    assert large["parameters"] > 3.5 * small["parameters"] and large["shards"] == 3
    assert large["growth"] < large["largest_shard"] + 64 * MB
    assert large["growth"] < small["growth"] + 48 * MB
