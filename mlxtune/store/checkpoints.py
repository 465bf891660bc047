"""The checkpoint store both services share: one folder per checkpoint.

    <root>/checkpoints/<id>/manifest.json         what the checkpoint is
    <root>/checkpoints/<id>/adapter_config.json   PEFT + mlx-lm readable config
    <root>/checkpoints/<id>/adapters.safetensors  adapter weights (mlx-lm names)

A checkpoint is written into a staging folder and renamed into place in one
step, so readers never see half of one and a crash leaves only staging
debris (cleaned at start). Ids are validated, so no request can name a path
outside the store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from mlxtune.errors import InvalidArgument, NotFound
from mlxtune.store.paging import paginate

CHECKPOINT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
TRAINING_STATE = "training_state"  # folder: optimizer state etc. for exact resume


@dataclass
class CheckpointManifest:
    """Everything known about a checkpoint besides its weights."""

    id: str
    base_model: dict  # model, resolved_path, format, architecture, digest
    adapter_config: dict  # the effective AdapterConfig
    parameters: dict  # trainable, total, modules
    origin: str = "prepared"  # prepared | trained | imported
    parent: str | None = None  # checkpoint id training started from
    job: str | None = None  # job id that wrote it
    step: int = 0
    create_time: float = field(default_factory=time.time)
    train_loss: float | None = None
    eval_loss: float | None = None
    size_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"checkpoints/{self.id}"

    @classmethod
    def from_dict(cls, d: dict) -> "CheckpointManifest":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class CheckpointRecord:
    manifest: CheckpointManifest
    path: Path


def parse_checkpoint_name(name: str, field_path: str = "name") -> str:
    """The id in "checkpoints/{id}" (a bare id is accepted too)."""
    checkpoint_id = name[len("checkpoints/"):] if name.startswith("checkpoints/") else name
    if not CHECKPOINT_ID.match(checkpoint_id or ""):
        raise InvalidArgument.field(
            field_path, f"{name!r} is not a checkpoint name like 'checkpoints/<id>' "
            "(id: lowercase letters, digits and '-', at most 64)")
    return checkpoint_id


class CheckpointStore:
    """Create, read, list and delete checkpoints under `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.dir = self.root / "checkpoints"
        self.staging = self.root / "tmp"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)

    def clean_staging(self, older_than_seconds: float = 3600) -> None:
        """Remove staging folders a crash left behind."""
        now = time.time()
        for entry in self.staging.iterdir():
            if now - entry.stat().st_mtime > older_than_seconds:
                shutil.rmtree(entry, ignore_errors=True)

    def path_of(self, checkpoint_id: str) -> Path:
        if not CHECKPOINT_ID.match(checkpoint_id):
            raise InvalidArgument.field("name", f"invalid checkpoint id {checkpoint_id!r}")
        return self.dir / checkpoint_id

    def exists(self, checkpoint_id: str) -> bool:
        return (self.path_of(checkpoint_id) / MANIFEST).is_file()

    def create(self, manifest: CheckpointManifest,
               write_files: Callable[[Path], None]) -> tuple[CheckpointRecord, bool]:
        """Write a checkpoint atomically; (record, False) if the id already existed."""
        target = self.path_of(manifest.id)
        if self.exists(manifest.id):
            return self.get(manifest.id), False
        stage = self.staging / f"{manifest.id}.{uuid.uuid4().hex[:8]}"
        stage.mkdir(parents=True)
        try:
            write_files(stage)
            manifest.size_bytes = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
            _write_json(stage / MANIFEST, asdict(manifest))
            try:
                os.rename(stage, target)
            except OSError:
                # Someone else finished the same checkpoint first: theirs stands.
                if self.exists(manifest.id):
                    return self.get(manifest.id), False
                raise
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        return CheckpointRecord(manifest, target), True

    def get(self, checkpoint_id: str) -> CheckpointRecord:
        path = self.path_of(checkpoint_id)
        try:
            data = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise NotFound(message=f"checkpoint checkpoints/{checkpoint_id} not found",
                           reason="CHECKPOINT_NOT_FOUND",
                           metadata={"checkpoint": f"checkpoints/{checkpoint_id}"}) from None
        return CheckpointRecord(CheckpointManifest.from_dict(data), path)

    def list(self, page_size: int = 0, page_token: str = "",
             parent: str | None = None) -> tuple[list[CheckpointRecord], str]:
        records = []
        for entry in self.dir.iterdir():
            if not CHECKPOINT_ID.match(entry.name):
                continue
            try:
                record = self.get(entry.name)
            except NotFound:
                continue  # deleted while listing
            if parent is None or record.manifest.parent == parent:
                records.append(record)
        return paginate(records, lambda r: (r.manifest.create_time, r.manifest.id),
                        page_size, page_token)

    def delete(self, checkpoint_id: str) -> None:
        path = self.path_of(checkpoint_id)
        if not self.exists(checkpoint_id):
            raise NotFound(message=f"checkpoint checkpoints/{checkpoint_id} not found",
                           reason="CHECKPOINT_NOT_FOUND")
        # Rename first so the checkpoint disappears in one step, then remove files.
        doomed = self.staging / f"deleted-{checkpoint_id}.{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
