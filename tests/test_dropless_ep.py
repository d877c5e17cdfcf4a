"""`DroplessMoE` (index dispatch with variable all-to-all splits) at ep_size 2 over gloo, through
the real `deepspeed` launcher: one launch (tests/dropless_worker.py) checks every case.

With Triton installed the launch runs with TRITON_INTERPRET=1, so the same layer also runs its
Triton kernels (interpreted on the CPU) and is compared with its torch reference path.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
from dropless_worker import CASES
from ep_worker import MODES
from launch_util import SharedLaunch, child_env, free_port, run_process

TOL = 1e-5
NAIVE_TOL = 3e-5  # fp32 layer vs the float64 reference (large skewed logits); the fp32 paths agree to TOL
HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_moe_backend_is_validated_with_field_and_fix():
    from mmoe_ds.moe import RouterConfig

    with pytest.raises(ValueError, match=r"RouterConfig.moe_backend: 'tutel' is not one of"):
        RouterConfig(moe_backend="tutel")
    with pytest.raises(ValueError, match=r"moe_backend='dropless' keeps every route; set drop_tokens=false"):
        RouterConfig(moe_backend="dropless")
    assert RouterConfig().moe_backend == "deepspeed"


def test_the_model_builds_the_dropless_layer_and_shares_its_state_dict_with_the_torch_one():
    """router.moe_backend="dropless" picks DroplessMoE for training (moe_backend "deepspeed"); the
    exported/inference model (moe_backend "torch") builds TorchMoE and loads the same state dict."""
    import torch

    from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
    from mmoe_ds.moe import TorchMoE
    from mmoe_ds.moe.dropless import DroplessMoE

    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                moe_intermediate_size=32, num_local_experts=4, moe_layer_frequency=1, num_experts_per_tok=2,
                router={"moe_backend": "dropless", "drop_tokens": False})
    torch.manual_seed(0)
    train_model = MmoeForCausalLM(MmoeConfig(**base, moe_backend="deepspeed"))
    infer_model = MmoeForCausalLM(MmoeConfig(**base, moe_backend="torch"))
    assert all(isinstance(layer.ffn, DroplessMoE) for layer in train_model.model.layers)
    assert all(isinstance(layer.ffn, TorchMoE) for layer in infer_model.model.layers)
    infer_model.load_state_dict(train_model.state_dict())  # strict: same names, same shapes
    ids = torch.randint(4, 64, (2, 9))
    with torch.no_grad():
        a, b = train_model(input_ids=ids).logits, infer_model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


@pytest.fixture(scope="module")
def dropless_launch(tmp_path_factory):
    import sys

    out = tmp_path_factory.mktemp("dropless") / "result"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "tests/dropless_worker.py", "--out", str(out)]
    env = child_env(**({"TRITON_INTERPRET": "1"} if HAS_TRITON else {}))
    return SharedLaunch(run_process(cmd, env, timeout=600), "test_dropless_launch_exits_cleanly"), out


@pytest.fixture(scope="module")
def results(dropless_launch):
    shared, out = dropless_launch
    shared.require()
    return [json.loads((out.parent / f"result.rank{r}.json").read_text()) for r in range(2)]


def test_dropless_launch_exits_cleanly(dropless_launch):
    """Every all-to-all matched up on both ranks (a hang ends in the launch timeout)."""
    dropless_launch[0].check()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_ep2_equals_ep1_torch_and_the_float64_reference(results, mode, case):
    for rank, result in enumerate(results):
        r = result["layers"][f"{mode}/{case}"]
        assert r["dropped"] == 0, (rank, r)
        for comparison in ("ep2_vs_ep1", "ep1_vs_torch", "ep2_vs_naive64"):
            tol = NAIVE_TOL if comparison == "ep2_vs_naive64" else TOL
            for what, err in r[comparison].items():
                assert err <= tol, f"rank {rank} {comparison} {what}: {err:.2e} ({r})"
        if HAS_TRITON:
            assert result["fused_checked"]
            for what, err in r["fused_vs_reference"].items():
                assert err <= TOL, f"rank {rank} interpreted Triton kernels vs reference, {what}: {err:.2e}"


def test_the_cases_exercise_what_they_name(results):
    rank0, rank1 = (r["layers"] for r in results)
    for mode in MODES:
        assert rank1[f"{mode}/empty_rank"]["tokens"] == 0 and rank1[f"{mode}/empty_rank"]["out_shape"] == [0, 16]
        assert rank0[f"{mode}/empty_rank"]["local_expert_grad_abs_sum"] > 0
        if mode != "masked_pools":  # text's pool is experts 2 and 3 (rank 1's)
            assert rank1[f"{mode}/skewed"]["local_expert_grad_abs_sum"] == 0.0, "rank 1's experts should get no rows"
        assert rank1[f"{mode}/balanced"]["local_expert_grad_abs_sum"] > 0


def test_engine_trains_like_deepspeeds_dispatch_and_its_checkpoint_loads_at_ep1(results):
    for rank, result in enumerate(results):
        e = result["engine"]
        assert e["loss_diff"] <= 1e-5, e["losses"]
        assert e["losses"]["dropless"][-1] < e["losses"]["dropless"][0], e["losses"]
        assert e["reloaded_ep1_vs_ep2_out"] <= TOL, e
        experts = [f"layer_0_expert_{i}_mp_rank_00_model_states.pt" for i in range(4)]
        assert set(experts) <= set(e["checkpoint_files"]), e["checkpoint_files"]
