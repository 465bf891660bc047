"""Adapters in and out of the PEFT service, and text generation, over a raw stub.

    stub = PeftServiceStub(grpc.insecure_channel("localhost:50051"))
    export_checkpoint(stub, "checkpoints/abc", "peft", "out/")   # PEFT's from_pretrained reads out/
    checkpoint = import_adapter(stub, "my-model", "peft-adapter/")
    for piece in generate(stub, checkpoint=checkpoint.name, prompt="Once upon a time"):
        print(piece.text, end="")

Downloads are written under their final names only once every byte has
arrived and its sha256 matched; an interrupted export leaves no half files.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from mlxtune.common.v1 import checkpoint_pb2 as common_pb
from mlxtune.peft.v1 import peft_service_pb2 as pb
from mlxtune.serving.file_chunks import file_chunks

EXPORT_FORMATS = {
    "mlx": pb.EXPORT_FORMAT_MLX,
    "peft": pb.EXPORT_FORMAT_PEFT,
    "fused": pb.EXPORT_FORMAT_FUSED,
}
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
UPLOAD_CHUNK_SIZE = 1 << 20


class TransferError(Exception):
    """The server's file stream was inconsistent (bad path, gap, digest mismatch)."""


def export_checkpoint(peft_stub, name: str, format: str | int = "mlx",  # noqa: A002
                      dest_dir: str | os.PathLike = ".", *, chunk_size: int = 0,
                      timeout: float | None = None) -> list[Path]:
    """Download checkpoint `name` in `format` ("mlx", "peft", "fused") into `dest_dir`.

    Returns the written files. Raises grpc.RpcError for server errors and
    TransferError when the stream does not add up.
    """
    fmt = EXPORT_FORMATS[format] if isinstance(format, str) else format
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    request = pb.ExportCheckpointRequest(name=name, format=fmt, chunk_size=chunk_size)
    open_files: dict[str, tuple] = {}
    written = []
    try:
        for response in peft_stub.ExportCheckpoint(request, timeout=timeout):
            chunk = response.chunk
            if chunk.path not in open_files:
                target = dest / _relative(chunk.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
                open_files[chunk.path] = (target, partial, open(partial, "wb"),
                                          hashlib.sha256(), [0])
            target, partial, handle, digest, received = open_files[chunk.path]
            if chunk.offset != received[0]:
                raise TransferError(f"{chunk.path}: expected offset {received[0]}, "
                                    f"got {chunk.offset}")
            handle.write(chunk.data)
            digest.update(chunk.data)
            received[0] += len(chunk.data)
            if chunk.eof:
                handle.close()
                if chunk.sha256 and chunk.sha256 != "sha256:" + digest.hexdigest():
                    raise TransferError(f"{chunk.path}: sha256 mismatch")
                os.replace(partial, target)
                written.append(target)
                del open_files[chunk.path]
        if open_files:
            raise TransferError(f"the stream ended inside {sorted(open_files)}")
    finally:
        for _, partial, handle, _, _ in open_files.values():
            handle.close()
            partial.unlink(missing_ok=True)
    return written


def import_adapter(peft_stub, model: str, src_dir: str | os.PathLike, *,
                   request_id: str | None = None, chunk_size: int = UPLOAD_CHUNK_SIZE,
                   timeout: float | None = None) -> common_pb.Checkpoint:
    """Upload a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    as a new checkpoint of base model `model`. A retry with the same request_id
    returns the first import's checkpoint."""
    src = Path(src_dir)
    missing = [n for n in PEFT_FILES if not (src / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}")
    header = pb.ImportAdapterHeader(model=model, request_id=request_id or str(uuid.uuid4()))

    def messages() -> Iterator[pb.ImportAdapterRequest]:
        yield pb.ImportAdapterRequest(header=header)
        for chunk in file_chunks(src, PEFT_FILES, chunk_size):
            yield pb.ImportAdapterRequest(chunk=chunk)

    return peft_stub.ImportAdapter(messages(), timeout=timeout).checkpoint


def generate(peft_stub, *, model: str = "", checkpoint: str = "", prompt: str = "",
             messages: Iterable[tuple[str, str] | dict] = (), max_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None,
             seed: int | None = None, timeout: float | None = None
             ) -> Iterator[pb.GenerateResponse]:
    """Stream GenerateResponse messages; the last carries finish_reason and stats."""
    chat = [pb.ChatMessage(**m) if isinstance(m, dict) else pb.ChatMessage(role=m[0],
                                                                          content=m[1])
            for m in messages]
    request = pb.GenerateRequest(model=model, checkpoint=checkpoint, prompt=prompt,
                                 messages=chat)
    for field, value in (("max_tokens", max_tokens), ("temperature", temperature),
                         ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(request, field, value)
    yield from peft_stub.Generate(request, timeout=timeout)


def _relative(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(p in ("", ".", "..") for p in name.split("/")):
        raise TransferError(f"the server sent an unsafe path {name!r}")
    return path
