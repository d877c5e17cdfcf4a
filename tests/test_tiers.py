"""The test tiers (tests/tiers.py, applied by tests/conftest.py): each test is in exactly one, the scan
finds a process start behind helpers and fixtures, and a unit test that starts a process fails."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import conftest
import pytest
import tiers

TESTS = Path(__file__).resolve().parent

HELPER = '''
import subprocess as sp


def start(cmd: list[str]):
    return sp.Popen(cmd)


def harmless() -> int:
    return 1
'''
PLANTED = '''
import subprocess

import pytest
from helper import harmless, start


def run_it():
    return start(["true"])


@pytest.fixture
def launched(tmp_path):
    return run_it()


def annotated(x: subprocess.Popen) -> subprocess.CompletedProcess:
    return x


def test_direct():
    run_it()


def test_through_a_fixture(launched):
    assert harmless() == 1  # the process comes from the fixture alone


def test_plain():
    assert harmless() == annotated(1)
'''


@pytest.fixture
def planted(tmp_path) -> Path:
    (tmp_path / "helper.py").write_text(HELPER)
    test_file = tmp_path / "test_planted.py"
    test_file.write_text(PLANTED)
    return test_file


def test_the_scan_follows_helpers_and_fixtures_to_the_process(planted):
    assert tiers.process_path(planted, "test_direct") == [
        "test_planted.py:test_direct", "test_planted.py:run_it", "helper.py:start", "subprocess.Popen"]
    assert tiers.why_integration(planted, "test_through_a_fixture", [(planted, "launched")]) == (
        "starts a process: test_planted.py:launched -> test_planted.py:run_it -> helper.py:start -> subprocess.Popen")
    # a helper that starts nothing, and an annotation that only names subprocess, leave a test in the unit tier
    assert tiers.why_integration(planted, "test_plain", []) is None
    # pytest's own fixtures (another folder) are not scanned
    assert tiers.why_integration(planted, "test_plain", [(Path(pytest.__file__), "fixture")]) is None


def test_the_real_launch_helpers_are_found():
    chain = tiers.process_path(TESTS / "test_training.py", "test_training_lowers_loss_and_writes_metrics_and_report")
    assert chain[1:] == ["test_training.py:run_a", "test_training.py:train", "launch_util.py:deepspeed_launch",
                         "launch_util.py:launch", "sys.executable"]
    assert tiers.process_path(TESTS / "launch_util.py", "run_process")[-1].startswith("subprocess.")
    assert tiers.process_path(TESTS / "test_tiers.py", "test_the_real_launch_helpers_are_found") is None


def test_the_hand_listed_tests_exist():
    for name in tiers.SLOW_IN_PROCESS:
        assert (TESTS / name).exists(), f"tiers.SLOW_IN_PROCESS names {name}, which is not in tests/"
    for key in tiers.STARTS_PROCESSES_INSIDE:
        file, _, function = key.partition("::")
        assert function in tiers.scan(TESTS / file).defs, f"tiers.STARTS_PROCESSES_INSIDE names {key}: no such test"


def guard_patches() -> list:
    return [subprocess.Popen._execute_child, os.fork, os.system, multiprocessing.util.spawnv_passfds]


@pytest.mark.unit  # it names subprocess, os.fork, ...: the scan alone would file it as integration
@pytest.mark.parametrize("start", [
    lambda: subprocess.run(["true"]),
    lambda: os.system("true"),
    lambda: os.fork(),
    lambda: multiprocessing.get_context("fork").Process(target=print).start(),
    lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
], ids=["subprocess", "os.system", "os.fork", "multiprocessing-fork", "multiprocessing-spawn"])
def test_the_guard_refuses_every_way_to_start_a_process(start):
    before = guard_patches()
    violations: list[str] = []
    with tiers.no_processes("tests/x.py::test_y", violations):
        with pytest.raises(tiers.ProcessInUnitTier, match=r"tests/x.py::test_y is a unit test .* started a process"):
            start()
    assert len(violations) == 1
    assert guard_patches() == before  # restored (to the outer guard: this test is itself a unit test)


@pytest.mark.unit
def test_a_unit_test_that_swallows_the_refusal_still_fails():
    """The conftest hook around each phase fails the test from what was recorded, not from the exception."""
    unit = SimpleNamespace(nodeid="tests/x.py::test_y", get_closest_marker=lambda name: object())
    phase = conftest.guarded(unit, "the test")
    next(phase)  # the phase starts, guarded
    try:
        getattr(__import__("sub" + "process"), "run")(["true"])  # hidden from the scan, caught by a library
    except tiers.ProcessInUnitTier as refused:
        swallowed = refused
    assert swallowed is not None  # the guard refused, and the "library" swallowed it
    with pytest.raises(tiers.ProcessInUnitTier, match=r"test_y is a unit test but started a process during the test"):
        phase.send(None)


@pytest.mark.unit
def test_an_integration_test_runs_unguarded():
    before = guard_patches()
    integration = SimpleNamespace(nodeid="tests/x.py::test_y", get_closest_marker=lambda name: None)
    phase = conftest.guarded(integration, "the test")
    next(phase)
    assert guard_patches() == before  # this test's own guard, untouched: the integration phase adds none
    with pytest.raises(StopIteration):
        phase.send(None)


RECORD = """
import json, sys, pytest

class Record:
    def pytest_collection_finish(self, session):
        self.tiers = {i.nodeid: sorted({"unit", "integration"} & {m.name for m in i.iter_markers()})
                      for i in session.items}

record = Record()
code = pytest.main(["-q", "--collect-only", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[record])
print("TIERS=" + json.dumps(record.tiers))
sys.exit(code)
"""


def collect(*args: str) -> dict[str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", RECORD, *args], cwd=TESTS.parent, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("TIERS=")]
    return json.loads(line[len("TIERS="):])


def test_every_test_is_in_exactly_one_tier_and_the_tiers_add_up_to_the_suite():
    """`-m unit` (`make test`) and `-m integration` split the whole suite (`make test-all`): none in both, none lost."""
    every = collect("tests")
    assert len(every) > 500
    one_tier = {nodeid: marks for nodeid, marks in every.items() if len(marks) != 1}
    assert not one_tier, f"tests not in exactly one tier: {one_tier}"
    unit, integration = collect("-m", "unit", "tests"), collect("-m", "integration", "tests")
    assert set(unit).isdisjoint(integration)
    assert set(unit) | set(integration) == set(every)
    assert all(marks == ["unit"] for marks in unit.values())
    this = "tests/test_tiers.py::test_every_test_is_in_exactly_one_tier_and_the_tiers_add_up_to_the_suite"
    assert this in integration and "tests/test_tiers.py::test_a_unit_test_that_swallows_the_refusal_still_fails" in unit
