"""Generation as HF's tools drive it: left-padded batches (positions from the attention mask, the KV
cache continuing each row's own count), the processor's whole batch passed to `generate`, and a
length error before the first forward instead of one mid-generation."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_model import LLAMA_STYLE, P, tiny_config

from mmoe_ds.data import MmoeProcessor
from mmoe_ds.data.tokenizer import train_tokenizer
from mmoe_ds.export import save_export
from mmoe_ds.model import MmoeForCausalLM
from mmoe_ds.model.modeling_mmoe import positions_from_mask

# Batch-invariant routing: without capacity drops a row routes the same alone or in a batch.
DROPLESS = dict(mode="masked_pools", pools={"image": [0, 1, 2], "text": [2, 3]}, drop_tokens=False)
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


def prompts(lengths: tuple[int, ...], seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Image prompts `<bos> <image>×P text` with `lengths` text tokens, and their [B, P, 49] patches."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.tensor([1]), torch.full((P,), 3), torch.randint(4, 64, (n,), generator=g)])
            for n in lengths]
    return rows, torch.randn(len(lengths), P, 49, generator=g)


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids, mask = torch.full((len(rows), L), pad), torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    return ids, mask


@pytest.mark.parametrize("extra", [{}, LLAMA_STYLE, dict(LLAMA_STYLE, sliding_window=6)],
                         ids=["learned", "rope_gqa", "rope_sliding_window"])
def test_left_padded_batch_generates_like_each_prompt_alone(extra):
    torch.manual_seed(0)
    model = MmoeForCausalLM(tiny_config(**extra, router=DROPLESS)).eval()
    rows, patches = prompts((2, 7))
    ids, mask = left_pad(rows)
    both = model.generate(input_ids=ids, attention_mask=mask, pixel_patches=patches, max_new_tokens=6, **GREEDY)
    L = ids.shape[1]
    for i, row in enumerate(rows):
        alone = model.generate(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long),
                               pixel_patches=patches[i:i + 1], max_new_tokens=6, **GREEDY)
        assert torch.equal(both.sequences[i, L:], alone.sequences[0, len(row):]), i
        for step, (a, b) in enumerate(zip(both.logits, alone.logits)):
            torch.testing.assert_close(a[i], b[0], rtol=0, atol=1e-5, msg=f"row {i}, step {step}")


def test_right_padding_keeps_arange_positions_and_left_padding_counts_from_the_first_token():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask, 0, 5, "cpu").tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    grown = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)  # one generated token per row
    assert positions_from_mask(grown, 5, 1, "cpu").tolist() == [[5], [3], [5]]
    assert positions_from_mask(None, 2, 3, "cpu").tolist() == [[2, 3, 4]]


@pytest.mark.parametrize("extra", [{}, LLAMA_STYLE], ids=["learned", "rope_gqa"])
def test_explicit_position_ids_are_used_as_given(extra):
    torch.manual_seed(2)
    model = MmoeForCausalLM(tiny_config(**extra)).eval()
    rows, patches = prompts((3, 5))
    ids, mask = left_pad(rows)
    hf_style = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' own convention, equal on the real tokens
    with torch.no_grad():
        derived = model(input_ids=ids, attention_mask=mask, pixel_patches=patches).logits
        given = model(input_ids=ids, attention_mask=mask, pixel_patches=patches, position_ids=hf_style).logits
        spread = model(input_ids=ids, attention_mask=mask, pixel_patches=patches, position_ids=hf_style * 2).logits
    real = mask.bool()
    assert torch.equal(given[real], derived[real])
    # the given ids are really used (far above float noise; small at init, where attention is near uniform)
    assert (spread[real] - derived[real]).abs().max() > 1e-4


def test_generate_takes_the_whole_processor_batch():
    """The training call's batch (labels, modality_ids, has_image, sample_kind) goes to generate as is."""
    tokenizer = train_tokenizer(["a handwritten seven", "an ankle boot"] * 4, 300)
    processor = MmoeProcessor(tokenizer, max_length=40)
    torch.manual_seed(3)
    model = MmoeForCausalLM(tiny_config(vocab_size=len(tokenizer))).eval()
    batch = processor(images=[Image.new("L", (28, 28), 255)], texts=["an ankle"], add_eos=False)
    assert {"has_image", "sample_kind", "modality_ids", "labels"} <= set(batch)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, batch["input_ids"].shape[1] + 3)


