"""The VLM path in process: data, batching, the forward pass, the loss.

Real photos (scikit-image's sample files) through each tiny VLM family's real
processor; mlx-vlm's own model call is the oracle for the forward pass where
it works (one example), and shown to fail where ours must not (batches of
varying shape).
"""

from __future__ import annotations

import io

import mlx.core as mx
import numpy as np
import pytest
from vlm_fixtures import FAMILIES, write_vlm_models

from mlxtune.data.tokenize import LossMaskMode
from mlxtune.testing.sample_images import caption_records, sample_photos
from mlxtune.vlm.batch import collate_vlm
from mlxtune.vlm.data import PixelCache, VlmProcessing, build_vlm_examples
from mlxtune.vlm.forward import image_features, vlm_logits
from mlxtune.vlm.images import ImageLimits, ImageProblem, decode_image, normalize_record


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return write_vlm_models(tmp_path_factory.mktemp("vlms"))


@pytest.fixture(scope="module")
def stored_photos(tmp_path_factory):
    """Upload path -> file named by its digest, as the dataset store keeps them."""
    import hashlib

    folder = tmp_path_factory.mktemp("images")
    files = {}
    for name, data in sample_photos().items():
        path = folder / hashlib.sha256(data).hexdigest()
        path.write_bytes(data)
        files[f"photos/{name}"] = path
    return files


class Loaded:
    def __init__(self, vlm_dir, family, stored_photos):
        from mlxtune.vlm.families import vlm_family
        from mlxtune.vlm.models import load_vlm

        self.model, self.processor, self.config = load_vlm(vlm_dir / f"tiny-{family}", "float32")
        self.family = vlm_family(self.config)
        self.processing = VlmProcessing(self.processor, self.family, self.config, self.model)
        by_key = {p.name: p for p in stored_photos.values()}
        self.cache = PixelCache(lambda key: self.processing.image_inputs(by_key[key]))
        self.data = build_vlm_examples(caption_records(), stored_photos, self.processing,
                                       self.cache, max_seq_length=512)

    def batch(self, examples):
        return collate_vlm(examples, self.processing.image_token_id)

    def logits(self, batch):
        keys = batch.image_keys
        features = image_features(self.model, self.family, [self.cache.get(k) for k in keys]) \
            if keys else None
        positions = mx.array(batch.positions) if batch.positions is not None else None
        return vlm_logits(self.model, self.family, mx.array(batch.tokens), features,
                          mx.array(batch.image_rows), mx.array(batch.image_mask), positions)


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, vlm_dir, stored_photos):
    return Loaded(vlm_dir, request.param, stored_photos)


def test_examples_mask_assistant_turns_and_never_image_tokens(loaded):
    data = loaded.data
    records = caption_records()
    assert len(data.examples) == len(records) and data.dropped == 0
    assert data.num_images == len(sample_photos())
    image_id = loaded.processing.image_token_id
    tokenizer = loaded.processing.tokenizer
    for example, index in zip(data.examples, data.record_indices, strict=True):
        record = records[index]
        is_image = example.tokens == image_id
        assert not example.mask[is_image].any()
        supervised = tokenizer.decode(example.tokens[example.mask > 0].tolist())
        answer = record["messages"][-1]["content"]
        assert supervised.startswith(answer) and "user" not in supervised
        _, paths = normalize_record(record)
        per_image = [loaded.cache.get(k).num_tokens for k in example.image_keys]
        assert len(example.image_keys) == len(paths) and is_image.sum() == sum(per_image)


def test_forward_equals_mlx_vlm_on_one_example(loaded):
    """Our batched forward pass against mlx-vlm's own call, where that works."""
    example = next(e for e in loaded.data.examples if len(e.image_keys) == 1)
    batch = collate_vlm([example], loaded.processing.image_token_id, pad_to_multiple_of=1)
    inputs = [loaded.cache.get(k) for k in example.image_keys]
    extra = {"image_grid_thw": mx.array(inputs[0].grid_thw)} if loaded.family.mrope else {}
    theirs = loaded.model(mx.array(batch.tokens), mx.array(inputs[0].pixel_values), mask=None,
                          **extra)
    ours = loaded.logits(batch)
    assert float(mx.abs(ours - theirs.logits).max()) < 1e-4


def test_batches_of_any_shape_give_each_example_its_own_logits(loaded):
    """Padding and batch-mates never change an example's logits, for batches of
    every size and width in a row, mixing one, two and no images."""
    examples = loaded.data.examples
    groups = [examples[0:3], examples[14:17], examples[-3:], examples[5:6], examples[13:15]]
    singles = {}
    for group in groups:
        logits = loaded.logits(loaded.batch(group))
        for row, example in enumerate(group):
            key = id(example)
            if key not in singles:
                singles[key] = loaded.logits(loaded.batch([example]))[0, : len(example)]
            got = logits[row, : len(example)]
            assert float(mx.abs(got - singles[key]).max()) < 1e-4


