"""Issue 22 acceptance 3: the routing statistics a run logs are the whole job's.

Two gloo ranks through the real `deepspeed` launcher and the real trainer, with different modality
mixes (rank 0: 3 image+text pairs and 1 text per batch; rank 1: 3 texts and 1 image), 2 steps of 2 gradient-accumulation
micro-batches, one log window: the `routing` of metrics.jsonl equals the sum over both ranks of
counts made by hand (tests/routing_sum_worker.py) over every micro-batch's non-padding tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch_util import REPO, SharedLaunch, launch

STEPS, GAS = 2, 2


@pytest.fixture(scope="module")
def run(small_dataset, tmp_path_factory) -> tuple[SharedLaunch, Path]:
    base = tmp_path_factory.mktemp("routing_sum")
    out = base / "run"
    recipe = {
        "data": {"dir": str(small_dataset), "composition": {"image_text": 2, "text": 1, "image": 1}, "max_length": 48,
                 "eval_batches": 1, "ranking_images": 4, "retrieval_candidates": 0},
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                  "moe_intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": {"image": 1, "text": 2},
                  "moe_layer_frequency": 1, "max_position_embeddings": 64,
                  "router": {"mode": "modality_bias", "capacity_factor": 1.0}},
        "train": {"output_dir": str(out), "steps": STEPS, "expert_parallel_size": 2, "log_every": STEPS,
                  "eval_every": STEPS, "checkpoint_every": STEPS, "progress_bar": False}}
    (base / "recipe.json").write_text(json.dumps(recipe))
    ds_config = json.loads((REPO / "ds_configs/cpu_zero1_fp32.json").read_text())
    ds_config.update(gradient_accumulation_steps=GAS, tensorboard={"enabled": False})
    (base / "ds.json").write_text(json.dumps(ds_config))
    result = launch(["tests/routing_sum_worker.py", "--recipe", str(base / "recipe.json"), "--deepspeed_config",
                     str(base / "ds.json"), "--out", str(base)])
    return SharedLaunch(result, "test_logged_routing_counts_are_the_sum_over_ranks_of_real_tokens"), base


def test_logged_routing_counts_are_the_sum_over_ranks_of_real_tokens(run):
    shared, base = run
    shared.check()
    hand = [json.loads((base / f"hand_rank{r}.json").read_text()) for r in (0, 1)]
    records = [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines()]
    (train,) = [r for r in records if r["kind"] == "train"]
    assert train["step"] == STEPS and all(h["micro_batches"] == STEPS * GAS for h in hand)
    layers = sorted(hand[0]["layers"], key=int)
    assert len(train["routing"]) == len(layers) == 2
    for logged, layer in zip(train["routing"], layers):
        h0, h1 = hand[0]["layers"][layer], hand[1]["layers"][layer]
        # the two ranks' mixes differ: image tokens are a larger share of rank 0's tokens
        share = [h["tokens"][0] / sum(h["tokens"]) for h in (h0, h1)]
        assert share[0] > share[1] + 0.1 and min(h0["tokens"] + h1["tokens"]) > 0
        for m, modality in enumerate(("image", "text")):
            got = logged[modality]
            tokens = h0["tokens"][m] + h1["tokens"][m]
            assert got["tokens"] == tokens
            assert got["routed_per_expert"] == [a + b for a, b in zip(h0["routed"][m], h1["routed"][m])]
            assert got["kept_per_expert"] == [a + b for a, b in zip(h0["kept"][m], h1["kept"][m])]
            assert got["dropped"] == sum(got["routed_per_expert"]) - sum(got["kept_per_expert"])
            entropy = (h0["entropy_sum"][m] + h1["entropy_sum"][m]) / tokens
            assert got["entropy"] == pytest.approx(entropy, rel=1e-5)
    # padding was there to be left out: fewer tokens than positions on both ranks
    for h in hand:
        counted = sum(h["layers"][layers[0]]["tokens"])
        assert 0 < counted < h["positions"]
