"""E1, E2, E3, E5 and E6 end to end at --scale tiny (4 training steps per run, one seed), with the
real deepspeed launcher: each writes results.json / results.md / its PNGs with the keys the docs
need; runs are shared between experiments through the content-hash cache, and a finished
experiment run again trains nothing. E1 goes through the command line from a folder that is not the
checkout (--root names the checkout, --out the experiments folder), as from an installed package."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from mmoe_ds.experiments.__main__ import main as experiments_main
from mmoe_ds.experiments.__main__ import run_experiment
from mmoe_ds.experiments.render import render_experiment
from mmoe_ds.experiments.runner import Scale

PNG = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def scale() -> Scale:
    return Scale.load("tiny", root=REPO)


@pytest.fixture(scope="module")
def e1(out, tmp_path_factory) -> dict:
    elsewhere = tmp_path_factory.mktemp("cwd")  # neither the checkout nor the output folder
    before = Path.cwd()
    os.chdir(elsewhere)
    try:
        rc = experiments_main(["e1", "--seeds", "0", "--scale", "tiny", "--root", str(REPO), "--out", str(out),
                               "--quiet"])
    finally:
        os.chdir(before)
    assert rc == 0
    assert not (elsewhere / "runs").exists() and list(elsewhere.iterdir()) == []
    return json.loads((out / "e1_matched" / "results.json").read_text())


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
    assert md == render_experiment(saved)  # rendered from results.json alone
    assert md.startswith(f"## {results['experiment'].upper()}:") and "(1 seed: no interval, no conclusion)" in md


def test_e1_trains_every_cell_with_per_layer_targets_measured_from_the_aware_run(e1, out):
    from mmoe_ds.experiments import e1_matched as E1

    check_common(e1, out / "e1_matched", ["e1_matched.png"])
    labels = [row["label"] for row in e1["tables"][0]["rows"]]
    assert labels == [f"{c.label} (n=1)" for c in E1.CELLS]
    # 6 cells + the size sweep's other size (2 cells) + the covariance data (3 cells)
    assert e1["runs_launched"] == 6 + 2 + 3 and e1["runs_reused"] == 0
    for suffix in ("", " [size wide]", " [covariance data]"):
        aware = out / e1["runs"][E1.AWARE.label + suffix]["0"]["dir"]
        agnostic = out / e1["runs"][E1.AGNOSTIC.label + suffix]["0"]["dir"] if suffix != " [size wide]" else None

        def last_routing(folder):
            records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            return [r for r in records if r["kind"] == "train"][-1]["routing"]  # the last 20% of 2 windows

        expected = {m: [(np.array(layer[m]["routed_per_expert"]) / sum(layer[m]["routed_per_expert"])).tolist()
                        for layer in last_routing(aware)] for m in ("image", "text")}
        matched_dir = out / e1["runs"][E1.AGNOSTIC_MATCHED.label + suffix]["0"]["dir"]
        recipe = json.loads((matched_dir / "recipe.json").read_text())
        target = recipe["model"]["router"]["matched_utilization_target"]
        for m in ("image", "text"):  # the target is the aware run's routing, layer by layer
            assert len(target[m]) == len(expected[m])
            for got, want in zip(target[m], expected[m]):
                assert got == pytest.approx(want, abs=1e-6)
        if agnostic is not None:  # ... and not the agnostic run's (unless they happen to agree)
            other = [layer["image"]["routed_per_expert"] for layer in last_routing(agnostic)]
            mine = [layer["image"]["routed_per_expert"] for layer in last_routing(aware)]
            if other != mine:
                assert target["image"] != [(np.array(o) / sum(o)).tolist() for o in other]
        assert recipe["model"]["router"]["matched_utilization_coef"] == 0.2
    recipe = json.loads((out / e1["runs"][E1.AWARE_MATCHED.label]["0"]["dir"] / "recipe.json").read_text())
    assert recipe["model"]["router"]["matched_utilization_target"] == e1["targets"]["seed 0"]
    cov = json.loads((out / e1["runs"][E1.AWARE.label + " [covariance data]"]["0"]["dir"] / "recipe.json").read_text())
    assert cov["model"]["modality_embedding"] is False and cov["model"]["position_embedding_type"] == "rope"
    assert [row["seed"] for row in e1["matched"]] == [0, 0]
    assert e1["contrasts"][0]["primary"] and e1["contrasts"][0]["metric"] == "caption loss"
    for cell in e1["runs"].values():
        m = cell["0"]["metrics"]
        assert 0 <= m["tv"] <= 1 and 0 <= m["caption_rank_acc"] <= 1 and math.isfinite(m["caption_loss"])
        assert m["chance_caption_loss"] == pytest.approx(math.log(m["chance_text_ppl"]))


def test_e1_run_again_reuses_every_run(e1, out, scale):
    again = run_experiment("e1", [0], scale, out, quiet=True)
    assert again["runs_launched"] == 0 and again["runs_reused"] == 11
    assert again["runs"] == e1["runs"]


def test_e2_measures_routing_patterns_of_two_long_runs_at_each_multiple(e1, out, scale):
    r = run_experiment("e2", [0], scale, out, quiet=True)
    check_common(r, out / "e2_convergence", ["e2_convergence.png"])
    assert r["runs_launched"] == 2 and r["runs_reused"] == 1  # the long runs; E1's aware run
    assert sorted(int(k) for k in r["curves"]["dist_same_step"]) == [1, 2, 5, 10]
    assert [row["label"].split(" (")[0] for row in r["tables"][0]["rows"]] == ["1×", "2×", "5×", "10×"]
    for N, by_seed in r["curves"]["dist_same_step"].items():
        assert 0 <= by_seed["0"] <= 1
    assert r["contrasts"][0]["primary"]


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
    designs = sorted(p.stem for p in (REPO / "recipes/modes").glob("*.json"))
    assert r["designs"] == designs and [row["label"] for row in r["tables"][0]["rows"]] == designs
    assert r["runs_launched"] == len(designs) - 2  # agnostic and modality_bias are E1's runs
    # the CKA figure's matrices are in results.json: one E x E matrix per design and MoE layer
    assert sorted(r["cka"]["all"]) == designs and r["cka"]["seed"] == 0
    assert all(len(per_layer) == len(r["layers"]) for per_layer in r["cka"]["all"].values())
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


def test_docs_open_with_what_e1_shows_and_rewrite_the_readme_block(e1, out, tmp_path):
    from mmoe_ds.experiments import docs
    from mmoe_ds.experiments.render import fmt_summary

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n{docs.README_START}\nold text\n{docs.README_END}\nafter\n")
    doc = docs.write_document(out, tmp_path / "docs" / "experiments.md", readme)
    text = doc.read_text()
    lines = docs.summary_lines(docs.load_results(out))
    assert text.index("## What the results show and do not show at this scale") < text.index("## E1:")
    assert "\n".join(lines) in text
    block = readme.read_text()
    assert block.startswith("# x\n\nintro\n" + docs.README_START) and block.endswith(docs.README_END + "\nafter\n")
    assert "old text" not in block and "\n".join(lines) in block
    assert "Does the aware router specialize?" in lines[1]
    key = e1["key"]
    assert fmt_summary(key["aware_tv"]) in lines[1] and fmt_summary(key["aware_pmb_tv"]) in lines[1]
    # regenerating from the same results gives the same bytes
    first = text
    assert docs.write_document(out, tmp_path / "docs" / "experiments.md", readme).read_text() == first
