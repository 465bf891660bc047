"""Chat records with images to training examples: tokens, loss mask, images.

Text and masking reuse the text pipeline: the record is rendered with the
model's chat template (one image placeholder per image part) and the loss
covers the assistant turns exactly as for text models
(``mlxtune.data.tokenize``). Each placeholder is then expanded to the image's
feature tokens, which never carry loss.

Each distinct image is decoded and run through the processor once per job
(``PixelCache``): the processor's own call on a lone placeholder gives the
pixel values, the grid (Qwen2-VL) and, by counting the tokens it expanded
the placeholder to, how many feature tokens the image takes — so no family
arithmetic is repeated here. Once per dataset the expansion is checked
against the processor's expansion of a whole record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxtune.data.formats import DatasetFormat
from mlxtune.data.tokenize import (
    LossMaskMode,
    TemplateRenderError,
    TokenizedExample,
    tokenize_record,
)
from mlxtune.errors import FailedPrecondition, InvalidArgument, Violations
from mlxtune.vlm.families import VlmFamily
from mlxtune.vlm.images import (
    ImageLimits,
    ImageProblem,
    decode_image,
    normalize_record,
)


@dataclass
class ImageInputs:
    """What the processor makes of one image."""

    pixel_values: np.ndarray  # the family's layout (patches or [1, C, H, W])
    grid_thw: np.ndarray | None  # [1, 3] for Qwen2-VL, else None
    num_tokens: int  # feature tokens the image takes in the sequence

    @property
    def nbytes(self) -> int:
        return self.pixel_values.nbytes


@dataclass
class VlmExample(TokenizedExample):
    """A tokenized example plus its images (keys into the PixelCache) and,
    for M-RoPE models, its [3, T] position ids."""

    image_keys: tuple[str, ...] = ()
    positions: np.ndarray | None = None


@dataclass
class VlmTokenized:
    examples: list[VlmExample]
    record_indices: list[int]
    truncated: int
    dropped: int
    num_images: int = 0


class PixelCache:
    """Processor outputs per image, computed once per job.

    Kept in memory up to `memory_budget` bytes; past it, in ``.npz`` files
    under `disk_dir` (next to the dataset, keyed by the processor config),
    which later jobs on the same dataset and processor read back too."""

    def __init__(self, compute: Callable[[str], ImageInputs], disk_dir: Path | None = None,
                 memory_budget: int = 1 << 30) -> None:
        self.compute = compute
        self.disk_dir = disk_dir
        self.memory_budget = memory_budget
        self.memory_bytes = 0
        self.items: dict[str, ImageInputs] = {}
        self.computed = 0  # how many times the processor ran (tests read this)

    def get(self, key: str) -> ImageInputs:
        if (hit := self.items.get(key)) is not None:
            return hit
        inputs = self._read_disk(key)
        if inputs is None:
            inputs = self.compute(key)
            self.computed += 1
            self._write_disk(key, inputs)
        if self.memory_bytes + inputs.nbytes <= self.memory_budget:
            self.items[key] = inputs
            self.memory_bytes += inputs.nbytes
        return inputs

    def _file(self, key: str) -> Path | None:
        return self.disk_dir / f"{key}.npz" if self.disk_dir is not None else None

    def _read_disk(self, key: str) -> ImageInputs | None:
        path = self._file(key)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path) as data:
                grid = data["grid_thw"] if data["grid_thw"].size else None
                return ImageInputs(data["pixel_values"], grid, int(data["num_tokens"]))
        except (OSError, ValueError, KeyError):
            return None  # a torn or foreign file: recompute

    def _write_disk(self, key: str, inputs: ImageInputs) -> None:
        path = self._file(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{id(self)}.npz")
            grid = inputs.grid_thw if inputs.grid_thw is not None else np.zeros(0, np.int64)
            np.savez(tmp, pixel_values=inputs.pixel_values, grid_thw=grid,
                     num_tokens=np.int64(inputs.num_tokens))
            tmp.replace(path)  # whole files only, also with jobs running side by side
        except OSError:
            pass  # the cache is an optimisation; a read-only store still trains


class VlmProcessing:
    """The processor of one model, applied to images and records."""

    def __init__(self, processor, family: VlmFamily, config: dict, model=None,
                 limits: ImageLimits | None = None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.family = family
        self.image_token_id = family.image_token_id(config)
        self.model = model  # for M-RoPE position ids
        self.limits = limits or ImageLimits.from_env()
        self._expansion_checked = False

    def image_inputs(self, path: Path) -> ImageInputs:
        """Decode, EXIF-rotate, convert to RGB and process the image file."""
        try:
            image = decode_image(path.read_bytes(), self.limits)
        except ImageProblem as exc:
            raise FailedPrecondition(message=f"stored image {path.name} {exc}",
                                     reason="DATASET_IMAGE_UNREADABLE") from exc
        out = self.processor(text=[self.processor.image_token], images=[image])
        ids = np.asarray(out["input_ids"]).reshape(-1)
        grid = out.get("image_grid_thw")
        return ImageInputs(
            pixel_values=np.asarray(out["pixel_values"], dtype=np.float32),
            grid_thw=np.asarray(grid, dtype=np.int64).reshape(1, 3) if grid is not None else None,
            num_tokens=int((ids == self.image_token_id).sum()))

    def example(self, record: dict, image_files: dict[str, Path], cache: PixelCache,
                loss_mask: LossMaskMode) -> VlmExample:
        """One record, untruncated. Raises ImageProblem / TemplateRenderError."""
        messages, paths = normalize_record(record)
        missing = [p for p in paths if p not in image_files]
        if missing:
            raise ImageProblem(f"image {missing[0]!r} is not stored with the dataset")
        chat = {"messages": messages, **({"tools": record["tools"]} if "tools" in record else {})}
        base = tokenize_record(chat, DatasetFormat.CHAT, self.tokenizer, loss_mask)
        keys = tuple(image_files[p].name for p in paths)
        inputs = [cache.get(k) for k in keys]
        tokens, mask = self._expand(base.tokens, base.mask, [i.num_tokens for i in inputs])
        if not self._expansion_checked and paths:
            self._check_expansion(messages, [image_files[p] for p in paths], tokens)
            self._expansion_checked = True
        positions = self._positions(tokens, inputs) if self.family.mrope else None
        return VlmExample(tokens, mask, image_keys=keys, positions=positions)

    def _expand(self, tokens: np.ndarray, mask: np.ndarray, counts: list[int]):
        where = np.flatnonzero(tokens == self.image_token_id)
        if len(where) != len(counts):
            raise ImageProblem(f"the chat template rendered {len(where)} image placeholders "
                               f"for {len(counts)} images")
        repeats = np.ones(len(tokens), dtype=np.int64)
        repeats[where] = counts
        out_mask = np.repeat(mask, repeats)
        out_tokens = np.repeat(tokens, repeats)
        out_mask[out_tokens == self.image_token_id] = 0.0  # image features carry no loss
        return out_tokens.astype(np.int32), out_mask.astype(np.float32)

    def _check_expansion(self, messages: list[dict], files: list[Path], tokens: np.ndarray):
        # The processor's own expansion of a whole record must give the same
        # ids, or the template, tokenizer and processor disagree about images.
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        images = [decode_image(f.read_bytes(), self.limits) for f in files]
        out = self.processor(text=[text], images=images)
        expected = np.asarray(out["input_ids"]).reshape(-1)
        if not np.array_equal(expected.astype(np.int32), tokens):
            raise FailedPrecondition(
                message="the model's processor expands image placeholders differently from "
                "its chat template and tokenizer; cannot place image features",
                reason="PROCESSOR_TEMPLATE_MISMATCH")

    def _positions(self, tokens: np.ndarray, inputs: list[ImageInputs]) -> np.ndarray:
        """[3, T] M-RoPE position ids, from the model's own rope-index function."""
        if not inputs:
            return np.broadcast_to(np.arange(len(tokens), dtype=np.int32), (3, len(tokens))).copy()
        grids = mx.array(np.concatenate([i.grid_thw for i in inputs]))
        lm = self.model.language_model
        positions, _ = lm.get_rope_index(mx.array(tokens[None].astype(np.int64)), grids, None,
                                         None)
        return np.asarray(positions, dtype=np.int32)[:, 0, :]


