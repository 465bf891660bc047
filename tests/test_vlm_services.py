"""Vision-language fine-tuning through both real services, on real photos.

Each tiny VLM family is prepared by the PEFT service, its dataset uploaded
with its images in the stream, and trained by a worker process; loss and
validation loss fall. Qwen2-VL (M-RoPE, dynamic resolution: images of
different sizes take different token counts) trains its language model and
resumes exactly after a cancel; LLaVA trains LoRA on all three towers.
"""

from __future__ import annotations

import io
import os

import grpc
import pytest
from conftest import Services
from grpc_helpers import (
    final_state,
    job_request,
    kind,
    losses,
    prepare,
    rpc_error,
    stored,
    wait_for_state,
    watch_until,
)
from vlm_fixtures import image_chunks, jsonl, upload_with_images, write_vlm_models

from mlxtune.common.v1 import checkpoint_pb2 as common
from mlxtune.serving import error_details
from mlxtune.testing.sample_images import caption_records, sample_photos
from mlxtune.trainer.v1 import trainer_service_pb2 as tpb

# Small limits, so the rejection test needs no huge files.
LIMITS = {"MLXTUNE_MAX_IMAGE_BYTES": str(1_000_000), "MLXTUNE_MAX_IMAGE_PIXELS": str(2_000_000)}
CONFIG = dict(max_steps=16, learning_rate=8e-3, batch_size=4, eval_every_steps=8,
              save_every_steps=8, seed=3)
STEPS = list(range(1, 17))
TOWER = {"language": common.MODEL_TOWER_LANGUAGE, "vision": common.MODEL_TOWER_VISION,
         "projector": common.MODEL_TOWER_PROJECTOR}


@pytest.fixture(scope="module")
def vlm_services(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-services")
    models = write_vlm_models(root / "models")
    saved = {k: os.environ.get(k) for k in LIMITS}
    os.environ.update(LIMITS)  # the servers (and their workers) inherit them
    try:
        running = Services(root / "store", models, root / "logs")
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    yield running
    running.close()


@pytest.fixture(scope="module")
def photos():
    return {f"photos/{name}": data for name, data in sample_photos().items()}


@pytest.fixture(scope="module")
def dataset(vlm_services, photos):
    return upload_with_images(vlm_services.trainer_stub, caption_records(), photos,
                              display_name="captions")


def train(services, checkpoint, dataset, **config):
    request = tpb.TrainRequest(job=job_request(checkpoint.name, dataset.name, **config),
                               heartbeat_seconds=1)
    return [r.event for r in services.trainer_stub.Train(request, timeout=300)]


def assert_learns(events):
    assert final_state(events) == tpb.JOB_STATE_SUCCEEDED, [
        e.state_change for e in events if kind(e) == "state_change"]
    steps = losses(events)
    assert sorted(steps) == STEPS
    first, last = sum(steps[s] for s in STEPS[:3]) / 3, sum(steps[s] for s in STEPS[-3:]) / 3
    assert last < first - 0.3, f"loss did not fall: {first:.3f} -> {last:.3f}"
    evals = [e.eval.eval_loss for e in events if kind(e) == "eval"]
    assert evals[-1] < evals[0]
    saved = [e.checkpoint_saved for e in events if kind(e) == "checkpoint_saved"]
    assert [s.step for s in saved] == [8, 16] and saved[-1].final
    return steps


def test_upload_stores_images_with_the_dataset(vlm_services, dataset, photos):
    assert dataset.num_images == len(photos) and dataset.num_records == len(caption_records())
    folder = vlm_services.store / "datasets" / dataset.name.split("/")[1]
    assert len(list((folder / "images").iterdir())) == len(photos)
    # The same JSONL with other image bytes is another dataset.
    swapped = dict(photos)
    swapped["photos/coffee.png"], swapped["photos/chelsea.png"] = \
        photos["photos/chelsea.png"], photos["photos/coffee.png"]
    other = upload_with_images(vlm_services.trainer_stub, caption_records(), swapped)
    assert other.name != dataset.name and other.digest == dataset.digest


def test_qwen2_vl_learns_and_resumes_exactly_after_a_cancel(vlm_services, dataset):
    s = vlm_services
    checkpoint = prepare(s.peft_stub, "tiny-qwen2_vl", rank=16)
    towers = {t.tower: (t.trainable_parameters, t.total_parameters)
              for t in checkpoint.parameters.towers}
    assert list(towers) == [TOWER["language"], TOWER["vision"], TOWER["projector"]]
    assert towers[TOWER["vision"]][0] == towers[TOWER["projector"]][0] == 0
    assert towers[TOWER["language"]][0] == checkpoint.parameters.trainable_parameters
    reference = assert_learns(train(s, checkpoint, dataset, **CONFIG))

    job = s.trainer_stub.CreateTrainingJob(
        job_request(checkpoint.name, dataset.name, **CONFIG)).training_job
    before = watch_until(s.trainer_stub, job.name,
                         lambda e: kind(e) == "checkpoint_saved" and e.checkpoint_saved.step == 8)
    s.trainer_stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=job.name))
    cancelled = wait_for_state(s.trainer_stub, job.name, {tpb.JOB_STATE_CANCELLED})
    assert cancelled.state == tpb.JOB_STATE_CANCELLED
    s.trainer_stub.ResumeTrainingJob(tpb.ResumeTrainingJobRequest(name=job.name))
    rest = watch_until(s.trainer_stub, job.name, after=cancelled.last_sequence)
    assert final_state(rest) == tpb.JOB_STATE_SUCCEEDED
    started = next(e.worker_started for e in rest if kind(e) == "worker_started")
    assert started.resumed_from_step == 8
    resumed = losses(stored(before)) | losses(rest)
    assert sorted(resumed) == STEPS
    for step in STEPS:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), step


