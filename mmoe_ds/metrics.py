"""`OUT/metrics.jsonl`: one JSON record per line (`kind`: train, eval, eval_error; `step`), written
by rank 0 only, numbers mirrored to DeepSpeed's monitor (TensorBoard, W&B, CSV) when enabled."""
from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_write_text


class MetricsWriter:
    """Appends records to a metrics file; a no-op on ranks other than 0 (`enabled=False`)."""

    def __init__(self, path: str | Path, enabled: bool, monitor=None):
        self.path, self.enabled, self.monitor = Path(path), enabled, monitor

    def write(self, record: dict) -> None:
        """Append `record` (must hold `kind` and `step`) as one line, in a single write."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            scalars = [(f"{record['kind']}/{k}", v, record["step"]) for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"]
            self.monitor.write_events(scalars)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (logged before a crash; a resumed run logs them again)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
