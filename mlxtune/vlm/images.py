"""Image references in chat records, and decoding images safely.

Records name their images in two ways (both common in the wild):

- a message whose content is a list of parts:
  ``[{"type": "image", "image": "photos/cat.jpg"}, {"type": "text", "text": "..."}]``
- a top-level ``"images": ["photos/cat.jpg", ...]`` list. Image parts without
  an ``"image"`` key take the next entry of it, in order; when no message has
  an image part, the images go in front of the first user message.

Paths are relative to the upload (the FileChunk paths of the images sent
with it). Decoding checks the byte size before reading and the pixel count
from the header before decoding pixels, so a small file that unpacks to a
huge bitmap (a decompression bomb) is refused before it costs memory; then
EXIF orientation is applied (phones store rotated pixels plus a flag) and
the image is converted to RGB.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_IMAGE_BYTES = 16 << 20
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # about 7300 x 5500
MAX_IMAGE_PATH_LENGTH = 1024


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def from_env(cls) -> "ImageLimits":
        """Limits an operator set with MLXTUNE_MAX_IMAGE_BYTES / MLXTUNE_MAX_IMAGE_PIXELS."""
        return cls(int(os.environ.get("MLXTUNE_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES)),
                   int(os.environ.get("MLXTUNE_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)))


DEFAULT_LIMITS = ImageLimits()


class ImageProblem(ValueError):
    """Why an image cannot be used; the message names no path (callers add it)."""


def path_problem(path: Any) -> str | None:
    """Why `path` cannot name an image of an upload, or None."""
    if not isinstance(path, str) or not path:
        return "an image path must be a non-empty string"
    if len(path) > MAX_IMAGE_PATH_LENGTH:
        return f"an image path is at most {MAX_IMAGE_PATH_LENGTH} characters"
    if path.startswith("/") or "\\" in path or "\x00" in path:
        return f"image path {path!r} must be relative, with '/' separators"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return f"image path {path!r} must not contain empty, '.' or '..' parts"
    return None


def has_image_references(record: Any) -> bool:
    """Whether a chat record uses images at all (cheap: no validation)."""
    if not isinstance(record, dict):
        return False
    if record.get("images"):
        return True
    for message in record.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") == "image" for p in content):
            return True
    return False


def normalize_record(record: dict) -> tuple[list[dict], list[str]]:
    """(messages with every image part as {"type": "image"}, image paths in order).

    Raises ImageProblem when the references do not add up."""
    listed = record.get("images")
    if listed is not None and not isinstance(listed, list):
        raise ImageProblem('"images" must be a list of paths')
    listed = list(listed or [])
    messages, paths, next_listed = [], [], 0
    for i, message in enumerate(record.get("messages") or []):
        content = message.get("content")
        if not isinstance(content, list):
            messages.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("image", "text"):
                raise ImageProblem(f'messages[{i}].content[{j}] must be an object with "type" '
                                   '"text" or "image"')
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise ImageProblem(f'messages[{i}].content[{j}].text must be a string')
                parts.append({"type": "text", "text": part["text"]})
                continue
            if "image" in part:
                path = part["image"]
            elif next_listed < len(listed):
                path, next_listed = listed[next_listed], next_listed + 1
            else:
                raise ImageProblem(f'messages[{i}].content[{j}] is an image part without '
                                   '"image" and the record\'s "images" list has no entry left')
            paths.append(path)
            parts.append({"type": "image"})
        messages.append({**message, "content": parts})
    if not paths and listed:
        # Only a top-level list: the images open the first user turn.
        users = [k for k, m in enumerate(messages) if m.get("role") == "user"]
        if not users:
            raise ImageProblem('"images" is given but no user message can hold them')
        first = messages[users[0]]
        text = first.get("content")
        parts = [{"type": "image"} for _ in listed]
        if isinstance(text, str):
            parts.append({"type": "text", "text": text})
        messages[users[0]] = {**first, "content": parts}
        paths, next_listed = list(listed), len(listed)
    elif next_listed < len(listed) and any("image" not in p for p in _image_parts(record)):
        raise ImageProblem(f'"images" lists {len(listed)} images but only {next_listed} '
                           'image parts use them')
    for path in paths:
        if (problem := path_problem(path)) is not None:
            raise ImageProblem(problem)
    return messages, paths


def _image_parts(record: dict) -> list[dict]:
    return [p for m in record.get("messages") or [] if isinstance(m, dict)
            and isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") == "image"]


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS):
    """The RGB image in `data`, EXIF-rotated; ImageProblem if it is unusable."""
    from PIL import Image, ImageOps

    if len(data) > limits.max_bytes:
        raise ImageProblem(f"is {len(data)} bytes, more than the limit of {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageProblem(f"has more than the limit of {limits.max_pixels} pixels") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise ImageProblem(f"is not an image pillow can read ({type(exc).__name__})") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageProblem(f"is {width}x{height} pixels, more than the limit of "
                           f"{limits.max_pixels} pixels")
    if width < 1 or height < 1:
        raise ImageProblem(f"has no pixels ({width}x{height})")
    try:
        image.load()  # decodes every pixel: truncated and corrupt data fail here
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise ImageProblem(f"cannot be decoded: {exc}") from None


def content_problems(content: list) -> list[str]:
    """Why a list-of-parts message content is malformed (each starts with "content[j]")."""
    problems = []
    for j, part in enumerate(content):
        where = f"content[{j}]"
        if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
            problems.append(f'{where} must be an object with "type" "text" or "image"')
        elif part["type"] == "text" and not isinstance(part.get("text"), str):
            problems.append(f"{where}.text must be a string")
        elif part["type"] == "image" and "image" in part and \
                (problem := path_problem(part["image"])) is not None:
            problems.append(f"{where}.image: {problem}")
    return problems
