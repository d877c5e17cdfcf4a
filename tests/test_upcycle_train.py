"""Acceptance 3 of issue 9: an upcycled model (tiny random Llama with GQA + RoPE, and a tiny random
SigLIP tower, both saved with `save_pretrained` here, through `mmoe-ds upcycle`) trains with the
real deepspeed launcher on 2 CPU processes at expert-parallel size 2 from `train.init_from`,
resumes exactly after a worker is SIGKILLed, exports with `mmoe-ds export`, and the export, loaded
where neither mmoe_ds nor DeepSpeed can be imported, reproduces a training-time loss.

Expectations: the upcycled folder loaded with plain `from_pretrained` (first-step loss), the
uninterrupted run (resume), the logged loss (export); names of the frozen tower by literal prefix.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from launch_util import REPO, deepspeed_launch, launch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mmoe_ds.config.recipe import DataSection
from mmoe_ds.data import MmoeProcessor
from mmoe_ds.export import main as export_main
from mmoe_ds.export.upcycle import main as upcycle_main
from mmoe_ds.model import MmoeForCausalLM
from mmoe_ds.training.data_plan import make_train_loader

COMPOSITION = {"image_text": 4, "text": 1, "image": 1}
MAX_LENGTH = 32
STEPS, EVERY, KILL_AT = 6, 3, 5
DS_CONFIG = str(REPO / "ds_configs/cpu_zero1_fp32.json")
KEEP = ("input_ids", "attention_mask", "labels", "modality_ids", "pixel_values")
BLOCK_IMPORTS = 'import sys\nsys.modules["deepspeed"] = None\nsys.modules["mmoe_ds"] = None  # imports now raise\n'


def llama_folder(folder: Path) -> None:
    """A dense Llama as users have one: config + safetensors + a byte-level BPE tokenizer without a pad token."""
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    texts = ["a photo of a shoe", "an ankle boot", "a handwritten digit seven", "a pair of trousers", "a bag"] * 4
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0,
                         initializer_range=0.1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def siglip_folder(folder: Path) -> None:
    torch.manual_seed(1)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def write_recipe(path: Path, data_dir, out: Path, init_from: Path) -> Path:
    recipe = {"data": {"dir": str(data_dir), "composition": COMPOSITION, "max_length": MAX_LENGTH, "eval_batches": 1,
                       "retrieval_candidates": 0, "eval_metrics": ["caption_loss"]},
              "model": {"router_aux_loss_coef": 0.01},
              "train": {"output_dir": str(out), "steps": STEPS, "expert_parallel_size": 2, "log_every": 1,
                        "eval_every": KILL_AT, "checkpoint_every": EVERY, "keep_last": 5, "progress_bar": False,
                        "init_from": str(init_from)}}
    path.write_text(json.dumps(recipe))
    return path


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def worker_args(recipe: Path, prefix: Path, *extra: str) -> list[str]:
    return [str(REPO / "tests/init_from_worker.py"), "--recipe", str(recipe), "--deepspeed_config", DS_CONFIG,
            "--out", str(prefix), *extra]


def rank_batches(data_dir, processor, tag_dir: Path | None) -> list[dict]:
    """Each rank's next training batch: the first one, or the one after checkpoint `tag_dir`."""
    data = DataSection(dir=str(data_dir), composition=dict(COMPOSITION), max_length=MAX_LENGTH)
    processor.max_length = MAX_LENGTH
    batches = []
    for rank in range(2):
        loader = make_train_loader(data, processor, rank, 2, seed=0)
        if tag_dir is not None:
            loader.load_state_dict(torch.load(tag_dir / f"rank{rank}_state.pt", weights_only=False)["loader"])
        batch = next(iter(loader))
        batches.append({k: batch[k] for k in KEEP})
    return batches


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("upcycle")
    llama_folder(base / "llama")
    siglip_folder(base / "siglip")
    out = base / "moe"
    assert upcycle_main(["--lm", str(base / "llama"), "--vision", str(base / "siglip"), "--experts", "4", "--top-k",
                         "2", "--router-mode", "modality_bias", "--vision-max-tokens", "4", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def reference_run(upcycled, small_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("ref")
    recipe = write_recipe(base / "r.json", small_dataset, base / "run", upcycled)
    deepspeed_launch(worker_args(recipe, base / "w"))
    ranks = [json.loads(Path(f"{base / 'w'}.rank{r}.json").read_text()) for r in range(2)]
    return base / "run", ranks, [torch.load(f"{base / 'w'}.rank{r}.after.pt") for r in range(2)]


def test_upcycled_model_trains_at_ep2_from_its_own_weights_with_the_tower_frozen(upcycled, reference_run,
                                                                                  small_dataset):
    run, ranks, after = reference_run
    model = MmoeForCausalLM.from_pretrained(upcycled)
    assert model.config.vision_encoder == "hf" and model.config.freeze_vision_tower
    tower = sorted(n for n, _ in model.named_parameters() if n.startswith("model.vision.encoder."))
    assert tower and [r["frozen"] for r in ranks] == [tower, tower]
    for r in ranks:
        assert not set(r["in_optimizer"]) & set(tower) and "model.vision.projector.0.weight" in r["in_optimizer"]
    reference = model.state_dict()
    for name in tower:
        assert torch.equal(after[0][name], reference[name]) and torch.equal(after[1][name], reference[name])
    assert not torch.equal(after[0]["model.vision.projector.0.weight"], reference["model.vision.projector.0.weight"])
    model.config.router_aux_loss_coef = 0.01  # the recipe's override
    model.train()
    processor = MmoeProcessor.from_pretrained(upcycled)
    with torch.no_grad():
        expected = sum(model(**b).loss.item() for b in rank_batches(small_dataset, processor, None)) / 2
    trained = losses(run)
    assert sorted(trained) == list(range(1, STEPS + 1))
    assert trained[1] == pytest.approx(expected, rel=1e-5)


def test_kill_resume_export_and_the_export_alone_reproduces_the_loss(upcycled, reference_run, small_dataset,
                                                                     tmp_path):
    reference, _, _ = reference_run
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.json", small_dataset, run, upcycled)
    killed = launch(worker_args(recipe, tmp_path / "k", "--kill-at-step", str(KILL_AT)))
    assert not killed.ok, "the run was meant to be killed at step 5"
    assert max(losses(run)) == KILL_AT and (run / "checkpoints" / "latest").read_text() == "step00000003"
    deepspeed_launch(worker_args(recipe, tmp_path / "w"))
    assert [json.loads(Path(f"{tmp_path / 'w'}.rank{r}.json").read_text())["resumed_from"] for r in range(2)] == [3, 3]
    resumed, expected = losses(run), losses(reference)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(EVERY + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step

    tag = run / "checkpoints" / "step00000003"
    assert export_main([str(tag), str(tmp_path / "export")]) == 0
    export = tmp_path / "export"
    assert {"preprocessor_config.json", "processor_config.json", "vision.py"} <= {p.name for p in export.iterdir()}
    processor = MmoeProcessor.from_pretrained(export)
    batches = rank_batches(small_dataset, processor, tag)
    rng = [torch.load(tag / f"rank{r}_state.pt", weights_only=False)["rng"] for r in range(2)]
    torch.save({"batches": batches, "rng": [r["torch"] for r in rng]}, tmp_path / "batches.pt")
    assert (run / "processor" / "preprocessor_config.json").is_file()  # the run saved the processor it encoded with
    script = textwrap.dedent(f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModelForCausalLM, AutoProcessor
        model = AutoModelForCausalLM.from_pretrained({str(export)!r}, trust_remote_code=True).train()
        processor = AutoProcessor.from_pretrained({str(export)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        saved = torch.load("batches.pt")
        losses = []
        for batch, state in zip(saved["batches"], saved["rng"]):
            torch.set_rng_state(state)
            with torch.no_grad():
                losses.append(model(**batch).loss.item())
        encoded = processor(images=[Image.new("L", (28, 28), 200)], texts=["an ankle boot"])
        torch.save(dict(encoded), "encoded.pt")
        print(json.dumps(losses))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", BLOCK_IMPORTS + script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_rank = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sum(per_rank) / 2 == pytest.approx(resumed[EVERY + 1], abs=1e-5, rel=1e-5)
    remote = torch.load(tmp_path / "encoded.pt")
    local = processor(images=[torch.full((28, 28), 200, dtype=torch.uint8).numpy()], texts=["an ankle boot"])
    assert torch.equal(remote["input_ids"], local["input_ids"]) and torch.equal(remote["pixel_values"],
                                                                                local["pixel_values"])
    assert remote["input_ids"][0].tolist().count(processor.image_token_id) == 4  # 4 x 4 patches pooled to 2 x 2
