"""Real photos for VLM tests and benchmarks, and a small learnable image-chat task.

scikit-image ships its sample photos (astronaut, coffee, chelsea the cat…)
as plain files inside the wheel. They are read straight from the package
folder, without importing scikit-image (nor its scientific dependencies):
``pip install --no-deps scikit-image`` is enough.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# File -> what the picture shows (the answer the tiny models learn).
PHOTOS = {
    "astronaut.png": "an astronaut in a white space suit",
    "coffee.png": "a cup of coffee on a saucer",
    "chelsea.png": "a ginger cat",
    "rocket.jpg": "a rocket on the launch pad",
    "motorcycle_left.png": "a red motorcycle",
    "camera.png": "a man with a camera, in black and white",
    "hubble_deep_field.jpg": "many small galaxies in deep space",
}
QUESTIONS = ("What is in this picture?", "Describe the image.")


def answer(name: str) -> str:
    # A fixed frame around the caption: the part every answer shares is
    # learnt in a few steps, the caption only from the image.
    return f"This picture shows {PHOTOS[name]}."


def sample_photo_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RuntimeError("scikit-image is not installed (pip install --no-deps scikit-image)")
    return Path(spec.origin).parent / "data"


def sample_photos(names=None) -> dict[str, bytes]:
    """File name -> bytes of the sample photos (all of PHOTOS by default)."""
    folder = sample_photo_dir()
    return {name: (folder / name).read_bytes() for name in (names or PHOTOS)}


def caption_records(photos=None, *, with_pairs: bool = True, with_text_only: bool = True,
                    image_dir: str = "photos") -> list[dict]:
    """A chat dataset whose answers depend on the images: one record per photo
    and question, a few records with two photos, a few without any, so
    sequence lengths and image counts vary from batch to batch."""
    names = list(photos or PHOTOS)
    records = []
    for question in QUESTIONS:
        for name in names:
            records.append({"messages": [
                {"role": "user", "content": [
                    {"type": "image", "image": f"{image_dir}/{name}"},
                    {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer(name)}]})
    if with_pairs:
        for first, second in zip(names, names[1:] + names[:1], strict=True):
            # The top-level "images" form: parts without paths take them in order.
            records.append({
                "images": [f"{image_dir}/{first}", f"{image_dir}/{second}"],
                "messages": [
                    {"role": "user", "content": [
                        {"type": "image"}, {"type": "image"},
                        {"type": "text", "text": "What is in the second picture?"}]},
                    {"role": "assistant", "content": answer(second)}]})
    if with_text_only:
        for i in range(3):
            records.append({"messages": [
                {"role": "user", "content": f"Count from {i} to {i + 4}."},
                {"role": "assistant", "content": " ".join(str(i + k) for k in range(5))}]})
    return records
