"""Metrics log: one JSON object per logged step in ``metrics.jsonl``; TensorBoard too when asked.

A resumed run passes ``resume_step``: lines of later steps (logged by the killed run after its last
checkpoint, or cut off mid-write) are dropped first, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir, *, enabled: bool = True, report_to: str = "jsonl", resume_step: int = 0):
        if report_to not in ("jsonl", "tensorboard"):
            raise ValueError(f"`report_to` must be 'jsonl' or 'tensorboard', got {report_to!r}")
        self.enabled = enabled
        self._file = None
        self._tensorboard = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        path = Path(output_dir) / "metrics.jsonl"
        _keep_steps_up_to(path, resume_step)
        self._file = open(path, "a")
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

            self._tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _keep_steps_up_to(path: Path, last_step: int) -> None:
    """Rewrite ``path`` with only its complete lines of steps ``<= last_step`` (0: a fresh log)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off when the process died
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(output_dir) -> list[dict]:
    """The records of ``output_dir/metrics.jsonl``, in order."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
