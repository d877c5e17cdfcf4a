"""Expert parallelism over real gloo all-to-all: 2 processes started by the deepspeed launcher."""
from __future__ import annotations

import json

import pytest

from launch_util import deepspeed_launch

MODES = ("agnostic", "modality_bias", "masked_pools", "separate_routers")


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep") / "result"
    deepspeed_launch(["tests/ep_worker.py", "--out", str(out)])
    return [json.loads((out.parent / f"result.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("capacity", ["capacity", "dropless"])
def test_ep2_equals_ep1_and_torch_path(ep_results, mode, capacity):
    for rank, result in enumerate(ep_results):
        r = result["modes"][f"{mode}/{capacity}"]
        assert r["ep2_vs_ep1_out"] <= 1e-5 and r["ep2_vs_ep1_grad"] <= 1e-5, (rank, r)
        assert r["deepspeed_vs_torch_out"] <= 1e-5 and r["deepspeed_vs_torch_grad"] <= 1e-5, (rank, r)
        assert len(set(r["dropped"])) == 1, f"all three paths must drop the same routes: {r['dropped']}"
        if capacity == "dropless":
            assert r["dropped"][0] == 0


def test_some_capacity_runs_drop_tokens(ep_results):
    dropped = [r["modes"][f"{m}/capacity"]["dropped"][0] for r in ep_results for m in MODES]
    assert sum(dropped) > 0, "capacity runs should exercise dropping across ranks"


def test_deepspeed_engine_steps_lower_the_loss(ep_results):
    for result in ep_results:
        losses = result["losses"]
        assert losses[-1] < 0.8 * losses[0], losses
