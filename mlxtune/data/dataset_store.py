"""Content-addressed store of validated JSONL datasets.

Layout under the store root:

    datasets/{id}/data.jsonl   the bytes exactly as uploaded
    datasets/{id}/meta.json    format, counts, digest, names, create time
    tmp/                       uploads being received and datasets being staged

The id is the first 16 hex digits of the sha256 of the bytes, so the same
file always becomes the same dataset. A dataset is staged in a folder under
tmp/ and renamed into datasets/ in one step: a crash leaves either nothing or
a whole dataset, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlxtune.data.formats import DatasetFormat, iter_file_lines, validate_jsonl
from mlxtune.errors import InvalidArgument, NotFound, ResourceExhausted
from mlxtune.store.paging import paginate

DATASET_ID_PATTERN = re.compile(r"^[a-f0-9]{16}$")
DEFAULT_MAX_UPLOAD_BYTES = 1 << 30
# Staging folders older than this are leftovers of a crash.
STALE_TMP_SECONDS = 24 * 3600


@dataclass(frozen=True)
class DatasetRecord:
    """What the store knows about one dataset (the proto's Dataset)."""

    id: str
    format: DatasetFormat
    num_records: int
    size_bytes: int
    digest: str  # "sha256:<hex>"
    create_time: float  # seconds since the epoch
    display_name: str
    source: str  # "upload" or the path under the data root
    num_images: int = 0  # images stored with the dataset (vision-language chats)

    @property
    def name(self) -> str:
        return f"datasets/{self.id}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "format": self.format.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetRecord:
        # Keys a later version may add are ignored, so old servers read new stores.
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "format": DatasetFormat(data["format"])})


def check_dataset_id(dataset_id: str, field: str = "dataset_id") -> str:
    """The id itself, or InvalidArgument: ids become paths, so nothing but
    16 lowercase hex digits may reach the file system."""
    if not isinstance(dataset_id, str) or not DATASET_ID_PATTERN.match(dataset_id):
        raise InvalidArgument.field(field, f"{dataset_id!r} is not a dataset id (16 hex digits)")
    return dataset_id


def parse_dataset_name(name: str, field: str = "name") -> str:
    """The id of a resource name "datasets/{id}"."""
    prefix = "datasets/"
    if not isinstance(name, str) or not name.startswith(prefix):
        raise InvalidArgument.field(field, f'{name!r} is not a dataset name "datasets/{{id}}"')
    return check_dataset_id(name[len(prefix):], field)


class DatasetStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.datasets_dir = self.root / "datasets"
        self.tmp_dir = self.root / "tmp"
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()

    # -- writing ---------------------------------------------------------

    def put(self, data: bytes, fmt: DatasetFormat | None = None,
            display_name: str = "", source: str = "upload") -> DatasetRecord:
        """Validate and store `data`; the same bytes return the stored record."""
        existing = self._existing(_digest_hex(data), fmt, lambda: validate_jsonl(data, fmt))
        if existing is not None:
            return existing
        staging = Path(tempfile.mkdtemp(prefix="stage-", dir=self.tmp_dir))
        try:
            with open(staging / "data.jsonl", "wb") as f:
                f.write(data)
            return self._commit_staged(staging, fmt, display_name, source)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def put_file(self, path: str | Path, fmt: DatasetFormat | None = None,
                 display_name: str = "", source: str = "", move: bool = False,
                 images=None) -> DatasetRecord:
        """Validate and store the file at `path`, streaming (any size fits).

        The file is first copied (or moved) into staging and checked there,
        so what is stored is exactly what was validated even if the original
        changes meanwhile. `images` (an ``mlxtune.vlm.upload.ImageReceiver``)
        holds the images that came with an upload; records that reference
        images are checked against it, and without it such records fail."""
        staging = Path(tempfile.mkdtemp(prefix="stage-", dir=self.tmp_dir))
        try:
            target = staging / "data.jsonl"
            if move:
                os.replace(path, target)
            else:
                shutil.copyfile(path, target)
            return self._commit_staged(staging, fmt, display_name, source or str(path), images)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit_staged(self, staging: Path, fmt: DatasetFormat | None,
                       display_name: str, source: str, images=None) -> DatasetRecord:
        from mlxtune.vlm.upload import ImageReceiver

        data_path = staging / "data.jsonl"
        digest = _file_digest_hex(data_path)
        images = images if images is not None else ImageReceiver(self.tmp_dir)
        # The id covers the images too: same JSONL, other images, other dataset.
        dataset_digest = digest if not images else hashlib.sha256(
            f"{digest}\0{images.digest_extra()}".encode()).hexdigest()

        def validate():
            with open(data_path, "rb") as f:
                return validate_jsonl(iter_file_lines(f), fmt, keep_records=False)

        existing = self._existing(dataset_digest, fmt, validate)
        if existing is not None:
            return existing
        report = validate()
        num_images = 0
        if report.format == DatasetFormat.CHAT:
            num_images = images.check_records(data_path)  # every image reference, by line
            images.move_into(staging)
        record = DatasetRecord(
            id=dataset_digest[:16], format=report.format, num_records=report.num_records,
            size_bytes=data_path.stat().st_size, digest=f"sha256:{digest}",
            create_time=time.time(), display_name=display_name, source=source,
            num_images=num_images)
        with open(staging / "meta.json", "w") as f:
            json.dump(record.to_json(), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        with open(data_path, "rb") as f:
            os.fsync(f.fileno())
        final = self.datasets_dir / record.id
        try:
            os.rename(staging, final)
        except OSError:
            # Another request stored the same bytes first; theirs stands.
            if (final / "meta.json").exists():
                return self.get(record.id)
            raise
        _fsync_dir(self.datasets_dir)
        return record

    def _existing(self, digest: str, fmt: DatasetFormat | None, validate) -> DatasetRecord | None:
        if not (self.datasets_dir / digest[:16] / "meta.json").exists():
            return None
        record = self.get(digest[:16])
        if fmt is not None and fmt != record.format:
            # A record matches only the format its keys show, so validating
            # against the other format raises and lists why.
            validate()
        return record

    # -- reading ---------------------------------------------------------

    def get(self, dataset_id: str) -> DatasetRecord:
        check_dataset_id(dataset_id)
        try:
            meta = json.loads((self.datasets_dir / dataset_id / "meta.json").read_text())
        except FileNotFoundError:
            raise NotFound(message=f"datasets/{dataset_id} does not exist",
                           reason="DATASET_NOT_FOUND") from None
        return DatasetRecord.from_json(meta)

    def data_path(self, dataset_id: str) -> Path:
        """Path of the stored JSONL (after checking the dataset exists)."""
        self.get(dataset_id)
        return self.datasets_dir / dataset_id / "data.jsonl"

    def read_records(self, dataset_id: str) -> list[dict[str, Any]]:
        """The parsed records, in file order, blank lines skipped."""
        with open(self.data_path(dataset_id), "rb") as f:
            return [json.loads(line.decode("utf-8-sig")) for line in f if line.strip()]

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[DatasetRecord], str]:
        """One page of datasets, newest first, and the next page's token
        ("" on the last page). The token is a cursor (time and id of the
        page's last dataset), so datasets added meanwhile never shift pages."""
        records = [self.get(entry.name) for entry in self.datasets_dir.iterdir()
                   if DATASET_ID_PATTERN.match(entry.name) and (entry / "meta.json").exists()]
        return paginate(records, lambda r: (r.create_time, r.id), page_size, page_token)

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_SECONDS
        for entry in self.tmp_dir.iterdir():
            try:
                if entry.stat().st_mtime >= cutoff:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError:
                pass  # another process cleaned it first


