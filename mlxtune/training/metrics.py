"""What the loop reports: metrics (fields as in the proto's StepMetrics and
EvalMetrics), the callbacks it calls, its result and its error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import grpc

from mlxtune.errors import MlxtuneError


@dataclass
class StepMetrics:
    step: int  # optimizer step just completed, 1-based (for a skipped step: the one attempted)
    total_steps: int
    loss: float  # mean loss per supervised token over the step's micro-batches
    learning_rate: float  # learning rate the step used (would have used, if skipped)
    tokens_per_second: float  # real (unpadded) tokens of the step's micro-batches / step_seconds
    trained_tokens: int  # supervised tokens of all applied steps so far
    grad_norm: float  # global L2 norm of the averaged gradients before clipping
    step_seconds: float  # wall time of the step, data loading included
    peak_memory_bytes: int  # mx.get_peak_memory() so far
    epoch: float  # epochs of micro-batches consumed, fractional
    skipped: bool = False  # the update was skipped because of non-finite values


@dataclass
class EvalMetrics:
    step: int  # the step after which validation ran
    eval_loss: float  # mean loss per supervised token over the validation batches
    eval_tokens: int  # supervised tokens evaluated
    eval_seconds: float


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    total_steps: int
    stopped: bool  # should_stop() ended the run early
    loss: float | None  # last applied step's loss
    eval_loss: float | None  # last validation loss
    skipped_steps: int
    trained_tokens: int
    micro_batch_index: int  # next micro-batch the data source would be asked for


def _never() -> bool:
    return False


def _ignore(*_args) -> None:
    return None


@dataclass
class TrainingCallbacks:
    """Hooks the loop calls; all optional. Exceptions they raise end the run."""

    on_step: Callable[[StepMetrics], None] = _ignore
    on_eval: Callable[[EvalMetrics], None] = _ignore
    # (step, adapter_weights, training_state): called every save_every_steps and
    # after the last step; training_state.is_final tells which.
    on_checkpoint: Callable = _ignore
    # Checked before every step; True ends the run with stopped=True and no
    # further checkpoint (cancellation).
    should_stop: Callable[[], bool] = _never


@dataclass
class NonFiniteLoss(MlxtuneError):
    """The loss or gradient norm was NaN or infinite (policy FAIL), or too
    many steps were skipped for it (policy SKIP_STEP). ``metadata`` carries
    step, loss, grad_norm and skipped_steps as strings."""

    reason: str = "NON_FINITE_LOSS"
    metadata: dict[str, str] = field(default_factory=dict)

    # The run cannot continue; retrying the same job would hit it again.
    code = grpc.StatusCode.ABORTED
