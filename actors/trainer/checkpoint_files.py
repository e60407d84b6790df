"""Training-state checkpoints on disk, shared by every trainer backend.

A `weights` checkpoint (Tinker's `save_state`) is a directory:
- the adapter in PEFT layout (actors/peft.py): `adapter_model.safetensors` +
  `adapter_config.json`, full tensors under HF module names;
- with the optimizer, `optimizer.safetensors`: for every adapter tensor its AdamW moments
  under the tensor's PEFT name + `.exp_avg` / `.exp_avg_sq`, cut to the adapter's rank
  like the tensors (so a checkpoint does not depend on the server's max_lora_rank), and
  `step`, the slot's AdamW step count; float32, metadata `format` = OPTIMIZER_FORMAT.

The layout knows nothing of how a backend holds its state (one model per rank, or
shards over tensor and pipeline ranks): a backend gathers full tensors into a
`SlotState` and scatters them back, so one checkpoint serves every backend and layout.

Writing is atomic: into `directory + ".tmp"`, fsynced, then renamed into place, so a
crash leaves either no checkpoint or a whole one; an existing `directory` is replaced.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from actors.peft import (
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, check_tensors, read_peft_adapter, write_peft_adapter,
)
from cluster.messages import LoraSpec

OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_FORMAT = "tinkerd-slot-adamw-v1"
MOMENTS = ("exp_avg", "exp_avg_sq")
STEP = "step"


@dataclass
class SlotState:
    """One adapter slot's training state as full PEFT-named arrays.

    `moments` maps `<peft name>.exp_avg` / `.exp_avg_sq` to arrays shaped like the
    tensor; None when the optimizer state is not part of it.
    """

    spec: LoraSpec
    tensors: dict[str, np.ndarray]
    moments: dict[str, np.ndarray] | None = None
    step: int = 0


def moment_shapes(expected: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {f"{name}.{moment}": shape for name, shape in expected.items() for moment in MOMENTS}


def write_training_state(directory: str | os.PathLike, state: SlotState, target_modules: list[str],
                         base_model: str) -> int:
    """Write `state` as a checkpoint directory, atomically; return its size in bytes."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():  # left by a save that crashed
        shutil.rmtree(tmp)
    write_peft_adapter(tmp, state.tensors, state.spec, target_modules, base_model)
    if state.moments is not None:
        arrays = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in state.moments.items()}
        arrays[STEP] = np.asarray(state.step, dtype=np.int64)
        save_file(arrays, str(tmp / OPTIMIZER_FILE), metadata={"format": OPTIMIZER_FORMAT})
    size = sum(f.stat().st_size for f in tmp.iterdir())
    _fsync_tree(tmp)
    _replace_dir(tmp, final)
    return size


def read_training_state(directory: str | os.PathLike, with_optimizer: bool,
                        expected_shapes: Callable[[LoraSpec], dict[str, tuple[int, ...]]]) -> SlotState:
    """Read and check a checkpoint (or any PEFT adapter of this model's layout).

    `expected_shapes(spec)` gives the full PEFT shapes an adapter of that spec must have
    on this model, and raises ValueError for a spec the model cannot hold. Every problem
    is a ValueError that names it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint {directory} does not exist")
    missing = [f for f in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE) if not (directory / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {directory} is incomplete: {', '.join(missing)} missing")
    try:
        spec, tensors = read_peft_adapter(directory)
    except Exception as exc:  # bad JSON, truncated safetensors, missing keys: all "corrupt"
        raise ValueError(f"checkpoint {directory} is unreadable: {type(exc).__name__}: {exc}") from None
    try:
        expected = expected_shapes(spec)
    except ValueError as exc:
        raise ValueError(f"checkpoint {directory} cannot be loaded here: {exc}") from None
    check_tensors(f"checkpoint {directory}: adapter", tensors, expected)
    if not with_optimizer:
        return SlotState(spec, tensors)
    moments, step = _read_optimizer_file(directory)
    check_tensors(f"checkpoint {directory}: {OPTIMIZER_FILE}", moments, moment_shapes(expected))
    return SlotState(spec, tensors, moments, step)


def _read_optimizer_file(directory: Path) -> tuple[dict[str, np.ndarray], int]:
    path = directory / OPTIMIZER_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {directory} holds no optimizer state ({OPTIMIZER_FILE} missing); "
                         f"load it without the optimizer")
    try:
        arrays = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"checkpoint {directory} has an unreadable {OPTIMIZER_FILE}: "
                         f"{type(exc).__name__}: {exc}") from None
    step = arrays.pop(STEP, None)
    if step is None or step.size != 1 or not np.issubdtype(step.dtype, np.integer) or int(step) < 0:
        raise ValueError(f"checkpoint {directory}: {OPTIMIZER_FILE} has no valid step count")
    return arrays, int(step)


def _fsync_tree(directory: Path) -> None:
    """Flush a freshly written checkpoint's files and directory entry to disk."""
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename a finished `tmp` directory to `final`, replacing an existing one."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)