class UploadAssembler:
    """Receives a client-streamed upload chunk by chunk.

    Chunks are spooled to a file under the store's tmp/ so a 1 GiB upload
    never sits in memory; the file is removed on any failure, and the upload
    ends as a stored dataset or as nothing.

        with UploadAssembler(store) as upload:
            for chunk in chunks:
                upload.add(chunk)
            record = upload.commit(fmt, display_name)
    """

    def __init__(self, store: DatasetStore, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
        from mlxtune.vlm.upload import ImageReceiver

        self.store = store
        self.max_bytes = max_bytes
        self.size = 0
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".jsonl", dir=store.tmp_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self.images = ImageReceiver(store.tmp_dir)

    def add(self, chunk) -> None:
        """The next JSONL bytes, or a FileChunk of an image the records reference."""
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            self.images.add(chunk)
            return
        if self.size + len(chunk) > self.max_bytes:
            self.abort()
            raise ResourceExhausted(
                message=f"the dataset is larger than the limit of {self.max_bytes} bytes",
                reason="DATASET_TOO_LARGE", metadata={"max_bytes": str(self.max_bytes)})
        self._file.write(chunk)
        self.size += len(chunk)

    def commit(self, fmt: DatasetFormat | None = None, display_name: str = "",
               source: str = "upload") -> DatasetRecord:
        try:
            self._file.close()
            return self.store.put_file(self.path, fmt, display_name, source, move=True,
                                       images=self.images)
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the upload; safe to call more than once."""
        self._file.close()
        self.path.unlink(missing_ok=True)
        self.images.abort()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()


def resolve_data_path(data_root: str | Path, path: str) -> Path:
    """The real path of a dataset file named relative to the data root.

    Rejects what could read files the server operator did not expose: ".."
    components, absolute paths outside the root and symlinks leading out
    (checked on the fully resolved path)."""
    field = "path"
    if not path:
        raise InvalidArgument.field(field, "a path under the data root is required")
    if "\x00" in path:
        raise InvalidArgument.field(field, "contains a NUL character")
    if ".." in Path(path).parts:
        raise InvalidArgument.field(field, f'{path!r} must not contain ".."')
    root = Path(os.path.realpath(data_root))
    resolved = Path(os.path.realpath(root / path))  # an absolute `path` replaces root here
    if not resolved.is_relative_to(root):
        raise InvalidArgument.field(field, f"{path!r} is outside the data root")
    if not resolved.exists():
        raise NotFound(message=f"no file {path!r} under the data root", reason="DATA_FILE_NOT_FOUND")
    if not resolved.is_file():
        raise InvalidArgument.field(field, f"{path!r} is not a regular file")
    return resolved


def _digest_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest_hex(path: Path) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest needs Python 3.11
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
