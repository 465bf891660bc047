"""The trainer service end to end: real servers on loopback, real worker processes."""

from __future__ import annotations

import math
import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import (
    counting_records,
    final_state,
    job_request,
    jsonl,
    kind,
    losses,
    prepare,
    rpc_error,
    stored,
    upload,
    wait_for_state,
    watch_until,
)

from mlxtune.serving import error_details
from mlxtune.trainer.v1 import trainer_service_pb2 as tpb


@pytest.fixture(scope="module")
def checkpoint(services):
    return prepare(services.peft_stub, rank=8)


@pytest.fixture(scope="module")
def dataset(services):
    return upload(services.trainer_stub, jsonl(counting_records()), display_name="counting")


def test_loss_falls_and_trained_checkpoint_is_in_the_shared_store(services, checkpoint, dataset):
    from mlxtune.peft.v1 import peft_service_pb2 as ppb

    request = tpb.TrainRequest(job=job_request(
        checkpoint.name, dataset.name, max_steps=24, learning_rate=5e-3, batch_size=4,
        eval_every_steps=8, save_every_steps=12), heartbeat_seconds=1)
    events = [r.event for r in services.trainer_stub.Train(request, timeout=300)]
    history = stored(events)
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
    assert final_state(events) == tpb.JOB_STATE_SUCCEEDED
    steps = losses(events)
    assert sorted(steps) == list(range(1, 25))
    assert all(math.isfinite(v) for v in steps.values())
    first, last = sum(steps[s] for s in (1, 2, 3)) / 3, sum(steps[s] for s in (22, 23, 24)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    evals = [e.eval.eval_loss for e in events if kind(e) == "eval"]
    assert [e.eval.step for e in events if kind(e) == "eval"] == [0, 8, 16, 24]
    assert evals[-1] < evals[0]

    started = next(e.worker_started for e in events if kind(e) == "worker_started")
    assert started.total_steps == 24 and started.device == "cpu" and "openblas" in started.blas
    saved = [e.checkpoint_saved for e in events if kind(e) == "checkpoint_saved"]
    assert [s.step for s in saved] == [12, 24] and saved[-1].final

    job = services.trainer_stub.GetTrainingJob(
        tpb.GetTrainingJobRequest(name=history[0].job)).training_job
    assert job.state == tpb.JOB_STATE_SUCCEEDED and job.output_checkpoint == saved[-1].checkpoint
    assert job.config.learning_rate == pytest.approx(5e-3) and job.config.optimizer
    trained = services.peft_stub.GetCheckpoint(
        ppb.GetCheckpointRequest(name=job.output_checkpoint)).checkpoint
    assert trained.parent == checkpoint.name and trained.job == job.name and trained.step == 24
    assert trained.parameters.trainable_parameters == checkpoint.parameters.trainable_parameters

    # A new job can continue from the trained checkpoint: it starts where this one ended.
    more = [r.event for r in services.trainer_stub.Train(tpb.TrainRequest(job=job_request(
        job.output_checkpoint, dataset.name, max_steps=2, learning_rate=1e-3,
        eval_every_steps=0)), timeout=300)]
    assert final_state(more) == tpb.JOB_STATE_SUCCEEDED
    assert losses(more)[1] < steps[1] - 0.5


def test_watch_resumes_after_any_sequence_and_serves_several_watchers(services, checkpoint,
                                                                      dataset):
    job = services.trainer_stub.CreateTrainingJob(job_request(
        checkpoint.name, dataset.name, max_steps=6, eval_every_steps=3)).training_job
    everything = stored(watch_until(services.trainer_stub, job.name))
    assert final_state(everything) == tpb.JOB_STATE_SUCCEEDED
    for after in (0, 3, len(everything) - 1):
        again = stored(watch_until(services.trainer_stub, job.name, after=after))
        assert [e.SerializeToString() for e in again] == \
               [e.SerializeToString() for e in everything[after:]]
    # After the last event of a finished job the stream ends at once.
    assert watch_until(services.trainer_stub, job.name, after=len(everything), timeout=10) == []


def test_queue_position_and_cancel_stop_the_worker_within_seconds(services, checkpoint, dataset):
    stub = services.trainer_stub
    long_job = stub.CreateTrainingJob(job_request(checkpoint.name, dataset.name, max_steps=100000,
                                                  eval_every_steps=0)).training_job
    queued = stub.CreateTrainingJob(job_request(checkpoint.name, dataset.name,
                                                max_steps=2)).training_job
    events = watch_until(stub, long_job.name, lambda e: kind(e) == "step")
    pid = next(e.worker_started.pid for e in events if kind(e) == "worker_started")
    job = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=queued.name)).training_job
    assert job.state == tpb.JOB_STATE_QUEUED and job.queue_position == 1

    cancelled_at = time.monotonic()
    stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=long_job.name))
    job = wait_for_state(stub, long_job.name, {tpb.JOB_STATE_CANCELLED}, timeout=30)
    assert job.state == tpb.JOB_STATE_CANCELLED
    assert time.monotonic() - cancelled_at < 15
    assert not _process_alive(pid)
    # The queued job gets the free slot and runs to the end.
    assert wait_for_state(stub, queued.name, {tpb.JOB_STATE_SUCCEEDED}).state == \
        tpb.JOB_STATE_SUCCEEDED
    # A cancelled queued job never runs.
    waiting = stub.CreateTrainingJob(job_request(checkpoint.name, dataset.name, max_steps=100000,
                                                 eval_every_steps=0)).training_job
    never = stub.CreateTrainingJob(job_request(checkpoint.name, dataset.name,
                                               max_steps=2)).training_job
    assert stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(
        name=never.name)).training_job.state == tpb.JOB_STATE_CANCELLED
    stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=waiting.name))
    assert wait_for_state(stub, waiting.name, {tpb.JOB_STATE_CANCELLED}).state == \
        tpb.JOB_STATE_CANCELLED
    assert stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=never.name)).training_job.step == 0


