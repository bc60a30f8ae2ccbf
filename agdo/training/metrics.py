"""Metrics log: one JSON object per logged step in ``metrics.jsonl``; TensorBoard too when asked."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir, *, enabled: bool = True, report_to: str = "jsonl"):
        if report_to not in ("jsonl", "tensorboard"):
            raise ValueError(f"`report_to` must be 'jsonl' or 'tensorboard', got {report_to!r}")
        self.enabled = enabled
        self._file = None
        self._tensorboard = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(Path(output_dir) / "metrics.jsonl", "a")
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
