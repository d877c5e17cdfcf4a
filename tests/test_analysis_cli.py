"""`mmoe-ds analyze` end to end on a real export (save_export of a tiny model) and real prepared data
(the small embedded build), plus its one-line errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmoe_ds.cli import main
from mmoe_ds.data.processor import MmoeProcessor
from mmoe_ds.export import save_export
from mmoe_ds.model import MmoeConfig, MmoeForCausalLM

N_PROBE = 24
LAYER_KEYS = {"layer", "tv", "mi_bits", "mi_bits_plugin", "mi_null_p", "nmi", "soft_mi_bits", "probe_acc",
              "logit_var_share_modality", "per_modality", "cka"}
MODALITY_KEYS = {"utilization", "effective_experts", "gini", "drop_rate", "compute_share", "mean_top1_prob"}
ALARM_KEYS = {"layer", "kind", "modality", "expert", "value", "threshold", "message"}
PNGS = ("utilization.png", "cka.png", "layers.png")


def tiny_model(processor: MmoeProcessor, seed: int = 0, **kw) -> MmoeForCausalLM:
    tok = processor.tokenizer
    base = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok={"image": 1, "text": 2},
                router={"mode": "modality_bias", "capacity_factor": 1.0, "eval_capacity_factor": 1.0,
                        "modality_bias_init_std": 1.0},
                max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, image_token_id=tok.convert_tokens_to_ids("<image>"),
                image_size=processor.image_size, patch_size=processor.patch_size,
                num_channels=processor.num_channels)
    base.update(kw)
    torch.manual_seed(seed)
    return MmoeForCausalLM(MmoeConfig(**base)).eval()


@pytest.fixture(scope="module")
def processor(small_dataset) -> MmoeProcessor:
    return MmoeProcessor.from_pretrained(small_dataset / "processor")


@pytest.fixture(scope="module")
def export_dir(small_dataset, processor, tmp_path_factory) -> Path:
    return save_export(tiny_model(processor), tmp_path_factory.mktemp("exports") / "tiny",
                       processor_dir=small_dataset / "processor")


def permuted_experts(model: MmoeForCausalLM, perm: list[int]) -> MmoeForCausalLM:
    """The same function with the experts of every MoE layer relabelled: new expert i = old expert perm[i]."""
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_moe:
                moe = layer.ffn.deepspeed_moe
                moe.experts.w13.copy_(moe.experts.w13[perm].clone())  # [E, 2f, d]: expert i <- old expert perm[i]
                moe.experts.w2.copy_(moe.experts.w2[perm].clone())
                moe.gate.wg.weight.copy_(moe.gate.wg.weight[perm].clone())
                moe.gate.modality_bias.copy_(moe.gate.modality_bias[:, perm].clone())
    return model


def run_analyze(*args) -> int:
    return main(["analyze", *map(str, args), "--n-probe", str(N_PROBE), "--n-perm", "50", "--batch-size", "8"])


def test_analyze_an_export_writes_the_report(export_dir, small_dataset, processor, tmp_path):
    out = tmp_path / "report"
    assert run_analyze(export_dir, "--data", small_dataset, "--out", out) == 0
    for name in ("analysis.json", "analysis.md", *PNGS):
        assert (out / name).stat().st_size > 0, name
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    d = json.loads((out / "analysis.json").read_text())
    assert d["source"] == str(export_dir) and d["data_dir"] == str(small_dataset)
    # 24 image+caption samples, each with num_patches <image> tokens (28 px / 7 px patches -> 16)
    assert processor.num_patches == 16
    assert d["n_probe_tokens"]["image"] == N_PROBE * 16
    assert d["n_probe_tokens"]["text"] >= N_PROBE * 3  # <bos>, >= 1 caption token, <eos>
    assert [la["layer"] for la in d["layers"]] == [1]  # moe_layer_frequency 2 of 2 layers: decoder layer 1
    la = d["layers"][0]
    assert LAYER_KEYS <= la.keys()
    for m in ("image", "text"):
        p = la["per_modality"][m]
        assert MODALITY_KEYS <= p.keys()
        assert len(p["utilization"]) == 4 and sum(p["utilization"]) == pytest.approx(1.0)
        assert 1.0 <= p["effective_experts"] <= 4.0 and 0.0 <= p["drop_rate"] <= 1.0
        assert 0.25 <= p["mean_top1_prob"] <= 1.0
    shares = [la["per_modality"][m]["compute_share"] for m in ("image", "text")]
    assert sum(shares) == pytest.approx(1.0)
    assert 0.0 <= la["tv"] <= 1.0 and 0.0 < la["mi_null_p"] <= 1.0 and 0.0 <= la["probe_acc"] <= 1.0
    assert la["mi_bits_plugin"] >= la["mi_bits"] - 1.0  # MM correction is small next to 1 bit here
    assert la["logit_var_share_modality"] is not None and 0.0 <= la["logit_var_share_modality"] <= 1.0
    for kind in ("all", "image", "text", "weights"):
        a = np.array(la["cka"][kind], dtype=float)
        assert a.shape == (4, 4) and np.allclose(np.diag(a), 1.0) and np.allclose(a, a.T)
    for alarm in d["alarms"]:
        assert alarm.keys() == ALARM_KEYS
    md = (out / "analysis.md").read_text()
    assert "| 1 | image | 384 |" in md


def test_compare_matches_relabelled_experts(export_dir, small_dataset, processor, tmp_path):
    perm = [2, 0, 3, 1]
    other = save_export(permuted_experts(tiny_model(processor), perm), tmp_path / "permuted",
                        processor_dir=small_dataset / "processor")
    out = tmp_path / "report"
    assert run_analyze(export_dir, "--data", small_dataset, "--out", out, "--compare", other) == 0
    d = json.loads((out / "analysis.json").read_text())
    (layer,) = d["compare"]["layers"]
    # this run's expert j is the other run's expert i where perm[i] = j
    assert layer["partner"] == [perm.index(j) for j in range(4)] == [1, 3, 0, 2]
    assert layer["matched_cka"] == pytest.approx([1.0] * 4, abs=1e-6)
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_not_a_run_or_export(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_analyze(tmp_path / "empty", "--out", tmp_path / "out") == 2
    assert "neither a run" in one_line_error(capsys)
    assert run_analyze(tmp_path / "missing") == 2
    assert "no such folder" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_export_without_data(export_dir, tmp_path, capsys):
    assert run_analyze(export_dir, "--out", tmp_path / "out") == 2
    assert "pass --data" in one_line_error(capsys)


def test_data_without_a_test_split(export_dir, small_dataset, tmp_path, capsys):
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    manifest["shards"] = {k: v for k, v in manifest["shards"].items() if v["split"] != "test"}
    data = tmp_path / "no_test"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert run_analyze(export_dir, "--data", data, "--out", tmp_path / "out") == 2
    assert "no image+caption samples in split 'test'" in one_line_error(capsys)
    assert run_analyze(export_dir, "--data", tmp_path, "--out", tmp_path / "out") == 2
    assert "not a prepared dataset" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_model_without_moe_layers(small_dataset, processor, tmp_path, capsys):
    dense = save_export(tiny_model(processor, num_hidden_layers=1, moe_layer_frequency=2), tmp_path / "dense",
                        processor_dir=small_dataset / "processor")
    capsys.readouterr()  # the export's own progress output
    assert run_analyze(dense, "--data", small_dataset, "--out", tmp_path / "out") == 2
    assert "no MoE layer" in one_line_error(capsys)


def test_bad_threshold_is_one_line(export_dir, small_dataset, tmp_path, capsys):
    assert run_analyze(export_dir, "--data", small_dataset, "--monopoly-share", "1.5") == 2
    assert "monopoly_share" in one_line_error(capsys)
