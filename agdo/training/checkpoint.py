"""Checkpoints: model, optimizer, scheduler and RNG (accelerate's ``save_state``) plus the data position.

A checkpoint is written to ``checkpoint-<step>.tmp`` and renamed when complete, so a run killed while
saving never leaves a half-written checkpoint that ``latest`` would pick.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

_NAME = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(accelerator, output_dir: Path, state: dict) -> Path:
    final = Path(output_dir) / f"checkpoint-{state['global_step']}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "trainer_state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(output_dir) -> Optional[Path]:
    """The complete checkpoint with the highest step in ``output_dir``, or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def load_trainer_state(checkpoint) -> dict:
    path = Path(checkpoint) / "trainer_state.json"
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint} is not an agdo checkpoint: {path.name} is missing")
    return json.loads(path.read_text())
