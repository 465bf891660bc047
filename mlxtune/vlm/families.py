"""The VLM families mlxtune trains, and where each keeps its towers.

A family is an mlx-vlm ``model_type``. Everything that differs between
families lives here as data: the module path of each tower, where a tower's
transformer blocks are, the config key of the image token, and whether the
language model takes 3-D multimodal rotary positions (Qwen2-VL's M-RoPE).
Nothing here imports mlx-vlm, so detecting a VLM folder costs a JSON read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mlxtune.errors import FailedPrecondition

MLX_VLM_INSTALL_HINT = "pip install --no-deps mlx-vlm==0.7.10"


class Tower(str, enum.Enum):
    """A part of a model (the proto's ModelTower); values are what manifests store."""

    LANGUAGE = "language"
    VISION = "vision"
    PROJECTOR = "projector"


@dataclass(frozen=True)
class TowerLayout:
    """Where one tower lives in the mlx-vlm model."""

    module: str  # module path prefix, e.g. "vision_tower"
    blocks: str | None = None  # path of its list of transformer blocks
    excludes: tuple[str, ...] = ()  # sub-paths that belong to another tower

    def owns(self, path: str) -> bool:
        if not (path == self.module or path.startswith(self.module + ".")):
            return False
        return not any(path == e or path.startswith(e + ".") for e in self.excludes)


@dataclass(frozen=True)
class VlmFamily:
    model_type: str
    towers: dict[Tower, TowerLayout]
    image_token_key: str  # config key holding the image token id
    mrope: bool = False  # the language model takes [3, B, T] position ids

    def tower_of(self, path: str) -> Tower | None:
        for tower, layout in self.towers.items():
            if layout.owns(path):
                return tower
        return None

    def image_token_id(self, config: dict) -> int:
        return int(config[self.image_token_key])


FAMILIES: dict[str, VlmFamily] = {
    "qwen2_vl": VlmFamily(
        model_type="qwen2_vl",
        towers={
            Tower.LANGUAGE: TowerLayout("language_model", "language_model.model.layers"),
            # Qwen2-VL's projector (the patch merger) sits inside its vision tower.
            Tower.VISION: TowerLayout("vision_tower", "vision_tower.blocks",
                                      excludes=("vision_tower.merger",)),
            Tower.PROJECTOR: TowerLayout("vision_tower.merger"),
        },
        image_token_key="image_token_id",
        mrope=True,
    ),
    "llava": VlmFamily(
        model_type="llava",
        towers={
            Tower.LANGUAGE: TowerLayout("language_model", "language_model.model.layers"),
            Tower.VISION: TowerLayout("vision_tower", "vision_tower.vision_model.encoder.layers"),
            Tower.PROJECTOR: TowerLayout("multi_modal_projector"),
        },
        image_token_key="image_token_index",
    ),
}


def vlm_family(config: dict) -> VlmFamily | None:
    """The family of a model's config.json, or None for text-only models.

    A config counts as a VLM when it has a vision config and its model_type is
    a family listed here; other multimodal configs keep the text path (mlx-lm
    loads the language part of several of them)."""
    if not isinstance(config, dict) or not config.get("vision_config"):
        return None
    return FAMILIES.get(str(config.get("model_type", "")))


def require_mlx_vlm() -> None:
    """FailedPrecondition with the install line when mlx-vlm is missing."""
    import importlib.util

    if importlib.util.find_spec("mlx_vlm") is None:
        raise FailedPrecondition(
            message=f"vision-language models need mlx-vlm: {MLX_VLM_INSTALL_HINT}",
            reason="MLX_VLM_NOT_INSTALLED")
