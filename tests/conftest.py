import os

# Tests never reach the Hub; everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest


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
