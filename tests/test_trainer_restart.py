"""Nothing is lost: jobs survive server restarts and resume exactly."""

from __future__ import annotations

import pytest
from conftest import Services
from grpc_helpers import (
    counting_records,
    final_state,
    job_request,
    jsonl,
    kind,
    losses,
    prepare,
    stored,
    upload,
    wait_for_state,
    watch_until,
)

from mlxtune.trainer.v1 import trainer_service_pb2 as tpb

CONFIG = dict(max_steps=20, save_every_steps=10, eval_every_steps=0, learning_rate=3e-3,
              batch_size=4, seed=7)


@pytest.fixture
def fresh_services(models_dir, tmp_path):
    running = Services(tmp_path / "store", models_dir, tmp_path / "logs")
    yield running
    running.close()


def test_killed_server_restart_then_resume_matches_a_straight_run(fresh_services):
    s = fresh_services
    # Dropout makes the losses depend on the random state, so resuming must restore it.
    checkpoint = prepare(s.peft_stub, rank=8, dropout=0.1)
    dataset = upload(s.trainer_stub, jsonl(counting_records()))

    straight = [r.event for r in s.trainer_stub.Train(tpb.TrainRequest(
        job=job_request(checkpoint.name, dataset.name, **CONFIG)), timeout=300)]
    assert final_state(straight) == tpb.JOB_STATE_SUCCEEDED
    reference = losses(straight)

    job = s.trainer_stub.CreateTrainingJob(
        job_request(checkpoint.name, dataset.name, **CONFIG)).training_job
    before = watch_until(s.trainer_stub, job.name,
                         lambda e: kind(e) == "checkpoint_saved" and e.checkpoint_saved.step == 10)
    s.restart_trainer(kill=True)  # SIGKILL: no goodbye; the worker dies with it

    interrupted = s.trainer_stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name))
    interrupted = interrupted.training_job
    assert interrupted.state == tpb.JOB_STATE_INTERRUPTED
    assert interrupted.error.reason == "SERVER_RESTARTED"
    assert interrupted.checkpoints[-1].endswith("-step-10")
    history = stored(watch_until(s.trainer_stub, job.name))
    assert [e.SerializeToString() for e in stored(before)] == \
        [e.SerializeToString() for e in history[:len(stored(before))]]

    s.trainer_stub.ResumeTrainingJob(tpb.ResumeTrainingJobRequest(name=job.name))
    rest = watch_until(s.trainer_stub, job.name, after=history[-1].sequence)
    assert final_state(rest) == tpb.JOB_STATE_SUCCEEDED
    started = next(e.worker_started for e in rest if kind(e) == "worker_started")
    assert started.resumed_from_step == 10
    resumed = losses(history) | losses(rest)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), step


def test_graceful_shutdown_saves_a_checkpoint_and_the_job_resumes(fresh_services):
    s = fresh_services
    checkpoint = prepare(s.peft_stub, rank=4)
    dataset = upload(s.trainer_stub, jsonl(counting_records()))
    config = dict(CONFIG, max_steps=400, save_every_steps=0)
    job = s.trainer_stub.CreateTrainingJob(
        job_request(checkpoint.name, dataset.name, **config)).training_job
    watch_until(s.trainer_stub, job.name, lambda e: kind(e) == "step" and e.step.step >= 3)
    s.restart_trainer()  # SIGTERM: workers save and stop, jobs end INTERRUPTED

    job = s.trainer_stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job
    assert job.state == tpb.JOB_STATE_INTERRUPTED and job.error.reason == "SERVER_SHUTDOWN"
    assert job.checkpoints and job.checkpoints[-1].endswith(f"-step-{job.step}")
    stopped_at = job.step
    assert stopped_at >= 3

    s.trainer_stub.ResumeTrainingJob(tpb.ResumeTrainingJobRequest(name=job.name))
    events = watch_until(s.trainer_stub, job.name, lambda e: kind(e) == "step",
                         after=job.last_sequence)
    assert [e.step.step for e in events if kind(e) == "step"] == [stopped_at + 1]
    s.trainer_stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=job.name))
    assert wait_for_state(s.trainer_stub, job.name, {tpb.JOB_STATE_CANCELLED}).state == \
        tpb.JOB_STATE_CANCELLED
