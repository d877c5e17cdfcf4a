"""The export as a Hub user gets it: `AutoProcessor` + `AutoModelForCausalLM` with trust_remote_code,
in a process where neither mmoe_ds nor DeepSpeed can be imported, running the card's own example
on a PIL image; sharded safetensors (`max_shard_size`) that load to identical logits."""
from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_model import tiny_config

from mmoe_ds.data import MmoeProcessor
from mmoe_ds.data.tokenizer import train_tokenizer
from mmoe_ds.export import main as export_main
from mmoe_ds.export import save_export
from mmoe_ds.export.caption import caption_images
from mmoe_ds.export.card import MODEL_ID_PLACEHOLDER
from mmoe_ds.model import MmoeForCausalLM
from mmoe_ds.moe.experts import to_per_expert

CAPTIONS = ["a handwritten seven", "a pair of trousers", "an ankle boot", "a photo showing a sandal"]
METRICS = {"caption_loss": 1.25, "text_ppl": 40.5, "retrieval_r1": 0.35, "retrieval_r5": 0.8,
           "retrieval_candidates": 20, "retrieval_queries": 20, "caption_rank_acc": 0.6, "caption_rank_chance": 0.1}
# A metrics.jsonl "train" record as the trainer writes it (two MoE layers), numbers chosen so the
# audit can be computed by hand (see test_push.py).
ROUTING = [
    {"image": {"tokens": 10, "routed_per_expert": [6, 4, 0, 0], "kept_per_expert": [6, 2, 0, 0], "dropped": 2,
               "entropy": 0.5},
     "text": {"tokens": 10, "routed_per_expert": [0, 0, 10, 10], "kept_per_expert": [0, 0, 10, 10], "dropped": 0,
              "entropy": math.log(2)}},
    {"image": {"tokens": 10, "routed_per_expert": [5, 5, 0, 0], "kept_per_expert": [5, 5, 0, 0], "dropped": 0,
               "entropy": 0.5},
     "text": {"tokens": 10, "routed_per_expert": [0, 0, 20, 0], "kept_per_expert": [0, 0, 20, 0], "dropped": 0,
              "entropy": math.log(2)}},
]
# The licenses the embedded sources record per sample (mmoe_ds/data/sources/embedded.py).
LICENSES = {"digits": "CC BY 4.0 (UCI Optical Recognition of Handwritten Digits, via scikit-learn)",
            "fashion_mnist": "MIT (Zalando Research, Fashion-MNIST; Debian package dataset-fashion-mnist)",
            "wordnet": "WordNet 3.0 license (Princeton University)"}
BLOCK_IMPORTS = 'import sys\nsys.modules["deepspeed"] = None\nsys.modules["mmoe_ds"] = None  # imports now raise\n'


