"""The mutation check (tools/mutation_check.py) stays runnable: every one-line bug still applies, and
it covers the whole package (issue 23), not only mmoe_ds/moe/."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AREAS = ("analysis", "experiments", "data", "upcycle/init_from", "safe_load/atomic/export", "checkpoint/train/evaluate")


def load_tool():
    spec = importlib.util.spec_from_file_location("mutation_check", REPO / "tools/mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutation_still_applies_to_the_source():
    proc = subprocess.run([sys.executable, "tools/mutation_check.py", "--verify-only"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mutations apply" in proc.stdout


def test_mutations_cover_every_area_beyond_moe():
    tool = load_tool()
    per_area = Counter(m.area for m in tool.MUTATIONS)
    assert sum(per_area[a] for a in AREAS) >= 30 and all(per_area[a] >= 4 for a in AREAS), per_area
    assert set(per_area) == {"moe", *AREAS}
    assert len({m.name for m in tool.MUTATIONS}) == len(tool.MUTATIONS)
    for m in tool.MUTATIONS:  # each one names the tests that should see it, and they exist
        assert m.tests and all((REPO / t).is_file() for t in m.tests), m.name


def test_issue_23s_survivors_are_not_reused_as_mutations():
    """The bugs the issue injected are checked by their own tests; the tool's are new ones."""
    survivors = ["options.noise * w.float().std()", '(ckpt_dir / tag / "meta.json")', 'batch["labels"][:, 1:] != -100',
                 "RNG_STATE_GLOBALS: tuple = ("]
    for m in load_tool().MUTATIONS:
        assert not any(s in m.old for s in survivors), m.name


def test_a_target_that_no_longer_matches_fails_clearly(tmp_path):
    tool = load_tool()
    (tmp_path / "mmoe_ds").mkdir()
    (tmp_path / "mmoe_ds" / "x.py").write_text("a = 1\n")
    m = tool.Mutation("gone", "mmoe_ds/x.py", "a = 2", "a = 3", ["tests/test_x.py"])
    assert tool.check_applies(tmp_path, m) == "mmoe_ds/x.py: 0 occurrences of 'a = 2' (need exactly 1)"
    missing = tool.Mutation("x", "mmoe_ds/y.py", "a", "b", [])
    assert tool.check_applies(tmp_path, missing) == "mmoe_ds/y.py does not exist"