def test_mlx_vlm_own_call_crashes_on_text_batches_of_another_shape(vlm_dir):
    """Why our forward passes positions explicitly: mlx-vlm's Qwen2-VL caches
    the position ids of its first call and reuses them for the next batch."""
    from mlx_vlm.utils import load_model

    model = load_model(vlm_dir / "tiny-qwen2_vl")
    model(mx.array(np.arange(1, 9)[None].repeat(2, 0)))
    with pytest.raises(ValueError, match="broadcast"):
        model(mx.array(np.arange(1, 13)[None].repeat(2, 0)))


def test_pixels_and_frozen_image_features_are_computed_once_per_image(loaded):
    from mlxtune.adapters.config import AdapterConfig
    from mlxtune.data.batching import BatchPlan
    from mlxtune.training.config import TrainingConfig
    from mlxtune.training.loop import Trainer
    from mlxtune.vlm.families import Tower
    from mlxtune.vlm.loss import VlmLoss
    from mlxtune.vlm.models import get_vlm_peft_model

    assert loaded.cache.computed == len(sample_photos())  # while building the examples
    get_vlm_peft_model(loaded.model, loaded.family,
                       AdapterConfig(rank=4).with_defaults(2), (Tower.LANGUAGE,))
    loss = VlmLoss(loaded.model, loaded.family, loaded.cache)
    assert loss.cache_features
    examples = loaded.data.examples
    plan = BatchPlan([len(e) for e in examples], 4)
    trainer = Trainer(loaded.model, TrainingConfig.from_dict(
        {"max_steps": 2 * plan.batches_per_epoch, "batch_size": 4, "learning_rate": 1e-3}),
        lambda i: loaded.batch([examples[j] for j in plan.batch_indices(i)]),
        batches_per_epoch=plan.batches_per_epoch, loss=loss)
    result = trainer.run()  # two epochs
    assert result.step == 2 * plan.batches_per_epoch and np.isfinite(result.loss)
    assert loss.feature_computations == len(sample_photos())
    assert loaded.cache.computed == len(sample_photos())


def test_image_parts_and_top_level_images():
    record = {"images": ["a.png", "b.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"},
                                     {"type": "image"}]},
        {"role": "assistant", "content": "y"}]}
    messages, paths = normalize_record(record)
    assert paths == ["a.png", "b.png"]
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "x"},
                                      {"type": "image"}]
    # Only a top-level list: the images open the first user turn.
    messages, paths = normalize_record({"images": ["a.png"], "messages": [
        {"role": "user", "content": "what?"}, {"role": "assistant", "content": "y"}]})
    assert paths == ["a.png"] and messages[0]["content"][0] == {"type": "image"}
    for bad in ({"images": ["../etc/passwd"], "messages": [{"role": "user", "content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image"}]}]}):
        with pytest.raises(ImageProblem):
            normalize_record(bad)


def test_decoding_rotates_by_exif_converts_to_rgb_and_bounds_size():
    from PIL import Image

    photos = sample_photos(["chelsea.png", "camera.png"])
    cat = Image.open(io.BytesIO(photos["chelsea.png"]))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to view
    buffer = io.BytesIO()
    cat.save(buffer, "JPEG", exif=exif)
    upright = decode_image(buffer.getvalue())
    assert upright.size == (cat.height, cat.width) and upright.mode == "RGB"
    gray = decode_image(photos["camera.png"])
    assert Image.open(io.BytesIO(photos["camera.png"])).mode == "L" and gray.mode == "RGB"
    with pytest.raises(ImageProblem, match="bytes"):
        decode_image(photos["camera.png"], ImageLimits(max_bytes=1000))
    with pytest.raises(ImageProblem, match="pixels"):
        decode_image(photos["camera.png"], ImageLimits(max_pixels=512 * 511))
    with pytest.raises(ImageProblem, match="cannot be decoded|not an image"):
        decode_image(photos["camera.png"][: len(photos["camera.png"]) // 2])


def test_loss_mask_all_tokens_still_skips_image_tokens(loaded, stored_photos):
    example = loaded.processing.example(caption_records()[0], stored_photos, loaded.cache,
                                        LossMaskMode.ALL_TOKENS)
    is_image = example.tokens == loaded.processing.image_token_id
    assert is_image.any() and not example.mask[is_image].any()
    assert example.mask[~is_image][1:].all()


NO_TORCH = '''
import importlib.machinery, sys
class NoTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            return None
        return super().find_spec(name, path, target)
sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from pathlib import Path
from mlxtune.vlm.data import VlmProcessing
from mlxtune.vlm.families import vlm_family
from mlxtune.vlm.models import load_vlm
for folder, image in zip(sys.argv[1::2], sys.argv[2::2]):
    model, processor, config = load_vlm(Path(folder), "float32")
    inputs = VlmProcessing(processor, vlm_family(config), config, model).image_inputs(Path(image))
    assert inputs.num_tokens > 0
assert "torch" not in sys.modules
print("ok")
'''


def test_the_vlm_path_needs_no_torch(vlm_dir, stored_photos):
    """PyTorch is a test oracle here; loading, processors and images run without it."""
    import subprocess
    import sys

    image = str(stored_photos["photos/coffee.png"])
    args = [a for family in FAMILIES for a in (str(vlm_dir / f"tiny-{family}"), image)]
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