def make_export(root: Path, max_shard_size="2GB", seed: int = 0) -> tuple[Path, MmoeForCausalLM, MmoeProcessor]:
    """A run's leftovers written the way the trainer and `mmoe-ds prepare` leave them (a data folder with
    manifest.json + processor/, a run with metrics.jsonl and report/), and the export made from them."""
    tokenizer = train_tokenizer(CAPTIONS * 4, 300)
    processor = MmoeProcessor(tokenizer, max_length=40)
    data = root / "data"
    processor.save_pretrained(data / "processor")
    shards = {}
    for source, lic in LICENSES.items():  # one small shard per source, each sample's .json naming its license
        name = f"train/{source}-000000.tar"
        (data / "train").mkdir(exist_ok=True)
        with tarfile.open(data / name, "w") as tar:
            for i in range(2):
                for ext, payload in [("txt", CAPTIONS[i].encode()),
                                     ("json", json.dumps({"source": source, "license": lic}).encode())]:
                    info = tarfile.TarInfo(f"{source}{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards[name] = {"kind": "text", "samples": 2, "source": source, "split": "train"}
    (data / "manifest.json").write_text(json.dumps({"sources": sorted(LICENSES), "shards": shards}))
    run = root / "run"
    (run / "report").mkdir(parents=True)
    (run / "report" / "routing_report.md").write_text("| modality | expert 0 |\n|---|---|\n| image | 0.5 |\n")
    records = [{"kind": "train", "step": 10, "loss": 3.0, "routing": ROUTING[:1]},
               {"kind": "eval", "step": 20, **METRICS},
               {"kind": "train", "step": 20, "loss": 2.5, "routing": ROUTING},
               {"kind": "train", "step": 30, "loss": 2.4, "routing": ROUTING[1:]}]  # after the exported step
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tra')  # cut line
    torch.manual_seed(seed)
    model = MmoeForCausalLM(tiny_config(vocab_size=len(tokenizer))).eval()
    meta = {"step": 20, "ep_size": 2, "world_size": 2, "metrics": METRICS,
            "processor_dir": str(data / "processor"), "report_dir": str(run / "report")}
    out = save_export(model, root / "export", meta, data / "processor", run / "report", run / "metrics.jsonl",
                      max_shard_size=max_shard_size)
    return out, model, processor


def card_example(export_dir: Path) -> str:
    """The python block of the export's README.md."""
    blocks = re.findall(r"```python\n(.*?)```", (export_dir / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1, blocks
    assert MODEL_ID_PLACEHOLDER in blocks[0]
    return blocks[0]


def run_blocked(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "modules"))
    return subprocess.run([sys.executable, "-c", BLOCK_IMPORTS + script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_card_example_captions_a_pil_image_with_auto_classes_without_mmoe_ds(tmp_path):
    # 50 kB shards: the tiny model's ~0.2 MB of weights go up as several files plus the index
    export_dir, model, processor = make_export(tmp_path, max_shard_size="50KB", seed=1)
    shards = sorted(p.name for p in export_dir.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (export_dir / "model.safetensors").exists(), shards
    index = json.loads((export_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    # on disk the experts are per expert (deepspeed_experts.{e}.w1.weight, ...), as every export has them;
    # the model holds them as 3-D w13 / w2
    assert set(index["weight_map"]) == set(to_per_expert(model.state_dict())) != set(model.state_dict())
    proc_config = json.loads((export_dir / "processor_config.json").read_text())
    assert proc_config["auto_map"] == {"AutoProcessor": "processing_mmoe.MmoeProcessor"}

    image = Image.new("RGB", (64, 64), "white")  # what the card's example builds
    with torch.no_grad():
        expected_caption = caption_images(model, processor, [image], max_new_tokens=16)[0]
        batch = processor(images=[Image.new("L", (28, 28), 255)], texts=["an ankle boot"])
        expected_logits = model(input_ids=batch["input_ids"], pixel_patches=batch["pixel_patches"],
                                attention_mask=batch["attention_mask"]).logits
    example = card_example(export_dir).replace(MODEL_ID_PLACEHOLDER, str(export_dir))
    script = example + textwrap.dedent("""
        import json
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        b = processor(images=[Image.new("L", (28, 28), 255)], texts=["an ankle boot"])
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], pixel_patches=b["pixel_patches"],
                           attention_mask=b["attention_mask"]).logits
        torch.save({"logits": logits, "prompt": dict(inputs), "batch": dict(b)}, "out.pt")
        print(json.dumps({"caption": caption}))
    """)
    proc = run_blocked(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"caption": expected_caption}
    got = torch.load(tmp_path / "out.pt")
    # the remote processor's caption prompt: <bos> + 16 <image> (28 px / 7 px patches), white -> (1 - 0.5) / 0.5
    assert got["prompt"]["input_ids"].tolist() == [[1] + [3] * 16]
    assert torch.equal(got["prompt"]["pixel_patches"], torch.ones(1, 16, 49))
    text_ids = processor.tokenizer("an ankle boot", add_special_tokens=False)["input_ids"]
    assert got["batch"]["input_ids"].tolist() == [[1] + [3] * 16 + text_ids + [2]]
    assert torch.equal(got["logits"], expected_logits)  # sharded weights load to the same model


def test_export_cli_max_shard_size_refuses_a_non_size(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_main([str(tmp_path / "run"), str(tmp_path / "out"), "--max-shard-size", "big"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--max-shard-size: 'big' is not a size; use e.g. 2GB, 500MB" in err
    assert not (tmp_path / "out").exists()
