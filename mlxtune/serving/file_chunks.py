"""Files over gRPC streams as ``mlxtune.common.v1.FileChunk`` messages.

Sending: :func:`file_chunks` cuts files into chunks, the first carrying the
file's size and the last ``eof`` plus the sha256 of the whole file, so a
receiver can check it without a second pass.

Receiving: :class:`FileSpool` writes incoming chunks into a fresh folder,
refusing anything a client should not be able to do to a server's disk:
paths outside the folder, names the RPC does not expect, gaps or overlaps,
files or totals over the limits, and content that does not match its digest.
Every refusal is an ``InvalidArgument`` naming the chunk's field.

Export, import and dataset image uploads share these two pieces.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mlxtune.common.v1 import files_pb2
from mlxtune.errors import InvalidArgument

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 10
# Well under the servers' 64 MiB message limit, whatever the client asks for.
MAX_CHUNK_SIZE = 16 << 20


def chunk_size_or_default(requested: int, field_path: str = "chunk_size") -> int:
    """The chunk size a request asked for: 0 means the default; nonsense is refused."""
    if requested == 0:
        return DEFAULT_CHUNK_SIZE
    if not MIN_CHUNK_SIZE <= requested <= MAX_CHUNK_SIZE:
        raise InvalidArgument.field(
            field_path, f"must be 0 (default {DEFAULT_CHUNK_SIZE}) or between "
            f"{MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes, got {requested}")
    return requested


def file_chunks(folder: Path, names: Iterable[str],
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[files_pb2.FileChunk]:
    """Chunks of each named file under `folder` (names are "/"-separated relative paths)."""
    for name in names:
        path = folder / name
        size = path.stat().st_size
        digest = hashlib.sha256()
        offset = 0
        with open(path, "rb") as f:
            while True:
                data = f.read(chunk_size)
                digest.update(data)
                end = offset + len(data)
                last = end >= size or not data
                chunk = files_pb2.FileChunk(path=name, offset=offset, data=data, eof=last)
                if offset == 0:
                    chunk.size = size
                if last:
                    chunk.sha256 = "sha256:" + digest.hexdigest()
                yield chunk
                if last:
                    break
                offset = end


def safe_relative_path(name: str, field_path: str = "chunk.path") -> PurePosixPath:
    """`name` as a relative path that cannot leave the folder it is joined to."""
    path = PurePosixPath(name)
    bad = (not name or name.startswith("/") or "\\" in name or "\0" in name
           or any(part in ("", ".", "..") for part in name.split("/")))
    if bad or len(name) > 255:
        raise InvalidArgument.field(
            field_path, f"{name!r} is not a relative file path (no '..', no leading '/', "
            "at most 255 characters)")
    return path


@dataclass
class _Incoming:
    handle: object
    received: int = 0
    declared_size: int | None = None
    digest: object = field(default_factory=hashlib.sha256)
    done: bool = False


class FileSpool:
    """Receives FileChunks into a new folder under `staging`.

    ``allowed``: the file names the RPC takes (None: any safe relative path).
    ``max_file_bytes`` maps a name to its own limit; ``max_total_bytes``
    bounds the whole upload. Use as a context manager: the folder is removed
    on exit unless :meth:`keep` was called.
    """

    def __init__(self, staging: Path, *, allowed: Iterable[str] | None = None,
                 max_total_bytes: int, max_file_bytes: dict[str, int] | None = None,
                 max_files: int = 64, field_path: str = "chunk") -> None:
        self.folder = Path(staging) / f"upload-{uuid.uuid4().hex[:12]}"
        self.folder.mkdir(parents=True)
        self.allowed = set(allowed) if allowed is not None else None
        self.max_total_bytes = max_total_bytes
        self.max_file_bytes = dict(max_file_bytes or {})
        self.max_files = max_files
        self.field = field_path
        self.total = 0
        self.files: dict[str, _Incoming] = {}
        self._kept = False

    def __enter__(self) -> "FileSpool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, chunk: files_pb2.FileChunk) -> None:
        name = chunk.path
        safe_relative_path(name, f"{self.field}.path")
        if self.allowed is not None and name not in self.allowed:
            raise InvalidArgument.field(
                f"{self.field}.path", f"unexpected file {name!r}; this call takes "
                + ", ".join(sorted(self.allowed)))
        incoming = self.files.get(name) or self._open(name, chunk)
        if incoming.done:
            raise InvalidArgument.field(f"{self.field}.path",
                                        f"{name!r} got more data after its eof chunk")
        if chunk.offset != incoming.received:
            raise InvalidArgument.field(
                f"{self.field}.offset", f"{name!r}: expected offset {incoming.received}, "
                f"got {chunk.offset} (chunks of a file must arrive in order)")
        limit = self.max_file_bytes.get(name, self.max_total_bytes)
        if incoming.received + len(chunk.data) > limit:
            raise InvalidArgument.field(f"{self.field}.data",
                                        f"{name!r} is larger than the limit of {limit} bytes")
        if self.total + len(chunk.data) > self.max_total_bytes:
            raise InvalidArgument.field(
                f"{self.field}.data",
                f"the upload is larger than the limit of {self.max_total_bytes} bytes")
        incoming.handle.write(chunk.data)
        incoming.digest.update(chunk.data)
        incoming.received += len(chunk.data)
        self.total += len(chunk.data)
        if chunk.eof:
            self._finish_file(name, incoming, chunk.sha256)

    def finish(self, required: Iterable[str] = ()) -> dict[str, Path]:
        """Every file complete and every required one present; {name: path}."""
        unfinished = sorted(n for n, f in self.files.items() if not f.done)
        if unfinished:
            raise InvalidArgument.field(f"{self.field}.eof",
                                        f"the stream ended before the eof chunk of {unfinished}")
        missing = sorted(set(required) - set(self.files))
        if missing:
            raise InvalidArgument.field(f"{self.field}.path",
                                        f"required files were not sent: {', '.join(missing)}")
        return {name: self.folder / name for name in self.files}

    def keep(self) -> Path:
        """Hand the folder over to the caller (it is no longer removed on exit)."""
        self._kept = True
        return self.folder

    def close(self) -> None:
        for incoming in self.files.values():
            incoming.handle.close()
        if not self._kept:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _open(self, name: str, chunk: files_pb2.FileChunk) -> _Incoming:
        if len(self.files) >= self.max_files:
            raise InvalidArgument.field(f"{self.field}.path",
                                        f"more than {self.max_files} files in one upload")
        limit = self.max_file_bytes.get(name, self.max_total_bytes)
        if chunk.size > limit:
            raise InvalidArgument.field(
                f"{self.field}.size", f"{name!r} ({chunk.size} bytes) is larger than the "
                f"limit of {limit} bytes")
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        incoming = _Incoming(open(path, "wb"), declared_size=chunk.size or None)
        self.files[name] = incoming
        return incoming

    def _finish_file(self, name: str, incoming: _Incoming, sha256: str) -> None:
        incoming.handle.close()
        incoming.done = True
        if incoming.declared_size is not None and incoming.received != incoming.declared_size:
            raise InvalidArgument.field(
                f"{self.field}.size", f"{name!r}: the first chunk announced "
                f"{incoming.declared_size} bytes, {incoming.received} arrived")
        if sha256:
            actual = "sha256:" + incoming.digest.hexdigest()
            if sha256.lower() != actual:
                raise InvalidArgument.field(
                    f"{self.field}.sha256", f"{name!r}: the data's digest is {actual}, the "
                    f"chunk says {sha256}")
