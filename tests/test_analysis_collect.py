"""The probe-set capture agrees with the router's own statistics (a separate code path in the model)."""
from __future__ import annotations

import numpy as np
import torch

from mmoe_ds.analysis.analyze import probe_batches
from mmoe_ds.analysis.collect import capture_routing, expert_outputs
from mmoe_ds.analysis.routing import modality_routing
from mmoe_ds.data.processor import MmoeProcessor
from mmoe_ds.model import MmoeConfig, MmoeForCausalLM

MODEL_KEYS = ("input_ids", "attention_mask", "modality_ids", "pixel_patches")


def model_for(processor: MmoeProcessor, router: dict) -> MmoeForCausalLM:
    tok = processor.tokenizer
    torch.manual_seed(0)
    return MmoeForCausalLM(MmoeConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok={"image": 1, "text": 2}, router=router,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_size=processor.image_size, patch_size=processor.patch_size, num_channels=processor.num_channels)).eval()


def test_capture_counts_equal_the_routers_own_stats(small_dataset):
    processor = MmoeProcessor.from_pretrained(small_dataset / "processor")
    # a tight eval capacity so that some routes are dropped; batches of one sample have no padding,
    # so the router's own statistics (which count every position) cover exactly the captured tokens
    model = model_for(processor, {"mode": "modality_bias", "eval_capacity_factor": 0.5, "min_capacity": 1,
                                  "modality_bias_init_std": 1.0})
    batches = probe_batches(processor, small_dataset, 6, seed=0, batch_size=1)
    cap = capture_routing(model, batches, max_feature_tokens=10_000)
    assert [lc.layer for lc in cap.layers] == [1, 3]
    assert sorted(set(cap.sample_ids.tolist())) == list(range(6))
    with torch.no_grad():
        stats = [model(**{k: b[k] for k in MODEL_KEYS}, use_cache=False).routing_stats for b in batches]
    for i, lc in enumerate(cap.layers):
        per = modality_routing(cap.modality_ids, lc.probs, lc.chosen, lc.valid, lc.kept, 2, 4)
        routed = sum(s[i].routed for s in stats).long().tolist()
        kept = sum(s[i].kept for s in stats).long().tolist()
        tokens = sum(s[i].tokens for s in stats).long().tolist()
        assert [p.routed for p in per] == routed
        assert [p.kept for p in per] == kept
        assert [p.tokens for p in per] == tokens
        assert tokens[0] == 6 * processor.num_patches
    assert sum(p.drop_rate for lc in cap.layers
               for p in modality_routing(cap.modality_ids, lc.probs, lc.chosen, lc.valid, lc.kept, 2, 4)) > 0


def test_padding_is_left_out_and_features_stop_at_whole_samples(small_dataset):
    processor = MmoeProcessor.from_pretrained(small_dataset / "processor")
    model = model_for(processor, {"mode": "agnostic", "drop_tokens": False})
    batches = probe_batches(processor, small_dataset, 8, seed=1, batch_size=4)
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).tolist()
    assert len(set(lengths)) > 1  # captions of different lengths: the batches are padded
    limit = lengths[0] + lengths[1] + lengths[2] // 2  # room for two whole samples and half a third
    cap = capture_routing(model, batches, max_feature_tokens=limit)
    assert cap.modality_ids.size == sum(lengths)  # every real token, no padding
    assert cap.feature_tokens == lengths[0] + lengths[1]
    (lc1, lc3) = cap.layers
    assert lc1.features.shape == (lengths[0] + lengths[1], 32)
    # dropless: every valid route is kept
    assert np.array_equal(lc1.kept, lc1.valid) and np.array_equal(lc3.kept, lc3.valid)
    # every expert's outputs on the captured router inputs
    outs = expert_outputs(lc1.module, lc1.features)
    assert len(outs) == 4 and all(o.shape == (cap.feature_tokens, 32) for o in outs)
    x = torch.from_numpy(lc1.features[:3])
    w = lc1.module.deepspeed_moe.experts.expert(2)  # expert 2's own weights, by hand
    expected = (torch.nn.functional.silu(x @ w["w1"].T) * (x @ w["w3"].T)) @ w["w2"].T
    assert torch.allclose(outs[2][:3], expected, atol=1e-6)
    assert not torch.allclose(outs[1][:3], expected, atol=1e-3)  # each list entry is its own expert
