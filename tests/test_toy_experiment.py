"""E4 Gaussian toy: metrics against hand-computed values, files written, and the qualitative result."""
import json
import math

import pytest
import torch

from mmoe_ds.experiments.toy import (ToyConfig, linear_ceiling_e2, fitted_halfspace_tv, main, mean_ci95,
                                     routing_tv, run_toy, sample_tokens, write_results)


def test_linear_ceiling_is_the_hand_computed_gaussian_value():
    # Projections N(0, 1.8) vs N(0, 0.2): densities cross at b = 0.7031, TV = Φ(1.5722) − Φ(0.5241).
    assert linear_ceiling_e2() == pytest.approx(0.94205 - 0.69989, abs=1e-3)
    assert linear_ceiling_e2() < 0.5


def test_measured_halfspace_tv_agrees_with_the_analytic_ceiling():
    x, m = sample_tokens("covariance", 8192, 16, torch.Generator().manual_seed(1))
    # Upward bias of a max over 16 axes of KS-type gaps at n = 4096 per modality is a few 0.01.
    assert 0.22 < fitted_halfspace_tv(x, m) < 0.30


def test_routing_tv_and_mean_ci95_hand_values():
    m = torch.tensor([0, 0, 1, 1])
    assert routing_tv(torch.tensor([0, 0, 1, 1]), m, 2)[0] == 1.0
    assert routing_tv(torch.tensor([0, 1, 0, 1]), m, 2)[0] == 0.0
    tv, p = routing_tv(torch.tensor([0, 0, 0, 3]), m, 4)
    assert tv == 0.5 and p == [[1.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.5]]
    s = mean_ci95([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["ci95"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert mean_ci95([0.7])["ci95"] is None  # one seed: no interval


def test_tiny_run_writes_results_with_expected_keys(tmp_path):
    results = run_toy([0], ToyConfig(steps=5, train_tokens=128, test_tokens=128, batch=32),
                      experts=(2,), regimes=("overlap",), routers=("agnostic", "aware_matched"))
    write_results(results, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(data) >= {"config", "seeds", "ceiling", "cells", "seconds"}
    assert set(data["cells"]) == {"overlap/E=2/agnostic", "overlap/E=2/aware_matched"}
    cell = data["cells"]["overlap/E=2/agnostic"]
    assert set(cell["tv"]) == {"mean", "ci95", "n"} and cell["tv"]["n"] == 1 and 0 <= cell["tv"]["mean"] <= 1
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.count("| overlap | 2 |") == 2 and " s on CPU" in table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "results.md"]


def test_cli_rejects_bad_seeds_and_dims_with_one_line(capsys):
    for argv in (["--seeds", "a,b"], ["--dim", "15"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--seeds: expected comma-separated integers" in err and "ToyConfig.dim" in err


def test_linear_router_stays_under_ceiling_where_the_aware_router_does_not():
    results = run_toy([0], ToyConfig(), experts=(2,), regimes=("separable", "covariance"),
                      routers=("agnostic", "agnostic_matched", "aware", "aware_matched"))
    tv = {k: c["tv"]["mean"] for k, c in results["cells"].items()}
    assert tv["separable/E=2/agnostic"] > 0.8 and tv["separable/E=2/aware"] > 0.8
    ceiling = linear_ceiling_e2()
    # Agnostic linear router, even when a loss asks for modality-specific routing: at or below the ceiling.
    assert tv["covariance/E=2/agnostic"] <= ceiling + 0.05
    assert tv["covariance/E=2/agnostic_matched"] <= ceiling + 0.05
    # The aware router with the same loss reaches modality routing.
    assert tv["covariance/E=2/aware_matched"] >= 0.95
