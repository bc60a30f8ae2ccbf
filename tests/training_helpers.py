"""Helpers shared by the trainer tests (tests/test_sft.py, tests/test_rl.py): a fresh accelerate state and
one thread per test, run comparisons, and ``accelerate launch`` of tests/train_worker.py on 2 processes."""

from __future__ import annotations

from typing import Optional

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "train_worker.py"
REPO = Path(__file__).resolve().parents[1]


def reset_accelerate():
    """A fresh process as far as accelerate knows: its state objects are process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: with 2 OpenMP threads on a busy 2-core machine each op waits on the other thread
    # (x1000 slower); the 2-process tests run their workers with one thread each too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def params(adapter) -> dict:
    return {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, *, exact=True, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), f"{name} differs: max |diff| {(a[name] - b[name]).abs().max():.3e}"
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(kind: str, output_dir, overrides: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``train_worker.py kind`` with 2 processes on CPU (gloo).

    accelerate 1.15's ``--cpu`` starts ONE process unless MPI is set up (``--mpirun_hostfile``); its torchrun
    path is ``--multi_gpu``, and ``ACCELERATE_USE_CPU=true`` makes each process pick MULTI_CPU + gloo even
    where CUDA exists (otherwise, without CUDA, every process would train alone).
    """
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(WORKER), kind, str(output_dir), *overrides]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def launch_unavailable(result) -> bool:
    text = result.stderr + result.stdout
    return any(s in text for s in ("Address already in use", "DistNetworkError", "connectFullMesh"))


def script_forward(trainer, logits, chunk_sizes: Optional[list] = None) -> None:
    """Make ``trainer``'s adapter a scripted model: row ``m`` of any chunk gets ``logits[input_ids[m, 0]]``
    (tests put the row id in the ids), still connected to the model's parameters so that backward and the
    optimizer step run; ``chunk_sizes`` collects the rows of each forward."""
    from agdo.models.adapter import AdapterOutput

    anchor = next(trainer.model.parameters())

    def scripted(input_ids, attention_mask=None, **_):
        if chunk_sizes is not None:
            chunk_sizes.append(input_ids.shape[0])
        return AdapterOutput(logits[input_ids[:, 0]] + 0 * anchor.sum())

    trainer.adapter.forward = scripted

