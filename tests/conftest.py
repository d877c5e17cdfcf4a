import os

# Tests never reach the Hub; everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import inspect
from pathlib import Path

import pytest
import tiers


def fixture_functions(item) -> list[tuple[Path, str]]:
    """(file, function name) of every fixture `item` uses, directly or through other fixtures."""
    found = []
    for name in item.fixturenames:
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            func = inspect.unwrap(getattr(fixturedef.func, "_get_wrapped_function", lambda: fixturedef.func)())
            code = getattr(func, "__code__", None)
            if code is not None:
                found.append((Path(code.co_filename), func.__name__))
    return found


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(config, items):
    """Put every test in exactly one tier: `integration` if tiers.why_integration names a reason, else `unit`."""
    for item in items:
        if {m.name for m in item.iter_markers()} & {"unit", "integration"}:
            continue  # written on the test: kept (a `unit` one is still guarded; both at once fails test_tiers)
        function = getattr(item, "function", None)
        why = tiers.why_integration(Path(item.path), function.__name__, fixture_functions(item)) if function else None
        item.add_marker(pytest.mark.integration(reason=why) if why else pytest.mark.unit)


def guarded(item, phase: str):
    """Run one phase of a unit test under tiers.no_processes; fail it if a process was started, even if caught."""
    if item.get_closest_marker("unit") is None:
        return (yield)
    violations: list[str] = []
    with tiers.no_processes(item.nodeid, violations):
        result = yield
    if violations:
        raise tiers.ProcessInUnitTier(f"{item.nodeid} is a unit test but started a process during {phase} "
                                      f"({'; '.join(violations)}); see tests/tiers.py")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from guarded(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from guarded(item, "the test"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from guarded(item, "teardown"))


@pytest.fixture(autouse=True)
def fixed_seeds():
    """Every test starts from the same random state, whichever tests ran before it in its process (pytest-xdist
    deals tests to its workers in no fixed order): torch, numpy and random seeded with 0."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A reduced embedded build (real data, a few seconds), shared by the data and training tests."""
    from mmoe_ds.data.prepare import main as prepare

    out = tmp_path_factory.mktemp("data") / "embedded"
    assert prepare(["--small", "--out", str(out), "--samples-per-shard", "100", "--max-length", "48"]) == 0
    return out


def pytest_report_header(config):
    """Name the CPU in the session header: fp16/bf16 cases run or skip depending on it (see -rs)."""
    from dtype_support import cpu_model

    return [f"cpu: {cpu_model()} ({os.cpu_count()} cores); fp16/bf16 cases skip where DeepSpeed's accelerator "
            "lacks them (pytest -rs lists the skips)"]
