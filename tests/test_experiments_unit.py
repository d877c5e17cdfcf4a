"""Unit tests of the experiment runner's pieces that need no training: the matched-utilization
target derivation, recipe merging, E2's "steps until it matches", E6's mixes, E3's expansion of a
4-expert design, E5's divergences, and the docs generator on fabricated results files."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from mmoe_ds.errors import ExperimentError
from mmoe_ds.experiments import docs
from mmoe_ds.experiments.e1_matched import derive_matched_target
from mmoe_ds.experiments.e3_function import expand_router
from mmoe_ds.experiments.e5_transfer import js_bits
from mmoe_ds.experiments.e6_audit import mixes
from mmoe_ds.experiments.runner import deep_merge
from mmoe_ds.experiments.stats import contrast, summarize


# -- target derivation ---------------------------------------------------------------------------
def test_target_is_each_layers_normalised_counts():
    target = derive_matched_target([np.array([[6, 2, 2, 0], [1, 1, 3, 5]]), np.array([[0, 2, 2, 6], [4, 4, 2, 0]])])
    assert target == {"image": [[0.6, 0.2, 0.2, 0.0], [0.0, 0.2, 0.2, 0.6]],
                      "text": [[0.1, 0.1, 0.3, 0.5], [0.4, 0.4, 0.2, 0.0]]}


def test_target_sums_to_one_after_rounding():
    target = derive_matched_target([np.array([[1, 1, 1], [2, 1, 1]])])  # thirds: rounding leaves 0.999999
    assert sum(target["image"][0]) == pytest.approx(1.0, abs=1e-12)
    assert sum(target["text"][0]) == pytest.approx(1.0, abs=1e-12)


def test_target_refuses_a_layer_without_routes_for_a_modality():
    with pytest.raises(ValueError, match="routes for every modality"):
        derive_matched_target([np.array([[1, 2, 3, 4], [0, 0, 0, 0]])])


def test_pattern_distance_ignores_expert_labels():
    from mmoe_ds.experiments.e2_convergence import pattern_distance

    a = [np.array([[0.5, 0.3, 0.2, 0.0], [0.0, 0.2, 0.3, 0.5]])]
    b = [a[0][:, ::-1].copy()]  # the same routing, experts relabelled
    assert pattern_distance(a, b) == pytest.approx(0.0)
    c = [np.full((2, 4), 0.25)]
    # uniform vs a: TV image = .5(.25+.05+.05+.25) = .3, text the same
    assert pattern_distance(a, c) == pytest.approx(0.3)


# -- recipes -------------------------------------------------------------------------------------
def test_deep_merge_merges_sections_but_replaces_a_batch_mix_whole():
    base = {"data": {"composition": {"image_text": 6, "text": 1, "image": 1}, "max_length": 48},
            "model": {"router": {"mode": "agnostic", "z_loss_coef": 0.001}}}
    merged = deep_merge(base, {"data": {"composition": {"image_text": 2, "image": 6}},
                               "model": {"router": {"matched_utilization_coef": 0.05}}})
    assert merged["data"] == {"composition": {"image_text": 2, "image": 6}, "max_length": 48}
    assert merged["model"]["router"] == {"mode": "agnostic", "z_loss_coef": 0.001, "matched_utilization_coef": 0.05}
    assert base["data"]["composition"] == {"image_text": 6, "text": 1, "image": 1}  # not modified


def test_e6_mixes_keep_the_batch_size_and_flip_the_majority():
    m = mixes(8)
    assert m["default"] is None
    assert m["image_heavy"] == {"image_text": 2, "image": 6}
    assert m["text_heavy"] == {"image_text": 2, "text": 6}
    assert sum(mixes(32)["text_heavy"].values()) == 32
    with pytest.raises(ValueError, match="at least 4"):
        mixes(3)


def test_e3_carries_a_four_expert_design_to_sixteen_experts():
    router = {"pools": {"image": [0, 1, 2], "text": [1, 2, 3]}}
    assert expand_router(router, 8)["pools"] == {"image": [0, 1, 2, 3, 4, 5], "text": [2, 3, 4, 5, 6, 7]}
    target = {"matched_utilization_target": {"image": [0.4, 0.4, 0.1, 0.1], "text": [0.1, 0.1, 0.4, 0.4]}}
    expanded = expand_router(target, 8)["matched_utilization_target"]["image"]
    assert expanded == [0.2, 0.2, 0.2, 0.2, 0.05, 0.05, 0.05, 0.05]
    assert expand_router(router, 4) == {}
    assert expand_router({"mode": "agnostic"}, 16) == {}


# -- measures ------------------------------------------------------------------------------------
def test_js_divergence_bits():
    assert js_bits([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_bits([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0)
    # p = (1, 0), q = (.5, .5): m = (.75, .25); KL(p||m) = log2(4/3); KL(q||m) = .5 log2(2/3) + .5 log2(2)
    expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert js_bits([1, 0], [0.5, 0.5]) == pytest.approx(expected)


def test_summarize_gives_a_t_interval_and_none_for_one_seed():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["n"] == 3
    assert s["ci95"] == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) · sd / sqrt(n)
    assert summarize([0.5])["ci95"] is None


# -- docs generator ------------------------------------------------------------------------------
def fabricated(values_a, values_b, acc_values) -> dict:
    """A results.json as an experiment writes it, with numbers chosen by the test."""
    return {"experiment": "e1", "name": "e1_matched", "title": "fabricated",
            "command": "python -m mmoe_ds.experiments e1",
            "scale": {"name": "cpu", "description": "Test scale.", "steps": 123}, "seeds": [0, 1, 2], "seconds": 60.0,
            "runs_launched": 5, "runs_reused": 7, "run_minutes": 42.25,
            "tables": [{"title": "T", "row_header": "cell", "columns": [["acc", "accuracy"]],
                        "rows": [{"label": "aware", "cells": {"acc": summarize(acc_values)}}]}],
            "contrasts": [contrast("Aware vs matched", "accuracy", "aware", dict(enumerate(values_a)), "matched",
                                   dict(enumerate(values_b)))],
            "plots": [{"file": "e1_matched.png", "caption": "the plot"}], "caveats": ["small model"]}


def write(tmp_path, results) -> None:
    folder = tmp_path / "runs" / "e1_matched"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))


def test_docs_read_every_number_and_sentence_from_the_results(tmp_path):
    # per-seed differences .10 .12 .11: mean .110, sd .01, CI half-width 4.3027 · .01 / sqrt 3 = .0248
    write(tmp_path, fabricated([0.60, 0.62, 0.61], [0.50, 0.50, 0.50], [0.40, 0.45, 0.44]))
    text = docs.write_document(tmp_path / "runs", tmp_path / "docs" / "experiments.md").read_text()
    assert "Aware vs matched — accuracy, aware minus matched: 0.110 ± 0.025" in text
    assert "[0.085, 0.135]" in text
    assert "aware is higher than matched, i.e. aware is better (CI excludes 0)" in text
    assert "| aware | 0.430 ± 0.066 |" in text  # mean .43, sd .02646, 4.3027 · .02646 / sqrt 3 = .0657
    assert "![the plot](../runs/e1_matched/e1_matched.png)" in text
    assert "12 runs, 42.2 min of training wall time summed over runs" in text
    assert "this invocation trained 5 and reused 7 in 1.000 min" in text
    assert "**E2**: not run yet" in text and "## E6" in text

    # other numbers in the same file: the document follows them
    write(tmp_path, fabricated([0.50, 0.70, 0.52], [0.50, 0.50, 0.50], [0.20, 0.20, 0.20]))
    text = docs.write_document(tmp_path / "runs", tmp_path / "docs" / "experiments.md").read_text()
    assert "aware minus matched: 0.073 ±" in text and "0.110" not in text
    assert "the CI overlaps 0 → no evidence of a difference at this scale" in text
    assert "| aware | 0.200 ± 0.000 |" in text


def test_docs_say_no_conclusion_for_one_seed(tmp_path):
    results = fabricated([0.6], [0.5], [0.4])
    results["seeds"] = [0]
    write(tmp_path, results)
    text = docs.write_document(tmp_path / "runs", tmp_path / "experiments.md").read_text()
    assert "aware minus matched: 0.100 (1 seed: no interval, no conclusion)" in text
    assert "| aware | 0.400 (n=1, no CI) |" in text


def test_docs_take_the_toy_section_from_its_own_results(tmp_path):
    folder = tmp_path / "runs" / "e4_toy"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"seeds": [0, 1, 2], "headline": "agnostic TV 0.020 ± 0.056"}))
    (folder / "results.md").write_text("# E4: the toy\n\n| a |\n\n![TV against the ceiling](tv_vs_ceiling.png)\n\n"
                                       "## Details\n")
    text = docs.write_document(tmp_path / "runs", tmp_path / "docs" / "experiments.md").read_text()
    assert "- **E4** (CPU toy, 3 seeds): agnostic TV 0.020 ± 0.056" in text
    assert "\n## E4: the toy\n" in text and "\n### Details\n" in text
    assert "![TV against the ceiling](../runs/e4_toy/tv_vs_ceiling.png)" in text


def test_retention_is_a_ratio_only_when_there_is_something_to_retain():
    from mmoe_ds.experiments.e5_transfer import retention_sentence

    assert "keeps 0.50 of its I(M;E) on B (0.150 of 0.300 bits" in retention_sentence([0.2, 0.4], [0.1, 0.2])
    assert "retention is not meaningful; on B it is 0.256 bits" in retention_sentence([0.01, 0.02], [0.256, 0.256])


def test_committed_docs_and_readme_block_regenerate_from_the_committed_results():
    repo = Path(__file__).resolve().parents[1]
    out, doc = repo / "runs" / "experiments", repo / "docs" / "experiments.md"
    assert docs.render_document(out, doc) == doc.read_text(), "rerun: python -m mmoe_ds.experiments docs"
    readme = (repo / "README.md").read_text()
    block = readme.split(docs.README_START, 1)[1].split(docs.README_END, 1)[0]
    assert "\n".join(docs.summary_lines(docs.load_results(out))) in block, "rerun: python -m mmoe_ds.experiments docs"


# -- rendering from results.json alone, and the command line's root ------------------------------
REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("folder", ["e1_matched", "e2_convergence", "e5_transfer", "e6_audit"])
def test_results_md_and_figures_render_from_the_committed_results_json_alone(folder, tmp_path):
    from mmoe_ds.experiments.render import render_folder

    committed = REPO / "runs" / "experiments" / folder
    (tmp_path / "results.json").write_bytes((committed / "results.json").read_bytes())
    results = render_folder(tmp_path)
    assert (tmp_path / "results.md").read_text() == (committed / "results.md").read_text()
    for plot in results["plots"]:
        png = (tmp_path / plot["file"]).read_bytes()
        assert png[:8] == PNG and len(png) > 10_000, plot["file"]


def test_the_command_line_finds_recipes_under_root_and_says_so_in_one_line_when_they_are_missing(tmp_path, capsys):
    from mmoe_ds.experiments.__main__ import main, parse_args

    args = parse_args(["docs", "--root", str(tmp_path)])
    assert args.out == tmp_path / "runs" / "experiments" and args.doc == tmp_path / "docs" / "experiments.md"
    assert args.readme == tmp_path / "README.md"
    assert parse_args(["e1", "--root", str(tmp_path), "--out", "elsewhere"]).out == Path("elsewhere")

    assert main(["e1", "--scale", "tiny", "--root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--root {tmp_path.resolve()}: no recipes/modes/ and no recipes/experiments/ there" in err
    assert not (tmp_path / "out").exists()

    assert main(["docs", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder, so no results to document" in err
    assert not (tmp_path / "docs").exists()


def test_a_scale_reads_its_recipes_from_its_root_whatever_the_working_directory(tmp_path, monkeypatch):
    from mmoe_ds.experiments.e1_matched import AWARE, matched_coef, spec
    from mmoe_ds.experiments.runner import Runner, Scale

    monkeypatch.chdir(tmp_path)  # no recipes/ here
    scale = Scale.load("tiny", root=REPO)
    assert scale.root == REPO.resolve() and scale.steps == 4
    runner = Runner(tmp_path / "out", scale, log=False)
    assert runner.modes() == sorted(p.stem for p in (REPO / "recipes" / "modes").glob("*.json"))
    assert matched_coef(runner) == 0.2
    assert runner.base_recipe(spec(AWARE, 0).base)["model"]["router"]["mode"] == "modality_bias"
    with pytest.raises(ExperimentError, match="no such routing recipe; choose one of"):
        runner.base_recipe("recipes/modes/nope.json")
    env = runner.env()
    import mmoe_ds

    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(mmoe_ds.__file__).resolve().parent.parent)


def test_e3_results_written_before_the_cka_key_say_how_to_redraw_their_figures(tmp_path):
    from mmoe_ds.experiments.render import render_folder

    committed = json.loads((REPO / "runs" / "experiments" / "e3_function" / "results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps({k: v for k, v in committed.items() if k != "cka"}))
    with pytest.raises(ExperimentError, match="no CKA matrices .*rerun: python -m mmoe_ds.experiments e3"):
        render_folder(tmp_path)
