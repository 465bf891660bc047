"""MlxtuneClient: the PEFT and trainer services behind typed Python methods.

Methods return the API's own messages (``Checkpoint``, ``TrainingJob``,
``JobEvent``...), so everything the protos document is there, and raise
:class:`MlxtuneClientError` instead of ``grpc.RpcError``.

Retries: a call that failed on the way (UNAVAILABLE) is repeated with backoff
when repeating it is harmless: reads, cancels, and creates, which always carry
a ``request_id`` (a fresh uuid4 unless given) and send the SAME id again, so
the server returns the first result instead of creating a second one.
Deletes and resumes are not retried: a repeat could fail after a success.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc

from mlxtune.common.v1 import checkpoint_pb2 as common_pb
from mlxtune.peft.v1 import peft_service_pb2 as peft_pb
from mlxtune.peft.v1 import peft_service_pb2_grpc
from mlxtune.trainer.v1 import trainer_service_pb2 as trainer_pb
from mlxtune.trainer.v1 import trainer_service_pb2_grpc
from mlxtune_client import messages
from mlxtune_client.errors import MlxtuneClientError
from mlxtune_client.retry import DEFAULT_BACKOFF, Backoff, call_with_retry
from mlxtune_client.watch import DEFAULT_HEARTBEAT_SECONDS, EventStream

T = TypeVar("T")

DEFAULT_PEFT_ADDRESS = "localhost:50051"
DEFAULT_TRAINER_ADDRESS = "localhost:50052"
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the servers' limit too

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Ping a quiet connection so a dead peer is noticed within ~40 s even when
    # the server's heartbeats cannot reach us (the servers accept a ping every 10 s).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # grpc's own reconnect backoff grows to 120 s by default; a restarted
    # server should be found again within seconds.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 3_000),
]


class MlxtuneClient:
    """Both services. Use as a context manager, or call :meth:`close`.

    ``timeout``: deadline in seconds of each unary call (loading a large model
    for inspect/prepare can take a while). ``retries``: how many times a
    retryable call is repeated after a transient failure.
    ``reconnect_timeout``: how long :meth:`watch` keeps trying to resume a
    lost event stream before it gives up.
    """

    def __init__(self, peft_address: str = DEFAULT_PEFT_ADDRESS,
                 trainer_address: str = DEFAULT_TRAINER_ADDRESS, *,
                 timeout: float = 120.0, retries: int = 5, reconnect_timeout: float = 120.0,
                 backoff: Backoff = DEFAULT_BACKOFF) -> None:
        self.peft_address = peft_address
        self.trainer_address = trainer_address
        self.timeout = timeout
        self.retries = retries
        self.reconnect_timeout = reconnect_timeout
        self.backoff = backoff
        self._peft_channel = grpc.insecure_channel(peft_address, options=CHANNEL_OPTIONS)
        self._trainer_channel = grpc.insecure_channel(trainer_address, options=CHANNEL_OPTIONS)
        self.peft = peft_service_pb2_grpc.PeftServiceStub(self._peft_channel)
        self.trainer = trainer_service_pb2_grpc.TrainerServiceStub(self._trainer_channel)
        # The PEFT stub's methods, to name the right service in connection errors.
        self._peft_methods = tuple(vars(self.peft).values())

    def __enter__(self) -> MlxtuneClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._peft_channel.close()
        self._trainer_channel.close()

    # -- plumbing ------------------------------------------------------------

    def _call(self, call: Callable[[], T], service: str, *, retry: bool = True) -> T:
        try:
            return call_with_retry(call, self.retries if retry else 0, self.backoff)
        except grpc.RpcError as rpc_error:
            error = MlxtuneClientError.from_rpc_error(rpc_error)
        if error.code == grpc.StatusCode.UNAVAILABLE and not error.reason:
            # grpc's text names a resolved address; say which service and where.
            address = self.peft_address if service == "peft" else self.trainer_address
            error.message = f"the {service} service at {address} is unavailable: {error.message}"
        raise error

    def _unary(self, method: Callable[..., T], request: Any, *, retry: bool = True) -> T:
        service = "peft" if method in self._peft_methods else "trainer"
        return self._call(lambda: method(request, timeout=self.timeout), service, retry=retry)

    def _pages(self, method: Callable, request: Any, items: str) -> Iterator:
        while True:
            response = self._unary(method, request)
            yield from getattr(response, items)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    # -- PEFT service ----------------------------------------------------------

    def inspect(self, model: str) -> peft_pb.InspectModelResponse:
        """Architecture, sizes, quantization and targetable modules of a model."""
        return self._unary(self.peft.InspectModel, peft_pb.InspectModelRequest(model=model))

    def prepare(self, model: str, *, method: str | int = "lora", rank: int | None = None,
                alpha: float | None = None, dropout: float | None = None,
                target_modules: Iterable[str] | str | None = None,
                num_layers: int | None = None, seed: int | None = None,
                use_rslora: bool = False, request_id: str | None = None,
                ) -> peft_pb.PrepareCheckpointResponse:
        """Apply an adapter config to ``model``; the response's checkpoint is the handle.

        ``method``: "lora", "dora" or "full". Unset knobs take the server's defaults.
        """
        config = messages.adapter_config(
            method, rank=rank, alpha=alpha, dropout=dropout, num_layers=num_layers, seed=seed,
            use_rslora=use_rslora or None, target_modules=target_modules)
        request = peft_pb.PrepareCheckpointRequest(model=model, adapter_config=config,
                                                   request_id=request_id or _new_request_id())
        return self._unary(self.peft.PrepareCheckpoint, request)

    def get_checkpoint(self, name: str) -> common_pb.Checkpoint:
        return self._unary(self.peft.GetCheckpoint,
                           peft_pb.GetCheckpointRequest(name=name)).checkpoint

    def list_checkpoints(self, *, parent: str = "", page_size: int = 0,
                         ) -> Iterator[common_pb.Checkpoint]:
        """Every checkpoint, newest first, fetching pages as the iteration goes."""
        return self._pages(self.peft.ListCheckpoints,
                           peft_pb.ListCheckpointsRequest(parent=parent, page_size=page_size),
                           "checkpoints")

    def delete_checkpoint(self, name: str) -> None:
        self._unary(self.peft.DeleteCheckpoint, peft_pb.DeleteCheckpointRequest(name=name),
                    retry=False)

    def export_checkpoint(self, name: str, format: str = "mlx",  # noqa: A002
                          dest_dir: str | os.PathLike = ".") -> list:
        """Download a checkpoint as "mlx", "peft" or "fused" files into dest_dir."""
        from mlxtune_client import adapters

        return self._call(lambda: adapters.export_checkpoint(self.peft, name, format, dest_dir),
                          "peft")

    def import_adapter(self, model: str, src_dir: str | os.PathLike, *,
                       request_id: str | None = None) -> common_pb.Checkpoint:
        """Upload a Hugging Face PEFT adapter folder as a checkpoint of `model`; retries
        resend the same request_id."""
        from mlxtune_client import adapters

        request_id = request_id or str(uuid.uuid4())
        return self._call(lambda: adapters.import_adapter(self.peft, model, src_dir,
                                                          request_id=request_id), "peft")

    def generate(self, **request) -> Iterator[peft_pb.GenerateResponse]:
        """Stream generated text (see mlxtune_client.adapters.generate for the fields)."""
        from mlxtune_client import adapters

        try:
            yield from adapters.generate(self.peft, **request)
        except grpc.RpcError as rpc_error:
            raise MlxtuneClientError.from_rpc_error(rpc_error) from None

    # -- datasets ------------------------------------------------------------

    def upload_dataset(self, source: str | os.PathLike | bytes, *,
                       format: str | int | None = None, display_name: str | None = None,
                       chunk_size: int = DEFAULT_CHUNK_SIZE, request_id: str | None = None,
                       images: str | os.PathLike | None = None) -> trainer_pb.Dataset:
        """Stream a JSONL file (a path, or its bytes) to the trainer in chunks.

        ``format``: "text", "completions" or "chat"; None lets the server detect
        it. A file is read chunk by chunk, never whole, and read again from the
        start if the upload has to be retried. ``images``: the folder the
        records' image paths are relative to (vision-language chats); every
        referenced image travels in the same stream.
        """
        if chunk_size < 1:
            raise MlxtuneClientError.invalid_argument(f"chunk_size must be >= 1, got {chunk_size}")
        if not isinstance(source, (bytes, bytearray, memoryview)):
            _check_readable(source)  # here: an error inside the stream would only cancel it
            if display_name is None:
                display_name = Path(source).name
        header = trainer_pb.UploadDatasetHeader(
            display_name=display_name or "", format=messages.dataset_format(format),
            request_id=request_id or _new_request_id())

        image_paths = _referenced_images(source, images) if images is not None else []

        def requests() -> Iterator[trainer_pb.UploadDatasetRequest]:
            yield trainer_pb.UploadDatasetRequest(header=header)
            for chunk in _chunks(source, chunk_size):
                yield trainer_pb.UploadDatasetRequest(chunk=chunk)
            if image_paths:
                from mlxtune.serving.file_chunks import file_chunks

                for piece in file_chunks(Path(images), image_paths, chunk_size):
                    yield trainer_pb.UploadDatasetRequest(image=piece)

        # A client-streaming call takes a fresh request iterator on each attempt.
        return self._call(lambda: self.trainer.UploadDataset(requests(), timeout=self.timeout),
                          "trainer").dataset

    def get_dataset(self, name: str) -> trainer_pb.Dataset:
        return self._unary(self.trainer.GetDataset,
                           trainer_pb.GetDatasetRequest(name=name)).dataset

    def list_datasets(self, *, page_size: int = 0) -> Iterator[trainer_pb.Dataset]:
        return self._pages(self.trainer.ListDatasets,
                           trainer_pb.ListDatasetsRequest(page_size=page_size), "datasets")

    # -- training jobs ---------------------------------------------------------

    def create_job(self, checkpoint: str, dataset: str, *, validation_dataset: str = "",
                   config: Mapping[str, Any] | trainer_pb.TrainingConfig | None = None,
                   display_name: str = "", request_id: str | None = None,
                   ) -> trainer_pb.TrainingJob:
        """Queue a training job. ``config``: a TrainingConfig or a dict of its fields,
        enum values by short name ({"optimizer": "adamw", "lr_schedule": "cosine"})."""
        request = trainer_pb.CreateTrainingJobRequest(
            checkpoint=checkpoint, dataset=dataset, validation_dataset=validation_dataset or "",
            config=messages.training_config(config), display_name=display_name or "",
            request_id=request_id or _new_request_id())
        return self._unary(self.trainer.CreateTrainingJob, request).training_job

    def watch(self, job: str, after_sequence: int = 0, *, include_heartbeats: bool = False,
              heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS) -> EventStream:
        """The job's events after ``after_sequence`` (0: all), live until it ends.

        Survives dropped connections: it reconnects with backoff and resumes
        after the last event it yielded, never yielding one twice or skipping one.
        """
        return EventStream(self.trainer, job, after_sequence, get_job=self.get_job,
                           backoff=self.backoff, reconnect_timeout=self.reconnect_timeout,
                           heartbeat_seconds=heartbeat_seconds,
                           include_heartbeats=include_heartbeats)

    def train(self, checkpoint: str, dataset: str, *, include_heartbeats: bool = False,
              **create_kwargs: Any) -> EventStream:
        """Create a job (see :meth:`create_job`) and watch it.

        The job is created first and then watched by name, rather than with the
        one-call Train RPC, so a stream broken at any point resumes by name.
        The returned stream's ``training_job`` is the job as created.
        """
        job = self.create_job(checkpoint, dataset, **create_kwargs)
        stream = self.watch(job.name, include_heartbeats=include_heartbeats)
        stream.training_job = job
        return stream

    def get_job(self, name: str) -> trainer_pb.TrainingJob:
        return self._unary(self.trainer.GetTrainingJob,
                           trainer_pb.GetTrainingJobRequest(name=name)).training_job

    def list_jobs(self, *, states: Iterable[str | int] | None = None, page_size: int = 0,
                  ) -> Iterator[trainer_pb.TrainingJob]:
        """Every job, newest first; ``states`` filters ("running", "JOB_STATE_FAILED"...)."""
        request = trainer_pb.ListTrainingJobsRequest(page_size=page_size,
                                                     states=messages.job_states(states))
        return self._pages(self.trainer.ListTrainingJobs, request, "training_jobs")

    def cancel_job(self, name: str) -> trainer_pb.TrainingJob:
        # Cancelling a cancelled job returns it unchanged: safe to retry.
        return self._unary(self.trainer.CancelTrainingJob,
                           trainer_pb.CancelTrainingJobRequest(name=name)).training_job

    def resume_job(self, name: str) -> trainer_pb.TrainingJob:
        return self._unary(self.trainer.ResumeTrainingJob,
                           trainer_pb.ResumeTrainingJobRequest(name=name),
                           retry=False).training_job


def _new_request_id() -> str:
    return str(uuid.uuid4())


def _chunks(source: str | os.PathLike | bytes, size: int) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = memoryview(source)
        for start in range(0, len(data), size):
            yield bytes(data[start:start + size])
        return
    with open(source, "rb") as file:
        while chunk := file.read(size):
            yield chunk


def _check_readable(path: str | os.PathLike) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise MlxtuneClientError.invalid_argument(
            f"cannot read {os.fspath(path)}: {error.strerror}",
            reason="DATASET_FILE_UNREADABLE") from None


def _referenced_images(source: str | os.PathLike | bytes, folder: str | os.PathLike) -> list[str]:
    """The image paths the records reference, each once, in order of appearance."""
    import json

    from mlxtune.vlm.images import ImageProblem, normalize_record

    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) \
        else Path(source).read_bytes()
    paths: list[str] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            _, refs = normalize_record(json.loads(line))
        except (ValueError, ImageProblem) as exc:
            raise MlxtuneClientError.invalid_argument(f"line {number}: {exc}") from None
        paths += [p for p in refs if p not in paths]
    missing = [p for p in paths if not (Path(folder) / p).is_file()]
    if missing:
        raise MlxtuneClientError.invalid_argument(
            f"images missing under {folder}: {', '.join(missing[:5])}")
    return paths