def build_vlm_examples(records: Sequence[dict[str, Any]], image_files: dict[str, Path],
                       processing: VlmProcessing, cache: PixelCache, *, max_seq_length: int,
                       loss_mask: LossMaskMode = LossMaskMode.COMPLETION) -> VlmTokenized:
    """Tokenize every record; truncate only where no image is cut (an example
    whose images do not fit is dropped); drop examples without supervised tokens.

    Records the template or images refuse raise InvalidArgument naming each
    one (``records[i]``, 0-based)."""
    if max_seq_length < 2:
        raise InvalidArgument.field("config.max_seq_length", "must be at least 2")
    examples, indices, truncated, dropped = [], [], 0, 0
    keys: set[str] = set()
    violations = Violations()
    for i, record in enumerate(records):
        try:
            example = processing.example(record, image_files, cache, loss_mask)
        except (TemplateRenderError, ImageProblem) as exc:
            if len(violations.items) < 50:
                violations.add(f"records[{i}]", str(exc))
            continue
        if len(example) > max_seq_length:
            image_at = np.flatnonzero(example.tokens == processing.image_token_id)
            if len(image_at) and image_at[-1] >= max_seq_length:
                dropped += 1  # cutting through an image would orphan its features
                continue
            truncated += 1
            example = VlmExample(
                example.tokens[:max_seq_length], example.mask[:max_seq_length],
                image_keys=example.image_keys,
                positions=None if example.positions is None
                else example.positions[:, :max_seq_length])
        if example.num_supervised == 0:
            dropped += 1
            continue
        examples.append(example)
        indices.append(i)
        keys.update(example.image_keys)
    violations.raise_if_any(reason="DATASET_RECORD_REJECTED",
                            message="some records cannot be rendered with their images")
    return VlmTokenized(examples, indices, truncated, dropped, num_images=len(keys))

