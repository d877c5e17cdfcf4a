"""Expert parallelism over real gloo all-to-all: 2 processes started by the deepspeed launcher."""
from __future__ import annotations

import json

import pytest
from launch_util import SharedLaunch, launch

MODES = ("agnostic", "modality_bias", "masked_pools", "separate_routers")


@pytest.fixture(scope="module")
def ep_launch(tmp_path_factory):
    """One 2-process launch for the module; a failure is reported once, by test_ep_launch_exits_cleanly."""
    out = tmp_path_factory.mktemp("ep") / "result"
    return SharedLaunch(launch(["tests/ep_worker.py", "--out", str(out)]), "test_ep_launch_exits_cleanly"), out


@pytest.fixture(scope="module")
def ep_results(ep_launch):
    shared, out = ep_launch
    shared.require()  # the other tests skip, pointing at the one failure
    return [json.loads((out.parent / f"result.rank{r}.json").read_text()) for r in range(2)]


def test_ep_launch_exits_cleanly(ep_launch):
    ep_launch[0].check()  # fails with the exit status and the launcher's and workers' output


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("capacity", ["capacity", "dropless"])
def test_ep2_equals_ep1_and_torch_path(ep_results, mode, capacity):
    for rank, result in enumerate(ep_results):
        r = result["modes"][f"{mode}/{capacity}"]
        assert r["ep2_vs_ep1_out"] <= 1e-5 and r["ep2_vs_ep1_grad"] <= 1e-5, (rank, r)
        assert r["deepspeed_vs_torch_out"] <= 1e-5 and r["deepspeed_vs_torch_grad"] <= 1e-5, (rank, r)
        assert len(set(r["dropped"])) == 1, f"all three paths must drop the same routes: {r['dropped']}"
        # The three paths share route(); the naive per-token reference does not.
        assert r["ep2_vs_naive_out"] <= 1e-5, (rank, r)
        assert r["dropped"][0] == r["naive_dropped"], (rank, r)
        if capacity == "dropless":
            assert r["dropped"][0] == 0


def test_some_capacity_runs_drop_tokens(ep_results):
    dropped = [r["modes"][f"{m}/capacity"]["dropped"][0] for r in ep_results for m in MODES]
    assert sum(dropped) > 0, "capacity runs should exercise dropping across ranks"


def test_experts_are_seeded_by_global_id(ep_results):
    """Rank r's local expert j at ep_size=2 is the ep_size=1 model's expert 2r + j, so rank 1 does not
    start with copies of rank 0's experts."""
    for rank, result in enumerate(ep_results):
        seeding = result["expert_seeding"]
        assert seeding["vs_same_global_id"] == 0.0, (rank, seeding)
        if rank == 1:
            assert seeding["vs_same_local_id"] > 0.0, seeding


def test_deepspeed_engine_steps_lower_the_loss(ep_results):
    for result in ep_results:
        losses = result["losses"]
        assert losses[-1] < 0.8 * losses[0], losses


@pytest.fixture(scope="module")
def empty_rank_launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_empty") / "result"
    result = launch(["tests/ep_empty_worker.py", "--out", str(out)])
    return SharedLaunch(result, "test_empty_rank_launch_exits_cleanly"), out


@pytest.fixture(scope="module")
def empty_rank_results(empty_rank_launch):
    shared, out = empty_rank_launch
    shared.require()
    return [json.loads((out.parent / f"result.rank{r}.json").read_text()) for r in range(2)]


def test_empty_rank_launch_exits_cleanly(empty_rank_launch):
    """A rank with no tokens still takes part in every all-to-all: a hang here ends in the launch timeout."""
    empty_rank_launch[0].check()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("capacity", ["capacity", "dropless"])
def test_a_rank_with_no_tokens_takes_part_and_gets_zero_loss(empty_rank_results, mode, capacity):
    """Rank 1 routes an empty batch through the all-to-all (the launch would hang otherwise)."""
    rank0, rank1 = (r["layers"][f"{mode}/{capacity}"] for r in empty_rank_results)
    assert rank0["one_empty"]["tokens"] == 30 and rank0["one_empty"]["vs_naive_out"] <= 1e-5, rank0
    assert rank1["one_empty"] == {"tokens": 0, "out_shape": [0, 16], "aux_loss": 0.0, "grads_finite": True}
    for rank_result in (rank0, rank1):
        assert rank_result["both_empty"] == {"tokens": 0, "out_shape": [0, 16], "aux_loss": 0.0, "grads_finite": True}
    assert rank0["one_empty"]["grads_finite"]


def test_engine_steps_with_an_empty_rank_stay_finite(empty_rank_results):
    for result in empty_rank_results:
        assert result["engine_losses_finite"], result["engine_losses"]
