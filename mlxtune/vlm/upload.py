"""Images that travel with a dataset upload: receive, check, store.

The client streams each image as FileChunks (path, growing offsets, eof with
an optional sha256) among the JSONL chunks; the server never opens a client
path. Chunks are spooled under the store's tmp/ by the shared ``FileSpool``
(paths, order, digests and the total size checked as they arrive). When the
upload commits, every record that references an image is checked against
what arrived; one error lists every bad record by its line number
(``records[line 3]``: missing, corrupt, too many bytes or pixels) and every
image no record references (``images["x.png"]``).

Stored images are content-addressed: ``images/{sha256}`` in the dataset's
folder plus ``images.json`` mapping each upload path to its digest, so an
image sent under two names is stored once, and the dataset id covers the
images as well as the JSONL bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mlxtune.data.formats import iter_file_lines
from mlxtune.errors import InvalidArgument, Violations
from mlxtune.serving.file_chunks import FileSpool
from mlxtune.vlm.images import (
    ImageLimits,
    ImageProblem,
    decode_image,
    has_image_references,
    normalize_record,
)

IMAGES_MANIFEST = "images.json"
IMAGES_DIR = "images"
DEFAULT_MAX_TOTAL_IMAGE_BYTES = 4 << 30
DEFAULT_MAX_IMAGES = 200_000
MAX_LISTED_PROBLEMS = 50


class ImageReceiver:
    """Collects the images of one upload (FileChunks, through the shared
    ``FileSpool``); ``abort()`` removes what it spooled.

    No per-image byte limit applies while receiving: an oversized image is
    refused at commit, naming the records that use it (the JSONL may arrive
    after the image). The spool's total limit bounds the disk an upload uses.
    """

    def __init__(self, tmp_dir: Path, limits: ImageLimits | None = None,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_IMAGE_BYTES,
                 max_images: int = DEFAULT_MAX_IMAGES) -> None:
        self.limits = limits or ImageLimits.from_env()
        self.tmp_dir = Path(tmp_dir)
        self.max_total_bytes = max_total_bytes
        self.max_images = max_images
        self.spool: FileSpool | None = None  # made on the first chunk: text uploads need none
        self.files: dict[str, Path] | None = None
        self.digests: dict[str, str] = {}

    def __bool__(self) -> bool:
        return self.spool is not None and bool(self.spool.files)

    def add(self, chunk) -> None:
        """One ``mlxtune.common.v1.FileChunk`` of an image."""
        if self.files is not None:
            raise InvalidArgument.field("image", "images arrived after the upload was committed")
        if self.spool is None:
            self.spool = FileSpool(self.tmp_dir, max_total_bytes=self.max_total_bytes,
                                   max_files=self.max_images, field_path="image")
        self.spool.add(chunk)

    def finish(self) -> dict[str, Path]:
        """Upload path -> spooled file, every file complete (InvalidArgument if not)."""
        if self.files is None:
            self.files = self.spool.finish() if self.spool is not None else {}
            self.digests = {name: _file_sha256(path) for name, path in self.files.items()}
        return self.files

    # -- commit -------------------------------------------------------------

    def check_records(self, data_path: Path) -> int:
        """Every image reference of the JSONL at `data_path` against the
        received images; InvalidArgument lists every problem. Returns the
        number of distinct images."""
        self.finish()
        problems = _ProblemList()
        verdicts: dict[str, str | None] = {}
        referenced: set[str] = set()
        with open(data_path, "rb") as f:
            for line_number, line in enumerate(iter_file_lines(f), start=1):
                # Lines that cannot reference an image skip the JSON parse.
                if not isinstance(line, bytes) or b'"image' not in line:
                    continue
                record = json.loads(line.decode("utf-8-sig" if line_number == 1 else "utf-8"))
                if not has_image_references(record):
                    continue
                try:
                    _, paths = normalize_record(record)
                except ImageProblem as exc:
                    problems.add(f"records[line {line_number}]", str(exc))
                    continue
                for path in paths:
                    referenced.add(path)
                    if path not in verdicts:
                        verdicts[path] = self._verdict(path)
                    if verdicts[path] is not None:
                        problems.add(f"records[line {line_number}]",
                                     f"image {path!r} {verdicts[path]}")
        for path in sorted(set(self.files) - referenced):
            problems.add(f'images["{path}"]', "uploaded but no record references it")
        problems.raise_if_any()
        return len({self.digests[p] for p in referenced})

    def _verdict(self, path: str) -> str | None:
        """Why the image at `path` cannot be used, or None."""
        file = self.files.get(path)
        if file is None:
            return "was not uploaded (send it as an image chunk with this path)"
        size = file.stat().st_size
        if size > self.limits.max_bytes:
            return f"is {size} bytes, more than the limit of {self.limits.max_bytes}"
        try:
            decode_image(file.read_bytes(), self.limits)
        except ImageProblem as exc:
            return str(exc)
        return None

    def manifest(self) -> dict[str, str]:
        """Upload path -> sha256 hex of every image."""
        return dict(sorted(self.digests.items()))

    def digest_extra(self) -> str:
        """What the dataset id adds for its images (empty without images)."""
        self.finish()
        if not self.digests:
            return ""
        return hashlib.sha256(json.dumps(self.manifest(), sort_keys=True).encode()).hexdigest()

    def move_into(self, folder: Path) -> None:
        """images/{sha256} and images.json into a staging dataset folder."""
        if not self.digests:
            return
        target = folder / IMAGES_DIR
        target.mkdir(exist_ok=True)
        for name, digest in self.digests.items():
            destination = target / digest
            if not destination.exists():
                os.replace(self.files[name], destination)
        with open(folder / IMAGES_MANIFEST, "w") as f:
            json.dump(self.manifest(), f, indent=2)

    def abort(self) -> None:
        if self.spool is not None:
            self.spool.close()


class _ProblemList:
    """The first MAX_LISTED_PROBLEMS problems, and how many there were."""

    def __init__(self) -> None:
        self.violations = Violations()
        self.total = 0

    def add(self, field_path: str, description: str) -> None:
        self.total += 1
        if self.total <= MAX_LISTED_PROBLEMS:
            self.violations.add(field_path, description)

    def raise_if_any(self) -> None:
        if not self.total:
            return
        first = self.violations.items[0]
        if self.total > MAX_LISTED_PROBLEMS:
            self.violations.add("records", f"{self.total - MAX_LISTED_PROBLEMS} more problems "
                                "not listed")
        self.violations.raise_if_any(
            reason="INVALID_DATASET_IMAGES",
            message=f"the dataset's images have {self.total} problem(s), the first: "
            f"{first.field}: {first.description}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_images(dataset_dir: Path) -> dict[str, Path]:
    """Upload path -> stored file of a dataset's images (empty without images)."""
    manifest = dataset_dir / IMAGES_MANIFEST
    if not manifest.exists():
        return {}
    paths = json.loads(manifest.read_text())
    return {path: dataset_dir / IMAGES_DIR / digest for path, digest in paths.items()}
