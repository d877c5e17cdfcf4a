"""What was written before the experts became 3-D parameters (one nn.Linear per expert and projection,
commit eb2094c; tests/fixtures/pre_3d_experts/make.py wrote the fixtures with that code) loads with
today's code: an HF export through `from_pretrained`, `train.init_from` and `mmoe-ds export`'s gather,
and a DeepSpeed training checkpoint through resume (weights; the optimizer state, laid out per expert
then, starts afresh and the log says why). A checkpoint of today's layout resumes its optimizer state."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from launch_util import deepspeed_launch

from mmoe_ds.export.gather import load_checkpoint_model
from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
from mmoe_ds.training.init_from import load_init_weights, read_init_source

FIXTURE = Path(__file__).parent / "fixtures" / "pre_3d_experts"
OLD = torch.load(FIXTURE / "logits.pt")


def batch() -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("pre_3d_make", FIXTURE / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    return make.fixed_batch()


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| relative to max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def test_the_fixture_export_holds_per_expert_names_only():
    from safetensors import safe_open

    with safe_open(str(FIXTURE / "export" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert sum(".deepspeed_experts." in n for n in names) == 2 * 4 * 3  # layers x experts x (w1, w3, w2)
    assert not any(n.endswith((".w13", ".experts.w2")) for n in names)


def test_an_old_export_loads_with_from_pretrained_and_computes_the_same_logits():
    model = MmoeForCausalLM.from_pretrained(FIXTURE / "export").eval()
    assert model.model.layers[0].ffn.deepspeed_moe.experts.w13.shape == (4, 64, 32)
    with torch.no_grad():
        got = model(**batch()).logits
    assert gap(got, OLD["export"]) <= 1e-5  # w1 and w3 now one GEMM: the same sums, maybe another order


def test_an_old_export_starts_a_run_through_init_from():
    source = read_init_source(FIXTURE / "export")
    torch.manual_seed(3)
    model = MmoeForCausalLM(MmoeConfig(**source.config, moe_backend="torch")).eval()
    report = load_init_weights(model, source, ep_rank=0, ep_size=1, reinit=[])
    assert any(".deepspeed_experts.3.w2.weight" in n for n in report.loaded)
    with torch.no_grad():
        assert gap(model(**batch()).logits, OLD["export"]) <= 1e-5


def test_an_old_checkpoint_exports_with_the_same_logits(tmp_path):
    model, meta, _ = load_checkpoint_model(FIXTURE / "run")
    assert "parameter_layout" not in meta
    with torch.no_grad():
        assert gap(model(**batch()).logits, OLD["run"]) <= 1e-5


def test_an_old_checkpoint_resumes_its_weights_and_restarts_the_optimizer_and_ours_resume_exactly(tmp_path):
    shutil.copytree(FIXTURE / "run", tmp_path / "run")
    deepspeed_launch([str(Path(__file__).parent / "pre_3d_worker.py"), "--out", str(tmp_path / "r")], num_procs=1)
    r = json.loads((tmp_path / "r.rank0.json").read_text())
    assert r["before_resume_gap"] > 0.1 * r["scale"]  # another start: the match below is the checkpoint's doing
    assert r["resumed_gap"] <= 1e-5 * r["scale"]
    assert "before the 3-D expert parameters" in r["restarted"]
    assert r["next_loss"] == r["next_loss"] and r["next_loss"] < 10  # finite: training goes on
    assert r["our_layout"] == "experts_w13_w2" and r["ours_restarted"] is None
    assert r["resumed"] == r["continued"]  # Adam's moments came back: the same next steps, bit for bit
