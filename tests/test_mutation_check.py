"""The mutation check (tools/mutation_check.py) stays runnable: every one-line bug still applies."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_mutation_still_applies_to_the_source():
    proc = subprocess.run([sys.executable, "tools/mutation_check.py", "--verify-only"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mutations apply" in proc.stdout
