"""The processor as HF tools call it (issue 18): `processor(images=, text=, return_tensors=)` -> BatchFeature
with inference defaults, left padding, decode, <bos> from the tokenizer, model_max_length; the
`AutoProcessor` round trip of a plain `save_pretrained`, `generate(**processor(...))` and the
image-text-to-text pipeline on an export, in a process where mmoe_ds and DeepSpeed cannot be imported;
and the bound on text (issue 23): a 64 MiB string costs no more than a caption."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from test_hub_export import CAPTIONS, make_export, run_blocked
from transformers import BatchFeature

from mmoe_ds.config.recipe import DataSection
from mmoe_ds.data import MmoeProcessor
from mmoe_ds.data.loader import LoaderConfig
from mmoe_ds.data.processor import MAX_TEXT_BYTES, cut_text
from mmoe_ds.data.shards import MAX_CAPTION_BYTES, _cut_caption
from mmoe_ds.data.tokenizer import train_tokenizer

WHITE, DARK = Image.new("L", (28, 28), 255), Image.new("L", (28, 28), 30)


@pytest.fixture(scope="module")
def processor() -> MmoeProcessor:
    return MmoeProcessor(train_tokenizer(CAPTIONS * 4, 300), max_length=40, model_max_length=64)


def test_hf_call_gives_a_prompt_batch_feature_with_only_the_model_inputs(processor):
    tok, P = processor.tokenizer, processor.num_patches
    one = processor(images=WHITE, text="an ankle", return_tensors="pt")  # one image, no list
    assert isinstance(one, BatchFeature) and set(one) == {"input_ids", "attention_mask", "pixel_patches"}
    text_ids = tok("an ankle", add_special_tokens=False)["input_ids"]
    assert one["input_ids"].tolist() == [[tok.bos_token_id] + [processor.image_token_id] * P + text_ids]  # no <eos>
    assert one.to(torch.float64)["pixel_patches"].dtype == torch.float64  # BatchFeature.to: floats only
    assert one.to(torch.float64)["input_ids"].dtype == torch.long
    # a batch: left-padded, no image key without images, no labels unless asked
    b = processor(text=["a pair of trousers", "an ankle boot and a sandal"], return_tensors="pt")
    assert set(b) == {"input_ids", "attention_mask"}
    n0 = int(b["attention_mask"][0].sum())
    assert b["attention_mask"][0, -n0:].eq(1).all() and b["attention_mask"][0, :-n0].eq(0).all()
    assert b["input_ids"][0, -n0] == tok.bos_token_id and b["input_ids"][0, :-n0].eq(tok.pad_token_id).all()
    assert processor.batch_decode(b["input_ids"], skip_special_tokens=True) == ["a pair of trousers",
                                                                                 "an ankle boot and a sandal"]
    assert processor.decode(b["input_ids"][1], skip_special_tokens=True) == "an ankle boot and a sandal"
    right = processor(text=["a pair of trousers", "an ankle boot and a sandal"], return_tensors="pt",
                      padding_side="right", add_eos=True, return_labels=True)
    assert right["attention_mask"][0, :n0 + 1].eq(1).all() and right["input_ids"][0, n0] == tok.eos_token_id
    assert right["labels"][0, 0] == -100 and right["labels"][0, n0] == tok.eos_token_id
    # images without text, None entries, nested one-image lists (the pipeline's shape), numpy, lists
    mixed = processor(images=[[WHITE], None], text=["", "a sandal"], return_tensors="np")
    assert isinstance(mixed["input_ids"], np.ndarray) and mixed["pixel_patches"].shape == (2, P, 49)
    assert (mixed["pixel_patches"][1] == 0).all()
    lists = processor(images=[DARK], return_tensors=None)
    assert lists["input_ids"] == [[tok.bos_token_id] + [processor.image_token_id] * P]
    assert processor(text=["a", "an ankle boot"], padding=False)["input_ids"][0] == [tok.bos_token_id] + \
        tok("a", add_special_tokens=False)["input_ids"]
    assert processor(text="a", padding="max_length", max_length=30, return_tensors="pt")["input_ids"].shape == (1, 30)


def test_hf_call_refuses_what_it_cannot_do_with_the_fix(processor):
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['videos'\]"):
        processor(text="a", videos=[1])
    with pytest.raises(ValueError, match="one image\nper sample|one image per sample"):
        processor(images=[[WHITE, DARK]], text=["two"])
    with pytest.raises(ValueError, match="2 images and 1 texts"):
        processor(images=[WHITE, DARK], text="one")
    with pytest.raises(ValueError, match="padding=True"):
        processor(text=["a", "an ankle boot"], padding=False, return_tensors="pt")
    with pytest.raises(ValueError, match="text= .* or texts="):
        processor(text="a", texts=["b"])
    with pytest.raises(ValueError, match="padding_side"):
        processor(text="a", padding_side="middle")


def test_training_call_and_collate_are_the_trainers_batch(processor):
    """`texts=` (and encode + collate, what the loader runs) keep the training layout: right padding, <eos>,
    labels, modality ids, has_image and sample_kind."""
    images, texts = [WHITE, None], ["an ankle boot", "a pair of trousers and a sandal"]
    train = processor(images=images, texts=texts)
    collated = processor.collate([processor.encode(im, tx) for im, tx in zip(images, texts)])
    assert set(train) == set(collated) == {"input_ids", "attention_mask", "labels", "modality_ids", "pixel_patches",
                                           "has_image", "sample_kind"}
    assert all(torch.equal(train[k], collated[k]) for k in collated)
    assert train["attention_mask"][:, 0].eq(1).all()  # right padding
    n = train["attention_mask"].sum(1) - 1
    assert train["input_ids"][torch.arange(2), n].eq(processor.tokenizer.eos_token_id).all()
    # the HF call asked for the training extras gives the same tokens and labels, padded on the right
    hf = processor(images=images, text=texts, add_eos=True, return_labels=True, padding_side="right",
                   return_tensors="pt")
    assert torch.equal(hf["input_ids"], train["input_ids"]) and torch.equal(hf["labels"], train["labels"])


def test_tokenizer_adds_bos_and_knows_the_models_length(processor, tmp_path):
    tok = processor.tokenizer
    assert tok("an ankle boot")["input_ids"][0] == tok.bos_token_id  # pipelines and lm-eval contexts get <bos>
    assert tok.model_max_length == processor.model_max_length == 64
    processor.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("an ankle boot")["input_ids"] == tok("an ankle boot")["input_ids"]
    assert again.model_max_length == 64
    # a tokenizer without <bos> (Qwen2's kind) gets none
    no_bos = train_tokenizer(CAPTIONS * 4, 300)
    no_bos.bos_token = None
    p = MmoeProcessor(no_bos, max_length=40)
    assert p(text="a", return_tensors=None)["input_ids"][0][0] != 1 and no_bos("a")["input_ids"] == \
        no_bos("a", add_special_tokens=False)["input_ids"]


def test_text_is_cut_like_the_loaders_captions():
    assert MAX_TEXT_BYTES == MAX_CAPTION_BYTES == LoaderConfig.__dataclass_fields__["max_caption_bytes"].default
    assert MAX_TEXT_BYTES == DataSection.__dataclass_fields__["max_caption_bytes"].default
    rng = random.Random(0)
    alphabet = ["a", " ", "é", "☃", "😀", "\x00"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        cap = rng.randint(1, 60)
        assert cut_text(text, cap) == _cut_caption(text.encode(), cap)[0], (text, cap)
    assert cut_text("😀" * 3, 5) == "😀"


def test_a_64_mib_text_costs_what_a_caption_costs_and_is_cut_to_the_models_length(tmp_path):
    """Issue 23: peak RSS growth of encoding a 64 MiB string (words, then NUL characters), measured in a
    subprocess, under 300 MB; the output holds the model's length (HF call) or the training length (texts=)."""
    processor = MmoeProcessor(train_tokenizer(CAPTIONS * 4, 300), max_length=40, model_max_length=64)
    processor.save_pretrained(tmp_path / "p")
    script = textwrap.dedent(f"""
        import json, resource
        from PIL import Image
        from mmoe_ds.data import MmoeProcessor
        p = MmoeProcessor.from_pretrained({str(tmp_path / "p")!r})
        p(images=Image.new("L", (28, 28)), text="warm up", return_tensors="pt")
        for fill in ("word ", "\\x00"):
            text = fill * (64 * 2**20 // len(fill))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hf = p(images=Image.new("L", (28, 28)), text=text, return_tensors="pt")
            train = p(images=[None], texts=[text])
            encoded = p.encode(None, text)
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            print(json.dumps({{"fill": fill, "kib": grown, "hf": list(hf["input_ids"].shape),
                              "train": list(train["input_ids"].shape), "encode": len(encoded["input_ids"])}}))
            del text, hf, train, encoded
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.strip().splitlines()[-2:]]
    assert [r["fill"] for r in results] == ["word ", "\x00"]
    for got in results:
        assert got["kib"] < 300 * 1024, got
        assert got["hf"] == [1, 64] and got["train"] == [1, 40] and got["encode"] == 40, got


def test_save_pretrained_round_trips_through_auto_processor_without_mmoe_ds(processor, tmp_path):
    processor.save_pretrained(tmp_path / "p")
    images, texts = [WHITE, None, DARK], ["an ankle boot", "a pair of trousers and a sandal", None]
    expected = {"hf": dict(processor(images=images, text=texts, return_tensors="pt")),
                "train": dict(processor(images=images, texts=texts))}
    torch.save({"images": [np.asarray(im) for im in images if im is not None]}, tmp_path / "in.pt")
    script = textwrap.dedent(f"""
        import torch
        from PIL import Image
        from transformers import AutoProcessor
        p = AutoProcessor.from_pretrained({str(tmp_path / "p")!r}, trust_remote_code=True)
        assert type(p).__name__ == "MmoeProcessor" and type(p).__module__.startswith("transformers_modules"), type(p)
        from transformers.processing_utils import ProcessorMixin
        assert isinstance(p, ProcessorMixin)
        white, dark = (Image.fromarray(a) for a in torch.load("in.pt", weights_only=False)["images"])
        images, texts = [white, None, dark], {texts!r}
        out = {{"hf": dict(p(images=images, text=texts, return_tensors="pt")),
               "train": dict(p(images=images, texts=texts))}}
        p.save_pretrained("again")  # the shipped copy saves itself as well
        q = AutoProcessor.from_pretrained("again", trust_remote_code=True)
        out["again"] = dict(q(images=images, text=texts, return_tensors="pt"))
        out["config"] = q.to_dict()
        torch.save(out, "out.pt")
    """)
    proc = run_blocked(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    for mode in ("hf", "train"):
        assert set(got[mode]) == set(expected[mode]), mode
        assert all(torch.equal(got[mode][k], expected[mode][k]) for k in expected[mode]), mode
    assert all(torch.equal(got["again"][k], expected["hf"][k]) for k in expected["hf"])
    assert got["config"] == processor.to_dict()


def test_export_generates_from_the_processor_and_runs_the_cards_pipeline(tmp_path):
    """On an export, without mmoe_ds: `model.generate(**processor(images=[im], text=prompt, return_tensors="pt"))`;
    a left-padded batch of two prompts of different lengths gives each prompt's own greedy tokens and logits
    (1e-5); `pipeline(<the card's pipeline_tag>, ...)` returns the same caption as generate."""
    export_dir, _, _ = make_export(tmp_path)
    tag = (export_dir / "README.md").read_text().split("pipeline_tag: ")[1].split()[0]
    white = np.asarray(WHITE)
    torch.save({"white": white, "dark": np.asarray(DARK)}, tmp_path / "in.pt")
    script = textwrap.dedent(f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModelForCausalLM, AutoProcessor, pipeline
        path = {str(export_dir)!r}
        ims = {{k: Image.fromarray(v) for k, v in torch.load("in.pt", weights_only=False).items()}}
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        gen = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        prompts = [(ims["white"], "a"), (ims["dark"], "a pair of trousers and an ankle")]
        with torch.no_grad():
            batch = processor(images=[im for im, _ in prompts], text=[t for _, t in prompts], return_tensors="pt")
            both = model.generate(**batch, **gen)
            alone = [model.generate(**processor(images=[im], text=t, return_tensors="pt"), **gen) for im, t in prompts]
            caption_inputs = processor(images=ims["white"], return_tensors="pt")
            caption_ids = model.generate(**caption_inputs, max_new_tokens=8, do_sample=False)
        caption = processor.batch_decode(caption_ids[:, caption_inputs["input_ids"].shape[1]:],
                                         skip_special_tokens=True)[0]
        diff = max((b[i] - a.logits[k][0]).abs().max().item() for i, a in enumerate(alone)
                   for k, b in enumerate(both.logits))
        same = [both.sequences[i, -6:].tolist() == a.sequences[0, -6:].tolist() for i, a in enumerate(alone)]
        pipe = pipeline({tag!r}, model=path, trust_remote_code=True)
        result = pipe(images=ims["white"], text="", max_new_tokens=8)
        print(json.dumps({{"diff": diff, "same": same, "left": batch["attention_mask"][0, 0].item(),
                          "keys": sorted(batch), "caption": caption, "pipeline": result}}))
    """)
    proc = run_blocked(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["keys"] == ["attention_mask", "input_ids", "pixel_patches"] and got["left"] == 0  # left-padded
    assert got["same"] == [True, True] and got["diff"] <= 1e-5, got
    assert tag == "image-text-to-text"
    assert got["pipeline"] == [{"input_text": "", "generated_text": got["caption"]}], got
    assert got["caption"]  # a non-empty caption


def test_export_of_a_processor_saved_before_the_bos_rule_gets_bos_and_the_models_length(tmp_path):
    """A processor folder from an earlier `mmoe-ds prepare` (tokenizer without a post-processor, no auto_map,
    no model_max_length): the export's tokenizer adds <bos> and knows the model's length."""
    from transformers import AutoTokenizer

    from mmoe_ds.export import add_processor_auto_map

    tok = train_tokenizer(CAPTIONS * 4, 300)
    tok.save_pretrained(tmp_path)  # as the processor saved it before: no add_bos_token, no post-processor
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "MmoeProcessor", "max_length": 40}))
    assert AutoTokenizer.from_pretrained(tmp_path)("a")["input_ids"][0] != tok.bos_token_id
    assert add_processor_auto_map(tmp_path, 96)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("an ankle")["input_ids"] == [tok.bos_token_id] + tok("an ankle", add_special_tokens=False)["input_ids"]
    assert again.model_max_length == 96
    assert MmoeProcessor.from_pretrained(tmp_path).model_max_length == 96
