"""Everything besides the adapter weights that an exact resume needs.

A ``TrainingState`` holds the optimizer state (moments and its step counter,
which drives the schedule), the loop's counters, the data position and both
random number generators. Training N steps straight and training k steps,
saving, loading into fresh objects and training N-k more give the same
losses.

On disk a state is a directory:

* ``optimizer-<step>.safetensors``: ``tree_flatten(optimizer.state)``;
* ``training_state.json``: counters, RNG states, config, and the name of the
  optimizer file. It is written last and atomically (temp file + rename), so
  it always names a complete optimizer file: a crash mid-save leaves the
  previous state readable.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlxtune.errors import FailedPrecondition

STATE_FILE = "training_state.json"
FORMAT_VERSION = 1


@dataclass
class TrainingState:
    step: int  # optimizer steps completed
    total_steps: int
    micro_batch_index: int  # the next micro-batch batch_at() is asked for
    skipped_steps: int
    trained_tokens: int
    optimizer_state: dict[str, mx.array]  # tree_flatten(optimizer.state)
    mlx_rng_key: list[int]  # the two uint32 words of mx.random.state[0]
    numpy_rng_state: dict  # np.random.get_state(), JSON-ready
    config: dict  # TrainingConfig.to_dict() of the run
    extra: dict = field(default_factory=dict)  # caller's JSON-ready additions

    @property
    def is_final(self) -> bool:
        return self.step >= self.total_steps


def capture_rng() -> tuple[list[int], dict]:
    key = [int(x) for x in np.array(mx.random.state[0]).reshape(-1)]
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": keys.tolist(), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return key, numpy_state


def restore_rng(mlx_key: list[int], numpy_state: dict) -> None:
    # The key is two uint32 words and mx.random.seed(s) sets it to
    # [s >> 32, s & 0xffffffff], so seeding restores any saved key exactly.
    hi, lo = (int(x) for x in mlx_key)
    mx.random.seed((hi << 32) | lo)
    np.random.set_state((numpy_state["name"], np.array(numpy_state["keys"], dtype=np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))


def restore_optimizer_state(optimizer: optim.Optimizer, trainable_parameters: dict,
                            flat_state: dict[str, mx.array]) -> None:
    """Initialise ``optimizer`` for the parameters, then overwrite every leaf
    with the saved one, in place (compiled functions hold the state dict)."""
    optimizer.init(trainable_parameters)
    current = dict(tree_flatten(optimizer.state))
    missing = sorted(set(current) - set(flat_state))
    unexpected = sorted(set(flat_state) - set(current))
    if missing or unexpected:
        raise FailedPrecondition(
            message=("saved optimizer state does not match the model's trainable parameters: "
                     f"missing {missing[:5]}, unexpected {unexpected[:5]}"),
            reason="RESUME_STATE_MISMATCH")
    for path, value in flat_state.items():
        if tuple(current[path].shape) != tuple(value.shape):
            raise FailedPrecondition(
                message=(f"saved optimizer state {path} has shape {tuple(value.shape)}, "
                         f"the model needs {tuple(current[path].shape)}"),
                reason="RESUME_STATE_MISMATCH")
        _set_path(optimizer.state, path, value.astype(current[path].dtype))


def restore_trainable_weights(model, weights: dict[str, mx.array]) -> None:
    """Load saved trainable weights (e.g. a LoRA adapter) into ``model``,
    refusing names or shapes that do not match its trainable parameters
    (a silently ignored mismatch would resume from the wrong weights)."""
    current = dict(tree_flatten(model.trainable_parameters()))
    missing = sorted(set(current) - set(weights))
    unexpected = sorted(set(weights) - set(current))
    wrong = [k for k in weights if k in current and current[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        raise FailedPrecondition(
            message=("saved weights do not match the model's trainable parameters: "
                     f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
                     f"wrong shape {wrong[:5]}"),
            reason="RESUME_STATE_MISMATCH")
    model.load_weights([(k, v.astype(current[k].dtype)) for k, v in weights.items()],
                       strict=False)
    mx.eval(model.trainable_parameters())


def _set_path(tree, path: str, value) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value


def save_training_state(directory: str | Path, state: TrainingState) -> Path:
    """Write ``state`` under ``directory`` (created if needed); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    optimizer_name = f"optimizer-{state.step:08d}.safetensors"
    tmp = directory / f".{optimizer_name}.tmp-{os.getpid()}"
    # The .safetensors suffix keeps MLX from appending one.
    tmp = tmp.with_name(tmp.name + ".safetensors")
    mx.save_safetensors(str(tmp), dict(state.optimizer_state))
    _fsync(tmp)
    os.replace(tmp, directory / optimizer_name)
    record = {
        "format_version": FORMAT_VERSION,
        "optimizer_file": optimizer_name,
        "step": state.step,
        "total_steps": state.total_steps,
        "micro_batch_index": state.micro_batch_index,
        "skipped_steps": state.skipped_steps,
        "trained_tokens": state.trained_tokens,
        "mlx_rng_key": state.mlx_rng_key,
        "numpy_rng_state": state.numpy_rng_state,
        "config": state.config,
        "extra": state.extra,
    }
    _write_json_atomically(directory / STATE_FILE, record)
    # Older optimizer files (and leftovers of an interrupted save) are
    # unreferenced now.
    for old in [*directory.glob("optimizer-*.safetensors"), *directory.glob(".optimizer-*")]:
        if old.name != optimizer_name:
            old.unlink(missing_ok=True)
    return directory


def load_training_state(directory: str | Path) -> TrainingState:
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.exists():
        raise FailedPrecondition(message=f"no training state in {directory}",
                                 reason="RESUME_STATE_MISSING")
    record = json.loads(path.read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise FailedPrecondition(
            message=f"training state format {record.get('format_version')} is not supported",
            reason="RESUME_STATE_MISMATCH")
    optimizer_state = mx.load(str(directory / record["optimizer_file"]))
    return TrainingState(
        step=record["step"], total_steps=record["total_steps"],
        micro_batch_index=record["micro_batch_index"],
        skipped_steps=record["skipped_steps"], trained_tokens=record["trained_tokens"],
        optimizer_state=optimizer_state, mlx_rng_key=record["mlx_rng_key"],
        numpy_rng_state=record["numpy_rng_state"], config=record["config"],
        extra=record.get("extra", {}))


def _write_json_atomically(path: Path, record: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