def test_llava_learns_with_lora_on_every_tower(vlm_services, dataset):
    s = vlm_services
    checkpoint = prepare(s.peft_stub, "tiny-llava", rank=16,
                         towers=[TOWER["language"], TOWER["vision"], TOWER["projector"]])
    assert list(checkpoint.adapter_config.towers) == list(TOWER.values())
    trainable = {t.tower: t.trainable_parameters for t in checkpoint.parameters.towers}
    assert all(trainable.values())
    assert sum(trainable.values()) == checkpoint.parameters.trainable_parameters
    events = train(s, checkpoint, dataset, **CONFIG)
    assert_learns(events)
    job = s.trainer_stub.GetTrainingJob(tpb.GetTrainingJobRequest(
        name=stored(events)[0].job)).training_job
    # The vision tower's adapter trained: its B matrices left zero.
    import mlx.core as mx

    from mlxtune.peft.v1 import peft_service_pb2 as ppb
    from mlxtune.store.checkpoints import ADAPTER_WEIGHTS

    output = s.peft_stub.GetCheckpoint(ppb.GetCheckpointRequest(name=job.output_checkpoint))
    trained = mx.load(f"{output.checkpoint.path}/{ADAPTER_WEIGHTS}")
    vision_b = [v for k, v in trained.items() if k.startswith("vision_tower")
                and k.endswith("lora_b")]
    assert vision_b and any(float(mx.abs(v).max()) > 0 for v in vision_b)


def test_bad_images_are_rejected_with_line_numbers(vlm_services, photos):
    from PIL import Image

    def png(size, noise=False):
        import numpy as np

        pixels = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8) \
            if noise else np.full((*size, 3), 128, dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        return buffer.getvalue()

    good = photos["photos/chelsea.png"]
    images = {
        "ok.png": good,
        "broken.png": good[: len(good) // 3],  # truncated
        "heavy.png": png((700, 700), noise=True),  # ~1.5 MB > 1 MB
        "huge.png": png((1500, 1500)),  # 2.25 Mpx > 2 Mpx, a small file
        "stray.png": good,  # no record uses it
    }
    assert len(images["heavy.png"]) > 1_000_000 and len(images["huge.png"]) < 1_000_000

    def record(path):
        return {"messages": [
            {"role": "user", "content": [{"type": "image", "image": path},
                                         {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A picture."}]}

    records = [record("ok.png"), record("broken.png"), record("heavy.png"),
               record("huge.png"), record("missing.png"),
               {"images": ["ok.png", "ok.png"], "messages": [
                   {"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                    "text": "x"}]},
                   {"role": "assistant", "content": "y"}]}]
    err = rpc_error(upload_with_images, vlm_services.trainer_stub, records, images)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad_request = error_details(err)
    found = [(v.field, v.description) for v in bad_request.field_violations]
    assert [f for f, _ in found] == ["records[line 2]", "records[line 3]", "records[line 4]",
                                     "records[line 5]", "records[line 6]", 'images["stray.png"]']
    reasons = dict(found[:5])
    assert "'broken.png'" in reasons["records[line 2]"]
    assert "bytes, more than the limit of 1000000" in reasons["records[line 3]"]
    assert "1500x1500 pixels" in reasons["records[line 4]"]
    assert "was not uploaded" in reasons["records[line 5]"]
    assert "image parts use them" in reasons["records[line 6]"]
    assert not [p for p in (vlm_services.store / "tmp").iterdir()]

    # Chunks must come in order; a wrong digest is refused too.
    def out_of_order():
        yield tpb.UploadDatasetRequest(header=tpb.UploadDatasetHeader())
        chunks = list(image_chunks({"ok.png": good}, size=4096))
        for chunk in reversed(chunks):
            yield tpb.UploadDatasetRequest(image=chunk)

    err = rpc_error(vlm_services.trainer_stub.UploadDataset, out_of_order())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "offset" in err.details()
    text_only = jsonl([record("ok.png")])
    err = rpc_error(vlm_services.trainer_stub.UploadDataset, iter([
        tpb.UploadDatasetRequest(header=tpb.UploadDatasetHeader()),
        tpb.UploadDatasetRequest(chunk=text_only)]))
    assert "was not uploaded" in err.details()


def test_python_client_uploads_the_images_a_dataset_references(vlm_services, photos, dataset,
                                                                tmp_path):
    from mlxtune_client import MlxtuneClient, MlxtuneClientError

    for path, data in photos.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    jsonl_file = tmp_path / "captions.jsonl"
    jsonl_file.write_bytes(jsonl(caption_records()))
    with MlxtuneClient(vlm_services.peft.address, vlm_services.trainer.address) as client:
        uploaded = client.upload_dataset(jsonl_file, images=tmp_path, chunk_size=4096)
        # The same records and image bytes: the dataset the raw stubs uploaded.
        assert uploaded.name == dataset.name and uploaded.num_images == len(photos)
        (tmp_path / next(iter(photos))).unlink()
        with pytest.raises(MlxtuneClientError, match="images missing"):
            client.upload_dataset(jsonl_file, images=tmp_path)
