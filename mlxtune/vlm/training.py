"""A training job's data for a VLM: examples, batches and the loss.

``TrainingRun`` calls ``vision_language_data`` once after loading the
checkpoint; for a VLM it returns everything the text path would have built
(examples, the train/validation split, a collate function) plus the loss,
and the rest of the job — worker, events, checkpoints, resume, metrics — is
the text path's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from mlxtune.data.batching import hold_out
from mlxtune.data.dataset_store import DatasetStore
from mlxtune.data.tokenize import LossMaskMode
from mlxtune.errors import FailedPrecondition
from mlxtune.training.config import TrainingConfig
from mlxtune.vlm.batch import collate_vlm
from mlxtune.vlm.data import PixelCache, VlmExample, VlmProcessing, VlmTokenized, build_vlm_examples
from mlxtune.vlm.loss import VlmLoss
from mlxtune.vlm.upload import IMAGES_MANIFEST, dataset_images

PIXEL_CACHE_DIR = "pixel_cache"


@dataclass
class VlmTrainingData:
    train: VlmTokenized
    train_examples: list[VlmExample]
    val_examples: list[VlmExample]
    collate: object  # (examples, pad_id=...) -> VlmBatch
    loss: VlmLoss
    pixels: PixelCache


def dataset_has_images(datasets: DatasetStore, dataset_id: str) -> bool:
    return (datasets.datasets_dir / dataset_id / IMAGES_MANIFEST).exists()


def vision_language_data(datasets: DatasetStore, spec: dict, config: TrainingConfig,
                         loaded, processor_key: str) -> VlmTrainingData | None:
    """The job's VLM data, or None for a text model (whose datasets must not
    need images). `processor_key` names the processor's pixel cache."""
    ids = [spec["dataset_id"]] + ([spec["validation_dataset_id"]]
                                  if spec.get("validation_dataset_id") else [])
    if getattr(loaded, "processor", None) is None:
        with_images = [i for i in ids if dataset_has_images(datasets, i)]
        if with_images:
            raise FailedPrecondition(
                message=f"datasets/{with_images[0]} has images, but the checkpoint's base model "
                "is a text model; use a vision-language model", reason="DATASET_NEEDS_VLM")
        return None
    model, family = loaded.model, loaded.family
    processing = VlmProcessing(loaded.processor, family, loaded.config, model)
    folders = {i: datasets.datasets_dir / i for i in ids}
    files = {i: dataset_images(folder) for i, folder in folders.items()}
    by_key = {path.name: path for f in files.values() for path in f.values()}
    # One cache per dataset folder and processor: every later job reuses it.
    cache = PixelCache(lambda key: processing.image_inputs(by_key[key]),
                       disk_dir=folders[ids[0]] / PIXEL_CACHE_DIR / _safe(processor_key))

    def examples(dataset_id: str) -> VlmTokenized:
        return build_vlm_examples(
            datasets.read_records(dataset_id), files[dataset_id], processing, cache,
            max_seq_length=config.max_seq_length,
            loss_mask=LossMaskMode(config.loss_mask.value))

    train = examples(spec["dataset_id"])
    validation_id = spec.get("validation_dataset_id")
    train_examples, val_examples = hold_out(
        train.examples, examples(validation_id).examples if validation_id else None,
        config.validation_split, seed=config.seed)
    if not train_examples:
        raise FailedPrecondition(message="no training examples left after tokenization "
                                 f"({train.dropped} dropped)", reason="EMPTY_TRAINING_SET")
    collate = partial(collate_vlm, image_token_id=processing.image_token_id)
    return VlmTrainingData(train, train_examples, val_examples, collate,
                           VlmLoss(model, family, cache), cache)


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in key)[:80] or "default"