def test_killed_worker_fails_only_its_job(services, checkpoint, dataset):
    stub = services.trainer_stub
    job = stub.CreateTrainingJob(job_request(checkpoint.name, dataset.name, max_steps=100000,
                                             eval_every_steps=0)).training_job
    events = watch_until(stub, job.name, lambda e: kind(e) == "step")
    pid = next(e.worker_started.pid for e in events if kind(e) == "worker_started")
    os.kill(pid, signal.SIGKILL)
    failed = wait_for_state(stub, job.name, {tpb.JOB_STATE_FAILED}, timeout=30)
    assert failed.state == tpb.JOB_STATE_FAILED
    assert failed.error.reason == "WORKER_CRASHED" and "SIGKILL" in failed.error.message
    health = health_pb2_grpc.HealthStub(services.trainer_channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    after = [r.event for r in stub.Train(tpb.TrainRequest(job=job_request(
        checkpoint.name, dataset.name, max_steps=2)), timeout=300)]
    assert final_state(after) == tpb.JOB_STATE_SUCCEEDED


def test_create_is_idempotent_on_request_id(services, checkpoint, dataset):
    request = job_request(checkpoint.name, dataset.name, max_steps=1)
    request.request_id = "retry-me-1"
    first = services.trainer_stub.CreateTrainingJob(request).training_job
    second = services.trainer_stub.CreateTrainingJob(request).training_job
    assert first.name == second.name
    wait_for_state(services.trainer_stub, first.name, {tpb.JOB_STATE_SUCCEEDED})
    listed = services.trainer_stub.ListTrainingJobs(tpb.ListTrainingJobsRequest(
        states=[tpb.JOB_STATE_SUCCEEDED], page_size=1000)).training_jobs
    assert sum(1 for j in listed if j.name == first.name) == 1


def test_list_jobs_pages_and_filters(services):
    stub = services.trainer_stub
    all_jobs = stub.ListTrainingJobs(tpb.ListTrainingJobsRequest(page_size=1000)).training_jobs
    assert len(all_jobs) >= 3
    seen, token = [], ""
    while True:
        page = stub.ListTrainingJobs(tpb.ListTrainingJobsRequest(page_size=2, page_token=token))
        seen += [j.name for j in page.training_jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [j.name for j in all_jobs]
    cancelled = stub.ListTrainingJobs(tpb.ListTrainingJobsRequest(
        states=[tpb.JOB_STATE_CANCELLED])).training_jobs
    assert cancelled and all(j.state == tpb.JOB_STATE_CANCELLED for j in cancelled)
    err = rpc_error(stub.ListTrainingJobs, tpb.ListTrainingJobsRequest(page_token="garbage!"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_datasets_are_rejected_with_line_numbers(services):
    data = b'{"prompt": "a", "completion": "b"}\nnot json\n{"prompt": "a"}\n{"prompt": 3, ' \
           b'"completion": "x"}\n'
    err = rpc_error(upload, services.trainer_stub, data)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad_request = error_details(err)
    fields = [v.field for v in bad_request.field_violations]
    assert fields == ["records[line 2]", "records[line 3]", "records[line 4]"]
    # Nothing half-written stays in the store.
    assert not list((services.store / "tmp").glob("*"))

    def header_last():
        yield tpb.UploadDatasetRequest(chunk=b"{}")

    err = rpc_error(services.trainer_stub.UploadDataset, header_last())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_hyperparameters_and_references_are_rejected(services, checkpoint, dataset):
    stub = services.trainer_stub
    err = rpc_error(stub.CreateTrainingJob, job_request(
        checkpoint.name, dataset.name, learning_rate=-1, batch_size=0, validation_split=0.9,
        max_steps=10, epochs=2))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad_request = error_details(err)
    fields = {v.field for v in bad_request.field_violations}
    assert {"config.learning_rate", "config.batch_size", "config.validation_split"} <= fields
    assert rpc_error(stub.CreateTrainingJob, job_request(
        "checkpoints/0000000000000000", dataset.name)).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(stub.CreateTrainingJob, job_request(
        checkpoint.name, "datasets/0000000000000000")).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(stub.CreateTrainingJob, job_request(
        "../../etc", dataset.name)).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error(stub.GetTrainingJob, tpb.GetTrainingJobRequest(
        name="jobs/0123456789ab")).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(stub.WatchTrainingJob(tpb.WatchTrainingJobRequest(
        name="jobs/x/../y")).__next__).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_non_finite_loss_fails_the_job_with_a_clear_reason(services, checkpoint, dataset):
    events = [r.event for r in services.trainer_stub.Train(tpb.TrainRequest(job=job_request(
        checkpoint.name, dataset.name, max_steps=20, learning_rate=1e30, max_grad_norm=0,
        optimizer=tpb.OPTIMIZER_SGD)), timeout=300)]
    assert final_state(events) == tpb.JOB_STATE_FAILED
    change = [e.state_change for e in events if kind(e) == "state_change"][-1]
    assert change.error.reason == "NON_FINITE_LOSS" and "learning rate" in change.error.message


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_create_dataset_from_the_data_root_and_nowhere_else(services, tmp_path):
    stub = services.trainer_stub
    (services.data_root / "team").mkdir(exist_ok=True)
    (services.data_root / "team" / "counting.jsonl").write_bytes(jsonl(counting_records(12)))
    request = tpb.CreateDatasetRequest(path="team/counting.jsonl", request_id="ds-1",
                                       display_name="from the data root")
    dataset = stub.CreateDataset(request).dataset
    assert dataset.num_records == 12 and dataset.source == "team/counting.jsonl"
    assert dataset.format == tpb.DATASET_FORMAT_COMPLETIONS
    assert stub.CreateDataset(request).dataset.name == dataset.name  # retried: same dataset
    uploaded = upload(stub, jsonl(counting_records(12)))
    assert uploaded.name == dataset.name  # content-addressed: the same bytes, the same id
    outside = tmp_path / "secret.jsonl"
    outside.write_bytes(jsonl(counting_records(12)))
    for path, code in (("../../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
                       (str(outside), grpc.StatusCode.INVALID_ARGUMENT),
                       ("team/missing.jsonl", grpc.StatusCode.NOT_FOUND)):
        err = rpc_error(stub.CreateDataset, tpb.CreateDatasetRequest(path=path))
        assert err.code() == code, path
    listed = stub.ListDatasets(tpb.ListDatasetsRequest(page_size=1000)).datasets
    assert dataset.name in {d.name for d in listed}
