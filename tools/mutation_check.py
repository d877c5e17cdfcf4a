"""Mutation check: apply one-line bugs to a copy of the tree and see which ones the tests miss.

Each mutation replaces one exact line fragment in one source file of a private copy of the
repository, then runs the small test subset that should see it. A mutation "survives" when those
tests still pass. Nothing in the working tree is modified.

    python tools/mutation_check.py                       # current code, current tests ("after")
    python tools/mutation_check.py --tests-from-ref HEAD # current code, tests/ as at HEAD ("before")
    python tools/mutation_check.py --only zloss_axis,bias_other_row --jobs 2
    python tools/mutation_check.py --verify-only         # every mutation still applies (no tests run)
    python tools/mutation_check.py --area analysis       # one area (see --list): moe, analysis, data, ...

Prints a table and, last, one JSON line: {"survivors": [...], "killed": [...], ...}.
Exit status: 0 when the check ran (whatever survived), 1 when a mutation no longer applies or a
baseline (unmutated) test run fails, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUTING = ["tests/test_routing.py", "tests/test_routing_edges.py"]
LOSSES = ["tests/test_aux_losses.py"]
EP = ["tests/test_expert_parallel.py"]


@dataclass(frozen=True)
class Mutation:
    """Replace `old` (must occur exactly once in `path`) by `new`, then run `tests` (-k `select`)."""

    name: str
    path: str
    old: str
    new: str
    tests: list[str]
    select: str | None = None
    why: str = ""
    area: str = "moe"


MUTATIONS = [
    # The bugs issue 11 names.
    Mutation("capacity_one_short", "mmoe_ds/moe/router.py",
             "_capacity(n, len(pool), f * k, cfg.min_capacity) if n else 0",
             "_capacity(n, len(pool), f * k, cfg.min_capacity) - 1 if n else 0", ROUTING,
             why="per-modality capacity one slot too small"),
    Mutation("bias_other_row", "mmoe_ds/moe/router.py",
             "logits_SE = logits_SE + self.modality_bias.float()[modality_ids_S]",
             "logits_SE = logits_SE + self.modality_bias.float()[1 - modality_ids_S]", ROUTING,
             why="the other modality's bias row added"),
    Mutation("jitter_never", "mmoe_ds/moe/router.py",
             "if self.training and cfg.jitter_eps > 0:", "if self.training and cfg.jitter_eps > 1:", ROUTING,
             why="router jitter never applied in training"),
    Mutation("zloss_axis", "mmoe_ds/moe/losses.py",
             "return torch.logsumexp(logits, dim=-1).square().mean()",
             "return torch.logsumexp(logits, dim=0).square().mean()", LOSSES,
             why="z-loss logsumexp over the token axis"),
    # The 3-D expert layout (w13 = [w1; w3] per expert) and its per-expert names on disk.
    Mutation("w13_halves_swapped", "mmoe_ds/moe/experts.py",
             'return {"w1": w13_EFD[expert, :f], "w3": w13_EFD[expert, f:], "w2": w2_EDF[expert]}',
             'return {"w1": w13_EFD[expert, f:], "w3": w13_EFD[expert, :f], "w2": w2_EDF[expert]}',
             ["tests/test_experts.py", "tests/test_pre_3d_layout.py"],
             why="per-expert w1 and w3 read from the wrong halves of w13"),
    Mutation("per_expert_load_off_by_one", "mmoe_ds/moe/experts.py",
             'per = [[state_dict[f"{prefix}deepspeed_experts.{e}.{p}.weight"] for p in PROJECTIONS]\n'
             '           for e in range(module.num_local_experts)]',
             'per = [[state_dict[f"{prefix}deepspeed_experts.{(e + 1) % module.num_local_experts}.{p}.weight"] '
             'for p in PROJECTIONS]\n           for e in range(module.num_local_experts)]',
             ["tests/test_experts.py", "tests/test_pre_3d_layout.py"],
             why="a per-expert state dict loads each expert's weights into its neighbour"),
    Mutation("experts_seeded_by_local_id", "mmoe_ds/model/modeling_mmoe.py",
             "global_id = ep_rank * experts.num_local_experts + local_id", "global_id = local_id", EP,
             select="seeded", why="every EP rank starts with the same experts"),
    Mutation("pool_table_ignores_pools", "mmoe_ds/moe/router.py",
             "pool_mask[m, list(pool)] = True", "pool_mask[m, :] = True", ROUTING,
             why="router's own pool table wrong (a test reading that table cannot see it)"),
    Mutation("k1_renormalised_ep_only", "mmoe_ds/moe/router.py",
             "normalise_S1 = (token_k > 1)[:, None]", "normalise_S1 = (token_k > 0)[:, None]", EP,
             select="ep2_equals", why="a routing bug shared by all three EP paths, seen by the EP test alone"),
    # Issue 11 items 2-4, reverted.
    Mutation("entropy_xlogy", "mmoe_ds/moe/losses.py",
             "return -(p * torch.log(p.clamp(min=torch.finfo(p.dtype).tiny))).sum(-1)",
             "return -torch.special.xlogy(p, p).sum(-1)", ROUTING + LOSSES, why="NaN gradient at p = 0"),
    Mutation("select_over_probs", "mmoe_ds/moe/router.py",
             "chosen_SK = logits_SE.topk(K, dim=-1).indices", "chosen_SK = probs_SE.topk(K, dim=-1).indices", ROUTING,
             why="underflowed in-pool expert ties with masked ones"),
    Mutation("no_empty_batch_guard", "mmoe_ds/moe/losses.py",
             "if probs.shape[0] == 0:", "if probs.shape[0] < 0:", ROUTING, why="NaN aux loss on 0 tokens"),
    # More one-line bugs.
    Mutation("position_token_major", "mmoe_ds/moe/router.py",
             "priority_SK = (torch.arange(K, device=device)[None] * S + torch.arange(S, device=device)[:, None]).float()",  # noqa: E501
             "priority_SK = (torch.arange(K, device=device)[None] + torch.arange(S, device=device)[:, None] * K).float()",  # noqa: E501
             ROUTING, why="position policy: token order before first choices"),
    Mutation("load_balance_counts_second_choice", "mmoe_ds/moe/losses.py",
             "first_only = (top_k == 2)[:, None] & (k_slots[None] > 0)",
             "first_only = (top_k == 2)[:, None] & (k_slots[None] > 1)", ROUTING + LOSSES,
             why="top-2 balance loss counts second choices (DeepSpeed counts first only)"),
    Mutation("stats_kept_counts_valid", "mmoe_ds/moe/router.py",
             "(keep_SK & real_S[:, None]).reshape(-1).float()).view(M, E)",
             "(valid_SK & real_S[:, None]).reshape(-1).float()).view(M, E)", ROUTING,
             why="statistics count dropped routes as kept"),
    Mutation("slot_without_group_offset", "mmoe_ds/moe/router.py",
             "slot_SK = torch.where(keep_SK, position_SK + offsets_G[group_S][:, None], 0)",
             "slot_SK = torch.where(keep_SK, position_SK, 0)", ROUTING, why="per-modality slot blocks overlap"),
    Mutation("modality_balance_pool_size", "mmoe_ds/moe/losses.py",
             "pool_sizes = probs.new_tensor([len(p) for p in cfg.pool_members])",
             "pool_sizes = probs.new_tensor([cfg.num_experts for p in cfg.pool_members])", ROUTING + LOSSES,
             why="modality balance scaled by E instead of the pool size"),
    Mutation("global_entropy_tau_all_experts", "mmoe_ds/moe/losses.py",
             "else math.log(len(p))", "else math.log(cfg.num_experts)", ROUTING + LOSSES,
             why="default global-entropy threshold ignores the pool"),
    Mutation("eval_uses_train_capacity", "mmoe_ds/moe/router.py",
             "cf = cfg.capacity_factor_per_modality if self.training else cfg.eval_capacity_factor_per_modality",
             "cf = cfg.capacity_factor_per_modality", ROUTING, why="eval_capacity_factor ignored"),
    Mutation("min_capacity_ignored", "mmoe_ds/moe/router.py",
             "return max(int(capacity), min_capacity)", "return int(capacity)", ROUTING,
             why="min_capacity ignored"),
    Mutation("modality_id_bound", "mmoe_ds/moe/router.py",
             "in_range = ((modality_ids_S >= 0) & (modality_ids_S < M)).all()",
             "in_range = ((modality_ids_S >= 0) & (modality_ids_S <= M)).all()", ROUTING,
             why="an out-of-range modality id accepted"),
]


# Issue 23: the rest of the package. Targets are lines of stable code (helpers other work is unlikely to
# reword); when a target changes, --verify-only (CI: tests/test_mutation_check.py) fails naming it.
ANALYSIS_T = ["tests/test_analysis_metrics.py", "tests/test_analysis_alarms.py", "tests/test_analysis_similarity.py"]
EXPERIMENTS_T = ["tests/test_experiments_unit.py"]
CORRUPTION_T = ["tests/test_data_corruption.py"]
UPCYCLE_T = ["tests/test_upcycle.py"]
SAFE_T = ["tests/test_safe_load.py"]
RESTART_T = ["tests/test_metrics_restart.py"]
EVAL_T = ["tests/test_eval.py"]
MODES_T = ["tests/test_export_modes.py"]
TAR_T = ["tests/test_tar_reader_names.py"]


def _area(area: str, mutations: list[Mutation]) -> list[Mutation]:
    return [Mutation(**{**m.__dict__, "area": area}) for m in mutations]


MUTATIONS += _area("analysis", [
    Mutation("miller_madow_sign", "mmoe_ds/analysis/metrics.py",
             "mi -= (k_me - k_m - k_e + 1) / (2 * n * math.log(2))",
             "mi += (k_me - k_m - k_e + 1) / (2 * n * math.log(2))", ANALYSIS_T, select="miller_madow",
             why="Miller-Madow correction added instead of subtracted"),
    Mutation("gini_without_half", "mmoe_ds/analysis/metrics.py",
             "return float(np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size * a.sum()))",
             "return float(np.abs(a[:, None] - a[None, :]).sum() / (a.size * a.sum()))", ANALYSIS_T,
             select="gini", why="Gini coefficient twice too large"),
    Mutation("permutation_p_zero", "mmoe_ds/analysis/metrics.py",
             "p_value = (1 + int((null >= observed - 1e-12).sum())) / (n_perm + 1)",
             "p_value = int((null >= observed - 1e-12).sum()) / n_perm", ANALYSIS_T, select="permutation",
             why="permutation p-value without the add-one (can be 0)"),
    Mutation("total_variation_without_half", "mmoe_ds/analysis/metrics.py",
             "return float(0.5 * np.abs(p - q).sum())", "return float(np.abs(p - q).sum())", ANALYSIS_T,
             select="total_variation", why="TV distance in [0, 2]"),
    Mutation("dead_expert_limit_not_per_expert", "mmoe_ds/analysis/alarms.py",
             "limit = t.dead_fraction_of_uniform / E", "limit = t.dead_fraction_of_uniform", ANALYSIS_T,
             select="alarm or dead or balanced", why="dead-expert alarm threshold not scaled to an even share"),
    Mutation("monopoly_share_of_routes", "mmoe_ds/analysis/alarms.py",
             "share = n / tokens", "share = n / routes", ANALYSIS_T, select="monopoly",
             why="top-2 monopoly measured per route, not per token"),
    Mutation("cka_gram_keeps_diagonal", "mmoe_ds/analysis/cka.py",
             "return u.fill_diagonal_(0.0)", "return u", ANALYSIS_T, select="cka or hsic or gram",
             why="debiased HSIC's Gram matrix keeps its diagonal"),
])

MUTATIONS += _area("experiments", [
    Mutation("js_mixture_unhalved", "mmoe_ds/experiments/e5_transfer.py",
             "m = 0.5 * (p + q)", "m = p + q", EXPERIMENTS_T, select="js", why="JS divergence against p + q"),
    Mutation("pattern_distance_unaligned", "mmoe_ds/experiments/e2_convergence.py",
             "0.5 * np.abs(x - align(x, y)).sum(1).mean()", "0.5 * np.abs(x - y).sum(1).mean()", EXPERIMENTS_T,
             select="pattern_distance", why="convergence distance depends on expert labels"),
    Mutation("image_heavy_mix_short", "mmoe_ds/experiments/e6_audit.py",
             '"image_heavy": {"image_text": pairs, "image": batch - pairs}',
             '"image_heavy": {"image_text": pairs, "image": batch - 2 * pairs}', EXPERIMENTS_T, select="mixes",
             why="E6's image-heavy mix smaller than the batch"),
    Mutation("target_rounding_not_absorbed", "mmoe_ds/experiments/e1_matched.py",
             "p[int(np.argmax(p))] += 1.0 - p.sum()", "p[int(np.argmax(p))] += 0.0", EXPERIMENTS_T,
             select="target", why="matched target no longer sums to 1 after rounding"),
    Mutation("deep_merge_merges_leaves", "mmoe_ds/experiments/runner.py",
             "if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in LEAF_KEYS:",
             "if isinstance(value, dict) and isinstance(out.get(key), dict):", EXPERIMENTS_T, select="deep_merge",
             why="a batch mix merged into the recipe's instead of replacing it"),
    Mutation("one_seed_gets_an_interval", "mmoe_ds/experiments/stats.py",
             "if len(vals) == 1 or any(np.isnan(vals)):", "if any(np.isnan(vals)):", EXPERIMENTS_T,
             select="summarize", why="a single seed summarized with a confidence interval"),
])

MUTATIONS += _area("data", [
    Mutation("tar_checksum_field_short", "mmoe_ds/data/tar_reader.py",
             "if header[148:156].translate(None, CHECKSUM_CHARS):",
             "if header[148:155].translate(None, CHECKSUM_CHARS):",
             CORRUPTION_T, select="archive_damage", why="damage to the checksum field's last byte not seen"),
    Mutation("tar_end_marker_one_block", "mmoe_ds/data/tar_reader.py",
             "if tail < 2 * BLOCK:", "if tail < BLOCK:", CORRUPTION_T, select="archive_damage",
             why="an archive cut inside its end-of-archive marker accepted"),
    Mutation("tar_junk_after_end_ignored", "mmoe_ds/data/tar_reader.py",
             "if chunk.count(0) != len(chunk):", "if chunk.count(0) == 0:", CORRUPTION_T, select="archive_damage",
             why="junk after the end-of-archive marker not counted"),
    Mutation("tar_pax_path_ignored", "mmoe_ds/data/tar_reader.py",
             'name = long_name or pax.get("path") or _name(header)', "name = long_name or _name(header)",
             TAR_T, why="pax long names dropped (keys cut at 100 bytes)"),
    Mutation("tar_member_cap_keeps_nothing", "mmoe_ds/data/tar_reader.py",
             "keep = min(max(keep_bytes(name) if keep_bytes else 0, 0), size)", "keep = 0", CORRUPTION_T,
             select="member_cap", why="an over-long caption member skipped instead of cut"),
    Mutation("skip_warned_every_sighting", "mmoe_ds/data/skips.py",
             "level = logging.DEBUG if ident in seen else logging.WARNING", "level = logging.WARNING", CORRUPTION_T,
             select="logged_with_shard_and_key_once", why="a skip met again is warned about again"),
    Mutation("skip_merge_overwrites", "mmoe_ds/data/skips.py",
             "self._seen.setdefault(reason, set()).update(ids)", "self._seen[reason] = set(ids)", TAR_T,
             why="merging ranks' skip logs keeps one rank's per reason"),
])

MUTATIONS += _area("upcycle/init_from", [
    Mutation("upcycle_noise_same_draw", "mmoe_ds/export/upcycle.py",
             "w = w + torch.randn(w.shape, generator=g, dtype=torch.float32)",
             "w = w + torch.randn(w.shape, generator=torch.Generator().manual_seed(options.seed), dtype=torch.float32)",
             UPCYCLE_T, select="noise_magnitude", why="every expert (and weight) gets the same noise draw"),
    Mutation("upcycle_negative_noise_accepted", "mmoe_ds/export/upcycle.py",
             "if options.noise < 0:", "if options.noise < -1:", UPCYCLE_T, select="validated",
             why="a negative --noise accepted"),
    Mutation("upcycle_ffn_norm_from_attention", "mmoe_ds/export/upcycle.py",
             'yield dst + "ffn_norm.weight", lm_state[src + "post_attention_layernorm.weight"]',
             'yield dst + "ffn_norm.weight", lm_state[src + "input_layernorm.weight"]', UPCYCLE_T,
             select="own_dense_norm", why="the FFN norm copied from the attention norm"),
    Mutation("upcycle_qkv_order", "mmoe_ds/export/upcycle.py",
             'torch.cat([lm_state[attn + f"{p}_proj.weight"] for p in "qkv"])',
             'torch.cat([lm_state[attn + f"{p}_proj.weight"] for p in "kqv"])', UPCYCLE_T, select="logits_equal",
             why="q and k swapped in the fused projection"),
    Mutation("upcycle_dense_layers_get_experts", "mmoe_ds/export/upcycle.py",
             "        if not config.is_moe_layer(i):\n", "        if config.is_moe_layer(i) and False:\n", UPCYCLE_T,
             select="noise_magnitude or layout", why="dense layers written as MoE layers"),
])

MUTATIONS += _area("safe_load/atomic/export", [
    Mutation("safe_load_extra_globals_dropped", "mmoe_ds/io/safe_load.py",
             "with torch.serialization.safe_globals(list(allowed)):", "with torch.serialization.safe_globals([]):",
             SAFE_T, select="rank_state_round_trips or fp16", why="the per-file allow-list never reaches torch"),
    Mutation("numpy1_name_dropped", "mmoe_ds/io/safe_load.py",
             '(_numpy_reconstruct(), "numpy.core.multiarray._reconstruct")', "_numpy_reconstruct()", SAFE_T,
             select="rank_state_round_trips", why="rank states written under numpy 1 refused"),
    Mutation("stack_global_module_lost", "mmoe_ds/io/safe_load.py",
             'found.append(f"{strings[-2]}.{strings[-1]}")', "found.append(strings[-1])", SAFE_T,
             select="names_what_a_pickle", why="a refusal names `system`, not `posix.system`"),
    Mutation("refusal_names_nothing_for_zips", "mmoe_ds/io/safe_load.py",
             'names = [n for n in z.namelist() if n.endswith("data.pkl")]', "names = []", SAFE_T,
             select="export_refuses_a_tampered", why="a tampered torch.save file's global not named"),
    Mutation("export_reads_experts_unchecked", "mmoe_ds/export/gather.py",
             "state.update(safe_torch_load(expert_file))",
             "state.update(torch.load(expert_file, weights_only=False))", SAFE_T,
             select="export_refuses_every_gadget", why="export runs code from an expert file"),
    Mutation("resume_engine_unwrapped", "mmoe_ds/training/checkpoint.py",
             "engine.checkpoint_engine = SafeLoadCheckpointEngine(inner, deepspeed_globals())",
             "engine.checkpoint_engine = inner", SAFE_T, select="resume_refuses_every_gadget",
             why="resume reads DeepSpeed's files with DeepSpeed's own (unrestricted) loader"),
    Mutation("atomic_overwrite_resets_mode", "mmoe_ds/io/atomic.py",
             "final_mode = stat.S_IMODE(path.stat().st_mode)", "final_mode = default_file_mode()", MODES_T,
             select="atomic_writes or checkpoint_files", why="an atomic overwrite loses the file's mode"),
    Mutation("atomic_failure_leaves_temp", "mmoe_ds/io/atomic.py",
             "            os.unlink(tmp)\n", "            pass\n", MODES_T, select="failed_atomic",
             why="a failed atomic write leaves its temp file behind"),
])

MUTATIONS += _area("checkpoint/train/evaluate", [
    Mutation("metrics_drop_checkpoint_step", "mmoe_ds/training/metrics_writer.py",
             'if record.get("step", 0) <= step:', 'if record.get("step", 0) < step:', RESTART_T,
             why="a restart forgets the checkpoint's own step (logged once, never again)"),
    Mutation("tensorboard_purge_at_checkpoint_step", "mmoe_ds/training/metrics_writer.py",
             "self.mark_tensorboard_restart(step + 1)", "self.mark_tensorboard_restart(step)", RESTART_T,
             why="TensorBoard hides the checkpoint step's own events after a restart"),
    Mutation("listed_files_unchecked", "mmoe_ds/training/checkpoint.py",
             "for name in expected + sorted(set(listed) - set(expected)):", "for name in expected:", SAFE_T,
             select="incomplete", why="a cut optimizer shard in the latest tag goes unnoticed"),
    Mutation("short_files_pass_the_size_check", "mmoe_ds/training/checkpoint.py",
             "if name in listed and path.stat().st_size != listed[name]:",
             "if name in listed and path.stat().st_size > listed[name]:", SAFE_T, select="incomplete",
             why="a truncated checkpoint file accepted"),
    Mutation("ties_count_for_the_truth", "mmoe_ds/training/evaluate.py",
             "return (scores >= true).sum(1)", "return (scores > true).sum(1) + 1", EVAL_T, select="ranks or recall",
             why="retrieval ties resolved in the true caption's favour"),
    Mutation("eval_loss_sum_unweighted", "mmoe_ds/training/evaluate.py",
             "total += out.text_loss.item() * n", "total += out.text_loss.item()", EVAL_T, select="position_0",
             why="eval loss summed per batch, not per token"),
    Mutation("metrics_kept_lines_joined", "mmoe_ds/training/metrics_writer.py",
             'atomic_write_text(self.path, "".join(line + "\\n" for line in kept))',
             'atomic_write_text(self.path, "".join(kept))', RESTART_T,
             why="a restart writes the kept metrics records without their newlines"),
    Mutation("rank_slices_overlap", "mmoe_ds/training/evaluate.py",
             "lo = rank * n", "lo = rank", EVAL_T, select="rank_shares", why="ranks score overlapping queries"),
])


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # killed | survived | no tests | error
    seconds: float
    detail: str = ""
    tests: list[str] = field(default_factory=list)


def make_copy(dest: Path, tests_from_ref: str | None) -> None:
    """The working tree's code (tracked and untracked, not ignored) under `dest`; tests/ from `ref`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if not src.is_file():
            continue  # deleted in the working tree
        if tests_from_ref and rel.startswith("tests/"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    if tests_from_ref:
        archive = subprocess.run(["git", "archive", "--format=tar", tests_from_ref, "tests"], cwd=REPO, check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")


def check_applies(root: Path, m: Mutation) -> str | None:
    """None when `m.old` occurs exactly once in its file, else why not."""
    path = root / m.path
    if not path.is_file():
        return f"{m.path} does not exist"
    count = path.read_text().count(m.old)
    return None if count == 1 else f"{m.path}: {count} occurrences of {m.old!r} (need exactly 1)"


def pytest_command(root: Path, tests: list[str], select: str | None) -> list[str] | None:
    present = [t for t in tests if (root / t).is_file()]
    if not present:
        return None
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--hypothesis-seed=0", *present]
    return cmd + (["-k", select] if select else [])


def run_tests(root: Path, cmd: list[str], timeout: int) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    return proc.returncode, tail


def run_mutation(root: Path, m: Mutation, timeout: int) -> Outcome:
    cmd = pytest_command(root, m.tests, m.select)
    if cmd is None:
        return Outcome(m, "no tests", 0.0, "none of its test files exist")
    path = root / m.path
    pristine = path.read_text()
    start = time.monotonic()
    try:
        path.write_text(pristine.replace(m.old, m.new, 1))
        rc, tail = run_tests(root, cmd, timeout)
    finally:
        path.write_text(pristine)
    seconds = time.monotonic() - start
    # pytest: 0 all passed, 1 some failed, 5 nothing selected; anything else broke the run.
    status = {0: "survived", 1: "killed", 5: "no tests"}.get(rc, "killed" if rc in (2, 3, 4) else "error")
    return Outcome(m, status, seconds, tail, [a for a in cmd if a.startswith("tests/")])


def baselines(roots: list[Path], mutations: list[Mutation], timeout: int) -> dict[tuple, str]:
    """Unmutated run of each distinct test subset: a failing baseline makes its mutations meaningless."""
    failures = {}
    subsets = sorted({(tuple(m.tests), m.select) for m in mutations}, key=str)

    def one(i_subset):
        i, (tests, select) = i_subset
        root = roots[i % len(roots)]
        cmd = pytest_command(root, list(tests), select)
        if cmd is None:
            return (tests, select), 0, "no tests"
        rc, tail = run_tests(root, cmd, timeout)
        return (tests, select), rc, tail

    with ThreadPoolExecutor(len(roots)) as pool:
        for key, rc, tail in pool.map(one, enumerate(subsets)):
            if rc not in (0, 5):
                failures[key] = f"rc={rc}: {tail}"
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tests-from-ref", metavar="REF", help="take tests/ from this git ref (e.g. HEAD) instead of "
                        "the working tree: measures the old suite against the same mutations")
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--area", help="comma-separated areas (moe, analysis, experiments, data, upcycle/init_from, "
                        "safe_load/atomic/export, checkpoint/train/evaluate)")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run in parallel, one tree copy each")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per test run")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--verify-only", action="store_true", help="check every mutation applies; run no tests")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs of each test subset")
    args = parser.parse_args(argv)

    mutations = MUTATIONS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m.name for m in MUTATIONS})
        if unknown:
            parser.error(f"--only: unknown mutations {unknown}; see --list")
        mutations = [m for m in MUTATIONS if m.name in wanted]
    if args.area:
        areas = args.area.split(",")
        unknown = sorted(set(areas) - {m.area for m in MUTATIONS})
        if unknown:
            parser.error(f"--area: unknown areas {unknown}; see --list")
        mutations = [m for m in mutations if m.area in areas]
    if args.list:
        for m in mutations:
            print(f"{m.name:36s} {m.area:26s} {m.path}: {m.why}")
        return 0
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")

    not_applying = [f"{m.name}: {why}" for m in mutations if (why := check_applies(REPO, m))]
    if not_applying:
        print("mutations that no longer apply (update tools/mutation_check.py):\n  " + "\n  ".join(not_applying))
        return 1
    if args.verify_only:
        per_area = {a: sum(m.area == a for m in mutations) for a in dict.fromkeys(m.area for m in mutations)}
        print(f"all {len(mutations)} mutations apply ({', '.join(f'{a}: {n}' for a, n in per_area.items())})")
        return 0

    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        roots = [Path(tmp) / f"copy{i}" for i in range(args.jobs)]
        for root in roots:
            make_copy(root, args.tests_from_ref)
        started = time.monotonic()
        failed_baselines = {} if args.no_baseline else baselines(roots, mutations, args.timeout)
        for key, why in failed_baselines.items():
            print(f"baseline failed for {list(key[0])} -k {key[1]}: {why}")

        def work(i_m):
            i, m = i_m
            if (tuple(m.tests), m.select) in failed_baselines:
                return Outcome(m, "error", 0.0, "baseline fails")
            return run_mutation(roots[i % args.jobs], m, args.timeout)

        # Each worker owns one copy: worker w takes mutations w, w + jobs, ...
        chunks = [[(i, m) for i, m in enumerate(mutations) if i % args.jobs == w] for w in range(args.jobs)]
        with ThreadPoolExecutor(args.jobs) as pool:
            outcomes = [o for chunk in pool.map(lambda c: [work(x) for x in c], chunks) for o in chunk]
        outcomes.sort(key=lambda o: mutations.index(o.mutation))
        total = time.monotonic() - started

    label = f"tests from {args.tests_from_ref}" if args.tests_from_ref else "working-tree tests"
    print(f"\nmutation check ({label}), {len(outcomes)} mutations, {total:.0f} s")
    print(f"{'mutation':36s} {'area':26s} {'status':9s} {'s':>5s}  tests")
    for o in outcomes:
        print(f"{o.mutation.name:36s} {o.mutation.area:26s} {o.status:9s} {o.seconds:5.0f}  {' '.join(o.tests) or '-'}"
              f"{'  -k ' + o.mutation.select if o.mutation.select else ''}  | {o.detail}")
    survivors = [o.mutation.name for o in outcomes if o.status in ("survived", "no tests")]
    print(json.dumps({"tests": label, "mutations": len(outcomes), "survivors": survivors,
                      "killed": [o.mutation.name for o in outcomes if o.status == "killed"],
                      "errors": [o.mutation.name for o in outcomes if o.status == "error"],
                      "seconds": round(total)}))
    return 1 if failed_baselines else 0


if __name__ == "__main__":
    sys.exit(main())
