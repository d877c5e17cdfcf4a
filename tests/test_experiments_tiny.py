"""E1, E2, E3, E5 and E6 end to end at --scale tiny (4 training steps per run, one seed), with the
real deepspeed launcher: each writes results.json / results.md / its PNGs with the keys the docs
need; runs are shared between experiments through the content-hash cache, and a finished
experiment run again trains nothing."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmoe_ds.experiments.__main__ import main as experiments_main
from mmoe_ds.experiments.__main__ import run_experiment
from mmoe_ds.experiments.runner import Scale

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def scale() -> Scale:
    return Scale.load("tiny")


@pytest.fixture(scope="module")
def e1(out, scale) -> dict:
    return run_experiment("e1", [0], scale, out, quiet=True)


def check_common(results: dict, folder: Path, pngs: list[str]) -> None:
    saved = json.loads((folder / "results.json").read_text())
    assert saved["experiment"] == results["experiment"] and saved["seeds"] == [0]
    assert {"title", "command", "scale", "tables", "contrasts", "plots", "caveats"} <= set(saved)
    assert saved["scale"]["name"] == "tiny" and saved["scale"]["steps"] == 4
    for table in saved["tables"]:
        for row in table["rows"]:
            for key, _ in table["columns"]:
                if key in row["cells"]:
                    assert set(row["cells"][key]) == {"mean", "ci95", "n", "values"}
                    assert row["cells"][key]["n"] == 1 and row["cells"][key]["ci95"] is None
    for c in saved["contrasts"]:
        assert len(c["diff"]["values"]) == 1
    assert [p["file"] for p in saved["plots"]] == pngs
    for png in pngs:
        assert (folder / png).read_bytes()[:8] == PNG
    md = (folder / "results.md").read_text()
    assert md.startswith(f"## {results['experiment'].upper()}:") and "(1 seed: no interval, no conclusion)" in md


def test_e1_trains_the_matched_2x2_with_a_target_measured_from_the_aware_run(e1, out):
    check_common(e1, out / "e1_matched", ["e1_matched.png"])
    labels = [row["label"] for row in e1["tables"][0]["rows"]]
    assert labels == [f"{r}, emb {e}" for e in ("on", "off") for r in
                      ("aware", "agnostic", "agnostic + matched loss", "aware + matched loss")]
    assert e1["runs_launched"] == 8 and e1["runs_reused"] == 0
    for emb in ("on", "off"):
        aware = out / e1["runs"][f"aware, emb {emb}"]["0"]["dir"]
        records = [json.loads(line) for line in (aware / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if r["kind"] == "train"][-1]  # 2 windows; the last 20% of them is the last one
        routed = last["routing"][0]  # tiny: one MoE layer
        expected = {m: np.array(routed[m]["routed_per_expert"]) / sum(routed[m]["routed_per_expert"])
                    for m in ("image", "text")}
        target = e1["targets"][f"emb {emb}/seed 0"]
        for m in ("image", "text"):
            assert target[m] == pytest.approx(expected[m].tolist(), abs=1e-6)
        for cell in ("agnostic + matched loss", "aware + matched loss"):
            recipe = json.loads((out / e1["runs"][f"{cell}, emb {emb}"]["0"]["dir"] / "recipe.json").read_text())
            assert recipe["model"]["router"]["matched_utilization_target"] == target
            assert recipe["model"]["router"]["matched_utilization_coef"] == 0.05
            assert recipe["model"].get("modality_embedding", True) is (emb == "on")
    for cell in e1["runs"].values():
        m = cell["0"]["metrics"]
        assert 0 <= m["tv"] <= 1 and 0 <= m["caption_rank_acc"] <= 1 and math.isfinite(m["caption_loss"])


def test_e1_run_again_reuses_every_run(e1, out, scale):
    again = run_experiment("e1", [0], scale, out, quiet=True)
    assert again["runs_launched"] == 0 and again["runs_reused"] == 8
    assert again["runs"] == e1["runs"]


def test_e2_one_long_agnostic_run_measured_at_each_multiple(e1, out, scale):
    r = run_experiment("e2", [0], scale, out, quiet=True)
    check_common(r, out / "e2_convergence", ["e2_convergence.png"])
    assert r["runs_launched"] == 1 and r["runs_reused"] == 2  # E1's aware and agnostic runs
    assert sorted(int(k) for k in r["curves"]["tv"]) == list(range(1, 11))
    assert [row["label"].split(" (")[0] for row in r["tables"][0]["rows"]][2:] == \
           ["agnostic at 1×", "agnostic at 5×", "agnostic at 10×"]
    assert len(r["findings"]) == 3 and all(("reaches" in f) or ("not within 10×" in f) for f in r["findings"])


def test_e6_flips_the_batch_mix(e1, out, scale):
    r = run_experiment("e6", [0], scale, out, quiet=True)
    check_common(r, out / "e6_audit", ["e6_audit.png"])
    assert r["runs_launched"] == 4 and r["runs_reused"] == 2
    assert r["compositions"]["image_heavy"] == {"image_text": 2, "image": 6}
    audit = {row["label"]: row["cells"] for row in r["tables"][0]["rows"]}
    for label, cells in audit.items():
        share = cells["share_image"]["mean"] + cells["share_text"]["mean"]
        assert share == pytest.approx(1.0), label
    # with text-heavy batches, images are a small share of the expert compute
    assert audit["agnostic, text-heavy"]["share_image"]["mean"] < audit["agnostic, image-heavy"]["share_image"]["mean"]


def test_e3_analyzes_every_router_design(e1, out, scale):
    r = run_experiment("e3", [0], scale, out, quiet=True)
    check_common(r, out / "e3_function", ["e3_cka.png", "e3_probe.png"])
    designs = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "recipes/modes").glob("*.json"))
    assert r["designs"] == designs and [row["label"] for row in r["tables"][0]["rows"]] == designs
    assert r["runs_launched"] == len(designs) - 2  # agnostic and modality_bias are E1's runs
    for row in r["tables"][0]["rows"]:
        assert 0 <= row["cells"]["probe_acc"]["mean"] <= 1


def test_e5_transfers_to_the_emoji_dataset_and_fine_tunes_three_ways(e1, out, scale):
    from mmoe_ds.data.sources.emoji import EMOJI_FONT

    if not EMOJI_FONT.exists():
        pytest.skip(f"{EMOJI_FONT} missing: apt-get install fonts-noto-color-emoji")
    r = run_experiment("e5", [0], scale, out, quiet=True)
    check_common(r, out / "e5_transfer", ["e5_transfer.png"])
    assert r["runs_launched"] == 3 and r["runs_reused"] == 1
    assert [row["label"] for row in r["tables"][1]["rows"]] == ["router trainable", "router frozen", "router reinit"]
    zero = r["tables"][0]["rows"][0]["cells"]
    assert 0 <= zero["tv_image"]["mean"] <= 1 and zero["mi_a"]["mean"] > -0.1


def test_cli_refuses_bad_seeds_in_one_line(capsys):
    with pytest.raises(SystemExit):
        experiments_main(["e1", "--seeds", "0,x"])
    err = capsys.readouterr().err
    assert "expected comma-separated integers like 0,1,2" in err and "Traceback" not in err