def test_generating_past_learned_positions_fails_before_the_first_forward():
    torch.manual_seed(4)
    model = MmoeForCausalLM(tiny_config(max_position_embeddings=32)).eval()
    rows, patches = prompts((5,))  # 22 tokens
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(ValueError, match=r"a prompt of 22 tokens grows to 33 .* max_position_embeddings=32 "
                                         r"\(learned positions\); pass max_new_tokens <= 10"):
        model.generate(input_ids=rows[0][None], pixel_patches=patches, max_new_tokens=11, do_sample=False)
    assert not forwards
    out = model.generate(input_ids=rows[0][None], pixel_patches=patches, max_new_tokens=10, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == 32  # exactly up to the last position
    rope = MmoeForCausalLM(tiny_config(max_position_embeddings=32, **LLAMA_STYLE)).eval()
    out = rope.generate(input_ids=rows[0][None], pixel_patches=patches, max_new_tokens=11, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == 33  # rotary positions extrapolate, as in transformers


BATCH_SCRIPT = """
import json, torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

processor = AutoProcessor.from_pretrained("export", trust_remote_code=True)
# registered for both auto classes (the image-text-to-text pipeline loads it through the second)
model = AutoModelForImageTextToText.from_pretrained("export", trust_remote_code=True).eval()
assert type(model) is type(AutoModelForCausalLM.from_pretrained("export", trust_remote_code=True))
greedy = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
images = [Image.new("L", (28, 28), 255), Image.radial_gradient("L").resize((28, 28))]
prompts = ["an", "a photo showing a pair of"]
single = processor(images=[images[0]], text=prompts[0], return_tensors="pt")
first = model.generate(**single, max_new_tokens=3)  # the issue's one-liner
both = processor(images=images, text=prompts, return_tensors="pt")
with torch.no_grad():
    dropped = sum(int(s.dropped.sum()) for s in model(**both).routing_stats)
out = model.generate(**both, **greedy)
L = both["input_ids"].shape[1]
rows = []
for i in range(2):
    alone = processor(images=[images[i]], text=prompts[i], return_tensors="pt")
    one = model.generate(**alone, **greedy)
    n = alone["input_ids"].shape[1]
    rows.append({"prompt_len": n, "same_tokens": bool(torch.equal(out.sequences[i, L:], one.sequences[0, n:])),
                 "logits_gap": max(float((a[i] - b[0]).abs().max()) for a, b in zip(out.logits, one.logits))})
print(json.dumps({"first_shape": list(first.shape), "single_len": single["input_ids"].shape[1], "dropped": dropped,
                  "padded_len": L, "left_padded": both["attention_mask"][:, 0].tolist(), "rows": rows}))
"""


def test_export_generates_from_the_processor_batch_and_left_padding_equals_each_alone(tmp_path):
    """Acceptance 3 of issue 18, as a Hub user runs it (no mmoe_ds, no DeepSpeed). Dropless routing:
    with capacity drops (`drop_tokens`) the batch's other tokens compete for each expert's slots, so
    a row's routing, and with it its logits, depends on the batch (as in DeepSpeed; see the README)."""
    from test_hub_export import make_export, run_blocked

    _, model, _ = make_export(tmp_path / "run", seed=6)  # for the processor that `mmoe-ds prepare` leaves
    torch.manual_seed(6)
    dropless = MmoeForCausalLM(tiny_config(vocab_size=model.config.vocab_size, router=DROPLESS)).eval()
    save_export(dropless, tmp_path / "export", processor_dir=tmp_path / "run" / "data" / "processor")
    proc = run_blocked(BATCH_SCRIPT, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["first_shape"] == [1, r["single_len"] + 3]
    assert r["dropped"] == 0
    lengths = [row["prompt_len"] for row in r["rows"]]
    assert lengths[0] < lengths[1] == r["padded_len"] and r["left_padded"] == [0, 1]  # the short prompt is padded
    for row in r["rows"]:
        assert row["same_tokens"] and row["logits_gap"] <= 1e-5, row
