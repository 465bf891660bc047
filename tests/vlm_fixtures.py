"""Shared pieces of the VLM tests: tiny models on disk, image uploads."""

from __future__ import annotations

import json
from pathlib import Path

from mlxtune.common.v1 import files_pb2
from mlxtune.trainer.v1 import trainer_service_pb2 as tpb

FAMILIES = ("qwen2_vl", "llava")


def write_vlm_models(root: Path) -> Path:
    from mlxtune.testing.random_vlms import write_vlm

    for family in FAMILIES:
        write_vlm(root / f"tiny-{family}", family, seed=1)
    return root


def jsonl(records: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()


def image_chunks(images: dict[str, bytes], size: int = 64 << 10):
    """FileChunk messages of each image: growing offsets, eof, no digest."""
    for path, data in images.items():
        for start in range(0, max(len(data), 1), size):
            piece = data[start:start + size]
            yield files_pb2.FileChunk(path=path, offset=start, data=piece,
                                      eof=start + size >= len(data),
                                      size=len(data) if start == 0 else 0)


def upload_with_images(stub, records: list[dict], images: dict[str, bytes], **header):
    """UploadDataset with the images sent first, then the JSONL (any order works)."""
    data = jsonl(records)

    def messages():
        yield tpb.UploadDatasetRequest(header=tpb.UploadDatasetHeader(**header))
        for chunk in image_chunks(images):
            yield tpb.UploadDatasetRequest(image=chunk)
        for i in range(0, len(data), 4096):
            yield tpb.UploadDatasetRequest(chunk=data[i:i + 4096])

    return stub.UploadDataset(messages(), timeout=120).dataset
