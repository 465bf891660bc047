"""One training job inside its worker: checkpoint + data in, checkpoints out."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx

from mlxtune.adapters.checkpoint import load_checkpoint_model
from mlxtune.data.batching import BatchPlan, collate, hold_out
from mlxtune.data.dataset_store import DatasetStore
from mlxtune.data.formats import DatasetFormat
from mlxtune.data.tokenize import LossMaskMode, tokenize_records
from mlxtune.jobs import protocol
from mlxtune.store.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TRAINING_STATE,
    CheckpointManifest,
    CheckpointStore,
)
from mlxtune.training.config import TrainingConfig
from mlxtune.training.loop import Trainer
from mlxtune.training.metrics import TrainingCallbacks
from mlxtune.training.state import (
    load_training_state,
    restore_trainable_weights,
    save_training_state,
)

log = logging.getLogger("mlxtune.worker")


class TrainingRun:
    def __init__(self, spec: dict, reporter: protocol.Reporter, commands: protocol.Commands,
                 blas_name: str) -> None:
        self.spec = spec
        self.reporter = reporter
        self.commands = commands
        self.blas_name = blas_name
        self.job_id = spec["job_id"]
        self.checkpoints = CheckpointStore(spec["store_root"])
        self.datasets = DatasetStore(spec["store_root"])
        self.source = self.checkpoints.get(spec["checkpoint_id"])
        device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        self.device = device
        self.config = TrainingConfig.from_dict(spec["config"]).with_defaults(device)
        self.last_eval_loss: float | None = None
        self.last_loss: float | None = None
        self.saved_steps: set[int] = set()

    # -- set-up -------------------------------------------------------------

    def _load_examples(self, dataset_id: str, tokenizer):
        record = self.datasets.get(dataset_id)
        records = self.datasets.read_records(dataset_id)
        return tokenize_records(records, DatasetFormat(record.format), tokenizer,
                                max_seq_length=self.config.max_seq_length,
                                loss_mask=LossMaskMode(self.config.loss_mask.value))

    def _data(self, tokenizer):
        cfg = self.config
        train = self._load_examples(self.spec["dataset_id"], tokenizer)
        validation_id = self.spec.get("validation_dataset_id")
        train_examples, val_examples = hold_out(
            train.examples,
            self._load_examples(validation_id, tokenizer).examples if validation_id else None,
            cfg.validation_split, seed=cfg.seed)
        if not train_examples:
            from mlxtune.errors import FailedPrecondition

            raise FailedPrecondition(message="no training examples left after tokenization "
                                     f"({train.dropped} dropped with no supervised tokens)",
                                     reason="EMPTY_TRAINING_SET")
        return train, train_examples, val_examples

    # -- the run ------------------------------------------------------------

    def run(self) -> None:
        cfg = self.config
        loaded = load_checkpoint_model(self.source, compute_dtype=cfg.compute_dtype.value)
        model = loaded.model
        from mlxtune.vlm.training import vision_language_data

        vlm = vision_language_data(self.datasets, self.spec, cfg, loaded,
                                   self.source.manifest.base_model.get("digest", ""))
        if vlm is not None:  # a vision-language model: examples with images, its own loss
            train, train_examples, val_examples = vlm.train, vlm.train_examples, vlm.val_examples
        else:
            train, train_examples, val_examples = self._data(loaded.tokenizer)
        plan = BatchPlan([len(e.tokens) for e in train_examples], cfg.batch_size, seed=cfg.seed)
        pad_id = _pad_id(loaded.tokenizer)
        # A GPU runs at full speed only on sequence lengths that are multiples of
        # 32 (2x on an H200); a CPU pays for every padded position, so it pads less.
        multiple = 32 if self.device == "gpu" else 8
        collate_examples = vlm.collate if vlm is not None else collate

        def batch_at(index: int):
            return collate_examples([train_examples[i] for i in plan.batch_indices(index)],
                                    pad_id=pad_id, pad_to_multiple_of=multiple)

        val_batches = [collate_examples(val_examples[i:i + cfg.batch_size], pad_id=pad_id,
                                        pad_to_multiple_of=multiple)
                       for i in range(0, min(len(val_examples), cfg.batch_size * cfg.eval_batches),
                                      cfg.batch_size)]
        resume_state = None
        if resume_id := self.spec.get("resume_checkpoint_id"):
            saved = self.checkpoints.get(resume_id)
            restore_trainable_weights(model, mx.load(str(saved.path / ADAPTER_WEIGHTS)))
            resume_state = load_training_state(saved.path / TRAINING_STATE)
            self.saved_steps.add(resume_state.step)
        callbacks = TrainingCallbacks(on_step=self._on_step, on_eval=self._on_eval,
                                      on_checkpoint=self._on_checkpoint,
                                      should_stop=lambda: self.commands.should_stop)
        # Logits only at supervised positions pay on a CPU (1.5x on SmolLM2); on a
        # GPU the head is cheap and the gather costs more than it saves (measured
        # on an H200: full logits 2-5% faster), so the GPU computes them all.
        trainer = Trainer(model, cfg, batch_at, batches_per_epoch=plan.batches_per_epoch,
                          validation_batches=val_batches, callbacks=callbacks, resume=resume_state,
                          loss=vlm.loss if vlm is not None else None,
                          selective_logits=self.device == "cpu")
        from mlx.utils import tree_flatten

        self.reporter.report(
            protocol.WORKER_STARTED, blas=self.blas_name, device=self.device,
            train_examples=len(train_examples), validation_examples=len(val_examples),
            truncated_examples=train.truncated, total_steps=trainer.total_steps,
            resumed_from_step=trainer.step, pid=os.getpid(),
            trainable_parameters=sum(v.size for _, v in tree_flatten(
                model.trainable_parameters())))
        result = trainer.run()
        if result.stopped:
            if self.commands.save_and_stop.is_set() and not self.commands.cancelled.is_set():
                self._on_checkpoint(trainer.step, trainer.adapter_weights(),
                                    trainer.training_state())
            return
        self.reporter.report(protocol.FINISHED, output_checkpoint=self._checkpoint_id(result.step))

    # -- callbacks ----------------------------------------------------------

    def _on_step(self, metrics) -> None:
        if not metrics.skipped:
            self.last_loss = metrics.loss
        self.reporter.report(protocol.STEP, **asdict(metrics))

    def _on_eval(self, metrics) -> None:
        self.last_eval_loss = metrics.eval_loss
        self.reporter.report(protocol.EVAL, **asdict(metrics))

    def _checkpoint_id(self, step: int) -> str:
        return f"{self.job_id}-step-{step}"

    def _on_checkpoint(self, step: int, weights: dict, state) -> None:
        if step in self.saved_steps:
            return  # saved already (e.g. a periodic save right before a stop)
        source = self.source.manifest
        manifest = CheckpointManifest(
            id=self._checkpoint_id(step), base_model=source.base_model,
            adapter_config=source.adapter_config, parameters=source.parameters,
            origin="trained", parent=source.id, job=self.job_id, step=step,
            train_loss=self.last_loss, eval_loss=self.last_eval_loss,
            extra={"training_config": self.config.to_dict()})

        def write(folder: Path) -> None:
            shutil.copy(self.source.path / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
            mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), weights)
            save_training_state(folder / TRAINING_STATE, state)

        record, _ = self.checkpoints.create(manifest, write)
        self.saved_steps.add(step)
        self.reporter.report(protocol.CHECKPOINT_SAVED, step=step,
                             checkpoint=record.manifest.id, final=state.is_final)


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
