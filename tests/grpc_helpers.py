"""Small helpers the gRPC tests share: datasets, checkpoints, event collection."""

from __future__ import annotations

import json
import time

import grpc

from mlxtune.common.v1 import checkpoint_pb2 as common
from mlxtune.peft.v1 import peft_service_pb2 as ppb
from mlxtune.trainer.v1 import trainer_service_pb2 as tpb

FINAL = {tpb.JOB_STATE_SUCCEEDED, tpb.JOB_STATE_FAILED, tpb.JOB_STATE_CANCELLED,
         tpb.JOB_STATE_INTERRUPTED}


def counting_records(n: int = 48) -> list[dict]:
    """A learnable task: continue a count modulo 20 (the answer follows from the prompt)."""
    return [{"prompt": f"Count on from {i % 20}:",
             "completion": " " + " ".join(str((i + k) % 20) for k in range(1, 9))}
            for i in range(n)]


def jsonl(records: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()


def upload(stub, data: bytes, chunk: int = 256, **header) -> tpb.Dataset:
    def messages():
        yield tpb.UploadDatasetRequest(header=tpb.UploadDatasetHeader(**header))
        for i in range(0, len(data), chunk):
            yield tpb.UploadDatasetRequest(chunk=data[i:i + chunk])

    return stub.UploadDataset(messages()).dataset


def prepare(stub, model: str = "tiny-llama", **config) -> common.Checkpoint:
    request = ppb.PrepareCheckpointRequest(model=model,
                                           adapter_config=common.AdapterConfig(**config))
    return stub.PrepareCheckpoint(request).checkpoint


def job_request(checkpoint: str, dataset: str, **config) -> tpb.CreateTrainingJobRequest:
    return tpb.CreateTrainingJobRequest(checkpoint=checkpoint, dataset=dataset,
                                        config=tpb.TrainingConfig(**config))


def kind(event: tpb.JobEvent) -> str:
    return event.WhichOneof("kind")


def watch_until(stub, job_name: str, predicate=None, after: int = 0, timeout: float = 300,
                heartbeat_seconds: int = 1) -> list[tpb.JobEvent]:
    """Events of a job until the stream ends or predicate(event) is true."""
    events = []
    request = tpb.WatchTrainingJobRequest(name=job_name, after_sequence=after,
                                          heartbeat_seconds=heartbeat_seconds)
    for response in stub.WatchTrainingJob(request, timeout=timeout):
        events.append(response.event)
        if predicate is not None and predicate(response.event):
            break
    return events


def stored(events: list[tpb.JobEvent]) -> list[tpb.JobEvent]:
    """Events without heartbeats (heartbeats are not stored)."""
    return [e for e in events if kind(e) != "heartbeat"]


def losses(events: list[tpb.JobEvent]) -> dict[int, float]:
    """step -> loss; a later report of the same step wins (a resumed run repeats steps)."""
    return {e.step.step: e.step.loss for e in events if kind(e) == "step" and not e.step.skipped}


def final_state(events: list[tpb.JobEvent]) -> int:
    changes = [e.state_change.state for e in events if kind(e) == "state_change"]
    return changes[-1] if changes else tpb.JOB_STATE_UNSPECIFIED


def wait_for_state(stub, job_name: str, states: set[int], timeout: float = 120) -> tpb.TrainingJob:
    deadline = time.monotonic() + timeout
    while True:
        job = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job_name)).training_job
        if job.state in states or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded, an error was expected")
