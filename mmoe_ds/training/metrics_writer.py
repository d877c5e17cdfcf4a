"""`OUT/metrics.jsonl`: one JSON record per line (`kind`: train, eval, eval_error; `step`), written
by rank 0 only, numbers mirrored to DeepSpeed's monitor (TensorBoard, W&B, CSV) when enabled.

A run that stops (a crash, kill -9) and starts again continues from its last checkpoint, or from
step 0 when it had none: `MetricsWriter.restart` makes both views agree with that, so that every
step appears once. metrics.jsonl keeps only the records up to the step the run continues from (a
run with no checkpoint starts the file anew); TensorBoard gets a session-start event at the next
step, on which it drops the older events of later steps (TensorBoard's own restart purge, the one
`SummaryWriter(purge_step=...)` writes)."""
from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import atomic_write_text


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

    def restart(self, step: int) -> None:
        """The run continues after `step` (its checkpoint's step; 0 without one): forget what an earlier
        attempt logged past it, here and in TensorBoard. Call before the first `write`."""
        if not self.enabled:
            return
        self.truncate_after(step)
        self.mark_tensorboard_restart(step + 1)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (logged before a crash; a resumed run logs them again).
        A line cut short by the crash (no newline, not JSON) is dropped too."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def mark_tensorboard_restart(self, step: int) -> None:
        """A SessionLog.START event at `step` in DeepSpeed's TensorBoard event file: TensorBoard then
        hides the events of steps >= `step` read before it (those of the attempt that stopped)."""
        writer = getattr(getattr(self.monitor, "tb_monitor", None), "summary_writer", None)
        if writer is None:
            return
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        writer._get_file_writer().add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
        writer.flush()
