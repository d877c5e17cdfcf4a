"""Issue 17's fairness and statistics checks, fast (no training):

- arms differ in exactly one thing: the same seed gives every E1 cell bit-identical step-0 tensors
  (all but the router-specific E[m]) and the same batches, built the way the trainer builds them;
- the statistics pair by seed (shuffling which seed a value belongs to changes the result, reordering
  the same pairs does not), Holm's correction and the power figure follow their formulas;
- train.param_groups puts the router at its own learning rate.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmoe_ds.experiments import e1_matched as E1
from mmoe_ds.experiments.runner import Runner, Scale
from mmoe_ds.experiments.stats import contrast, holm, paired_t


@pytest.fixture(scope="module")
def runner(small_dataset, tmp_path_factory) -> Runner:
    out = tmp_path_factory.mktemp("arms")
    (out / "_data").mkdir()
    (out / "_data" / "tiny-embedded").symlink_to(small_dataset)  # the tiny scale's dataset is this build
    return Runner(out, Scale.load("tiny"), log=False)


def build(recipe_dict: dict):
    """The step-0 model and the first batches of a run, built as mmoe_ds.training.trainer.build_trainer builds them."""
    from mmoe_ds.config.recipe import Recipe
    from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
    from mmoe_ds.training.data_plan import load_processor, make_train_loader
    from mmoe_ds.training.trainer import bind_moe_layers, model_kwargs

    recipe = Recipe.from_dict(recipe_dict)
    processor = load_processor(recipe.data)
    torch.manual_seed(recipe.train.seed)
    model = MmoeForCausalLM(MmoeConfig(**model_kwargs(recipe, processor, None), moe_backend="torch"))
    bind_moe_layers(model)
    loader = make_train_loader(recipe.data, processor, 0, 1, recipe.train.seed)
    batches = [b for _, b in zip(range(3), loader)]
    return model, batches


def test_same_seed_gives_every_e1_cell_the_same_init_and_batches(runner):
    seed = 3
    counts = [np.array([[5.0, 1, 1, 1], [1, 1, 3, 3]])]  # one MoE layer at the tiny scale
    target = E1.derive_matched_target(counts)
    recipes = {c.label: runner.recipe(E1.spec(c, seed, target if c.matched else None, 0.1)) for c in E1.CELLS}
    # the recipes differ only in router fields (and the base recipe's own output folder, replaced per run)
    strip = [{**r, "model": {k: v for k, v in r["model"].items() if k != "router"},
              "train": {k: v for k, v in r["train"].items() if k != "output_dir"}} for r in recipes.values()]
    assert all(s == strip[0] for s in strip)
    ref_model, ref_batches = build(recipes[E1.AGNOSTIC.label])
    ref = ref_model.state_dict()
    assert any("modality_bias" not in k for k in ref)
    specific = 0
    for label, recipe in recipes.items():
        model, batches = build(recipe)
        state = model.state_dict()
        for name, tensor in state.items():
            if name.endswith("gate.modality_bias"):
                specific += 1
                continue
            assert torch.equal(tensor, ref[name]), f"{label}: {name} differs at step 0"
        assert set(state) - {n for n in state if n.endswith("gate.modality_bias")} == set(ref)
        for b, r in zip(batches, ref_batches):
            assert b.keys() == r.keys()
            for key in b:
                if torch.is_tensor(b[key]):
                    assert torch.equal(b[key], r[key]), f"{label}: batch field {key} differs"
    assert specific >= 3  # the aware cells have their E[m], drawn without moving the shared stream


def test_the_aware_routers_modality_bias_is_drawn_from_the_seed(runner):
    recipe = runner.recipe(E1.spec(E1.AWARE, 0))
    recipe["model"]["router"]["modality_bias_init_std"] = 1.0
    a = build(recipe)[0].state_dict()
    b = build(recipe)[0].state_dict()
    names = [n for n in a if n.endswith("gate.modality_bias")]
    assert names and all(torch.equal(a[n], b[n]) for n in names) and a[names[0]].abs().sum() > 0
    recipe["train"]["seed"] = 1
    c = build(recipe)[0].state_dict()
    assert not torch.equal(a[names[0]], c[names[0]])


def test_matched_cells_get_per_layer_targets_bound_to_their_layers(runner):
    counts = [np.array([[5.0, 1, 1, 1], [1, 1, 3, 3]])]
    target = E1.derive_matched_target(counts)
    assert target["image"] == [[0.625, 0.125, 0.125, 0.125]] and target["text"] == [[0.125, 0.125, 0.375, 0.375]]
    model, _ = build(runner.recipe(E1.spec(E1.AGNOSTIC_MATCHED, 0, target, 0.1)))
    from mmoe_ds.moe.router import ModalityRouter

    routers = [m for m in model.modules() if isinstance(m, ModalityRouter)]
    assert [r.cfg.matched_utilization_target for r in routers] == [{m: v[0] for m, v in target.items()}]
    assert E1.uniform_gap(target) == pytest.approx(np.mean([0.375, 0.25]))


# -- statistics ------------------------------------------------------------------------------------
def test_contrasts_pair_by_seed():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    b = {0: 1.1, 1: 2.05, 2: 3.2, 3: 4.1}
    c = contrast("x", "m", "a", a, "b", b)
    assert c["diff"]["mean"] == pytest.approx(-0.1125)
    # the same pairs in another order: the same result
    again = contrast("x", "m", "a", dict(reversed(list(a.items()))), "b",
                     dict(sorted(b.items(), key=lambda kv: -kv[1])))
    assert again["diff"] == c["diff"] and again["seeds"] == [0, 1, 2, 3]
    # the values of one arm moved to other seeds: the pairing changes, and so does the interval
    shuffled = contrast("x", "m", "a", a, "b", {0: b[3], 1: b[2], 2: b[1], 3: b[0]})
    assert shuffled["diff"]["mean"] == pytest.approx(c["diff"]["mean"])
    assert shuffled["diff"]["ci95"] > 10 * c["diff"]["ci95"]
    # pairing is why the paired interval is narrow: the unpaired one over the same values is wide
    assert c["unpaired_ci95"] > 10 * c["diff"]["ci95"]
    with pytest.raises(Exception, match="pair them by seed"):
        contrast("x", "m", "a", a, "b", {0: 1.0, 1: 2.0, 2: 3.0, 9: 4.0})


def test_holm_adjusts_the_secondary_contrasts_only():
    def fake(p, primary=False):
        return {"test": {"p": p}, "primary": primary}

    cs = [fake(0.001, primary=True), fake(0.01), fake(0.04), fake(0.03)]
    holm(cs)
    assert "p_holm" not in cs[0]["test"]
    assert [c["test"]["p_holm"] for c in cs[1:]] == pytest.approx([0.03, 0.06, 0.06])


def test_smallest_detectable_difference_follows_the_paired_t_formula():
    from scipy import stats

    d = [0.1, 0.3, 0.2, 0.25, 0.15]
    t = paired_t(d)
    sd = float(np.std(d, ddof=1))
    assert t["sd"] == pytest.approx(sd)
    assert t["mdd"] == pytest.approx((stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * sd / math.sqrt(5))
    assert t["p"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    assert paired_t([0.5])["mdd"] is None


def test_docs_say_cannot_tell_at_chance_and_state_the_primary_target():
    from mmoe_ds.experiments.render import verdict

    at_chance = contrast("Ranking", "accuracy", "aware", {0: 0.10, 1: 0.12, 2: 0.09}, "agnostic",
                         {0: 0.11, 1: 0.10, 2: 0.10}, chance=0.1)
    holm([at_chance])
    assert "cannot tell — aware and agnostic are not above chance (0.100)" in verdict(at_chance)
    primary = contrast("P", "caption loss", "aware", {0: 0.70, 1: 0.71, 2: 0.72}, "matched",
                       {0: 0.705, 1: 0.712, 2: 0.728}, higher_is="worse", chance=7.6, primary=True,
                       target_half_width=0.02)
    text = verdict(primary)
    assert text.startswith("Primary (pre-declared): P") and "against the stated target 0.020: met" in text
    assert "no evidence of a difference" in text and "smallest difference detectable with 3 seeds" in text


# -- train.param_groups ----------------------------------------------------------------------------
def test_param_groups_put_the_router_at_its_own_learning_rate():
    from mmoe_ds.config.recipe import Recipe
    from mmoe_ds.errors import ConfigError
    from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
    from mmoe_ds.training.trainer import optimizer_groups

    torch.manual_seed(0)
    model = MmoeForCausalLM(MmoeConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, moe_intermediate_size=16, num_local_experts=4,
                                       moe_layer_frequency=2, moe_backend="torch",
                                       router={"mode": "modality_bias"}))
    params = [p for p in model.parameters()]
    ds = {"optimizer": {"params": {"lr": 0.003}}}
    assert optimizer_groups(model, params, [], ds, 0, 1, 4) is params
    groups = optimizer_groups(model, params, [{"params": ["*.deepspeed_moe.gate.*"], "lr_multiplier": 10}], ds, 0, 1, 4)
    dense, router = groups
    gate = [p for n, p in model.named_parameters() if ".deepspeed_moe.gate." in n]
    assert router["lr"] == pytest.approx(0.03) and {id(p) for p in router["params"]} == {id(p) for p in gate}
    assert "lr" not in dense and len(dense["params"]) + len(router["params"]) == len(params)
    with pytest.raises(ConfigError, match="matches no parameter"):
        optimizer_groups(model, params, [{"params": ["*.nothing.*"], "lr_multiplier": 2}], ds, 0, 1, 4)
    with pytest.raises(ConfigError, match="belongs to one group"):
        optimizer_groups(model, params, [{"params": ["*.gate.*"], "lr_multiplier": 2},
                                         {"params": ["*.modality_bias"], "lr_multiplier": 3}], ds, 0, 1, 4)
    with pytest.raises(ConfigError, match=r"train.param_groups\[0\] must be"):
        Recipe.from_dict({"train": {"param_groups": [{"params": "*.gate.*", "lr_multiplier": 2}]}})
