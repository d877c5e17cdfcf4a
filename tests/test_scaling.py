"""docs/scaling.md: the all-to-all formula against the bytes DeepSpeed's MoE layer really moves
(4 CPU processes through the launcher: EP 4, and EP 2 x DP 2), and the doc regenerated from the
committed measurement."""
from __future__ import annotations

import json

import pytest
from launch_util import REPO, SharedLaunch, launch

from mmoe_ds.training import scaling


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("a2a") / "w4"
    shared = SharedLaunch(launch(["bench/a2a_bytes.py", "--out", str(out)], num_procs=4),
                          "test_the_formula_equals_the_bytes_moved_on_four_processes")
    return shared, out


def test_the_formula_equals_the_bytes_moved_on_four_processes(four_processes):
    shared, out = four_processes
    shared.check()
    rows = [dict(row, rank=r) for r in range(4) for row in json.loads(out.with_name(f"w4.rank{r}.json").read_text())]
    assert {(row["ep_size"], row["drop_tokens"]) for row in rows} == {(2, True), (2, False), (4, True), (4, False)}
    for row in rows:
        assert row["capacity_formula"] == row["capacity_router"], row
        assert row["bytes_measured"] == row["bytes_formula"] > 0 and row["calls"] == 4, row
        assert row["group_sizes"] == [row["ep_size"]], row  # EP 2 x DP 2: each all-to-all stays in its group of 2
    # different modality mixes on the two expert-parallel groups of EP 2 give different buffers: the group decides
    ep2 = {row["rank"]: row["capacity_router"] for row in rows if row["ep_size"] == 2 and row["drop_tokens"]}
    assert ep2[0] == ep2[1] and ep2[2] == ep2[3] and ep2[0] != ep2[2]
    committed = json.loads((REPO / scaling.MEASURED).read_text())["rows"]
    assert [r for r in committed if r["world_size"] == 4] == sorted(rows, key=lambda r: r["rank"]), \
        "runs/scaling/measured.json is stale: python -m mmoe_ds.training.scaling --measure"


def test_the_doc_is_generated_from_the_committed_measurement():
    measured = json.loads((REPO / scaling.MEASURED).read_text())
    assert {r["world_size"] for r in measured["rows"]} == {2, 4}
    assert all(r["bytes_measured"] == r["bytes_formula"] for r in measured["rows"])
    assert (REPO / scaling.DOC).read_text() == scaling.render(measured, REPO), "run python -m mmoe_ds.training.scaling"


def test_capacity_matches_the_routers():
    from mmoe_ds.moe.router import _capacity

    for tokens, experts, cf, k, minimum in [(96, 8, 1.25, 1.5, 2), (4096, 16, 1.25, 1.8984, 4), (7, 8, 1.0, 1, 4)]:
        assert scaling.capacity(tokens, experts, cf, k, minimum) == _capacity(tokens, experts, cf * k, minimum)


def test_cluster_rows_split_intra_and_inter_node_bytes():
    t = scaling.RecipeTraffic("x", 4096, 1024, 4096, 16, 4, 2.0, 1.25, 640, bytes_per_step=16_000_000)
    one, two, four = scaling.cluster_rows(t, (8, 16, 32))
    assert one["inter_gb"] == 0 and one["intra_gb"] == pytest.approx(0.016 * 7 / 8)
    assert two["intra_gb"] == pytest.approx(0.016 * 7 / 16) and two["inter_gb"] == pytest.approx(0.016 * 8 / 16)
    assert two["comm_ms"] == pytest.approx(max(two["intra_gb"] / 450, two["inter_gb"] / 50) * 1e3)
    assert one["gemm_ms"] == two["gemm_ms"]  # each GPU receives E·C rows whatever EP is
    assert four == {"ep": 32, "nodes": 4, "impossible": True}  # 16 experts over 32 GPUs
