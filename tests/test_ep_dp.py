"""Expert parallelism below the world size: EP 2 x DP 2 on 4 processes through the real launcher
equals EP 4, EP 1 x DP 4 and a naive all-experts model on the same global batch (loss, and every
parameter after an SGD step, i.e. the reduced gradients), and a checkpoint written at EP 2 x DP 2
resumes at EP 4 and at EP 1 with the same next step (tests/epdp_worker.py)."""
from __future__ import annotations

import json

import pytest
from launch_util import SharedLaunch, launch

WORLD = 4


@pytest.fixture(scope="module")
def epdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("epdp") / "r"
    shared = SharedLaunch(launch(["tests/epdp_worker.py", "--out", str(out)], num_procs=WORLD),
                          "test_epdp_launch_exits_cleanly")
    results = [json.loads(out.with_name(f"r.rank{r}.json").read_text()) for r in range(WORLD)] if shared.result.ok \
        else None
    return shared, results


def test_epdp_launch_exits_cleanly(epdp):
    epdp[0].check()


@pytest.mark.parametrize("layout", ["ep2", "ep4", "ep1"])
def test_every_layout_equals_the_naive_model_after_a_step(epdp, layout):
    shared, results = epdp
    shared.require()
    for rank, r in enumerate(results):
        row = r[layout]
        assert row["loss"] == pytest.approx(row["ref_loss"], rel=1e-5), (rank, row)
        assert row["params_vs_reference"] < 1e-5, (rank, row)
        assert row["step_size"] > 1e-3, (rank, row)  # the step moved the weights far beyond the tolerance


def test_expert_gradients_are_reduced_within_their_expert_data_parallel_group(epdp):
    shared, results = epdp
    shared.require()
    assert all(r["ep2_expert_dp_peer_equal"] == 0.0 for r in results)


@pytest.mark.parametrize("ep", [4, 1])
def test_a_checkpoint_at_ep2_dp2_resumes_at_another_expert_parallel_size_with_the_same_next_step(epdp, ep):
    shared, results = epdp
    shared.require()
    for rank, r in enumerate(results):
        row = r[f"resume_ep{ep}"]
        assert row["step"] == 1 and row["rank_state"], (rank, row)
        assert row["loaded_vs_saved"] == 0.0, (rank, row)
        assert row["next_loss"] == pytest.approx(row["continued_loss"], rel=1e-6), (rank, row)
        assert row["next_params_vs_continued"] < 1e-5, (rank, row)
