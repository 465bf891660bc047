"""The VLM forward pass for training, on mlx-vlm's modules.

mlx-vlm's ``Model.__call__`` is built for generation: it merges image
features one example at a time (LLaVA: one example per batch), computes
M-RoPE positions with Python loops on every call and caches them on the
module between calls (Qwen2-VL), so a training batch of another length
crashes. Training needs none of that: the tokens, image positions and
M-RoPE positions of every example are fixed, so the data side computes them
once (``mlxtune.vlm.data`` / ``batch``) and this module only runs the towers:

    features = vision tower + projector (per image, or from a cache)
    embeds   = where(image token, features[image_rows], embed_tokens(ids))
    hidden   = the language model's backbone(embeds, explicit positions)

Each family differs only in how its vision tower and projector are called.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxtune.errors import FailedPrecondition
from mlxtune.training.loss import _LOGIT_TRANSFORMS
from mlxtune.vlm.data import ImageInputs
from mlxtune.vlm.families import VlmFamily


def _qwen2_vl_features(model: nn.Module, images: Sequence[ImageInputs]) -> mx.array:
    tower = model.vision_tower
    pixels = mx.array(np.concatenate([i.pixel_values for i in images]))
    grid = mx.array(np.concatenate([i.grid_thw for i in images]))
    pixels = pixels.astype(tower.patch_embed.proj.weight.dtype)
    # The tower ends in the patch merger (the projector): one row per token.
    return tower(pixels, grid, output_hidden_states=False)


def _llava_features(model: nn.Module, images: Sequence[ImageInputs]) -> mx.array:
    layer = model.vision_feature_layer
    if not isinstance(layer, int):
        raise FailedPrecondition(message="LLaVA models that concatenate several vision layers "
                                 "are not supported", reason="UNSUPPORTED_ARCHITECTURE")
    embeddings = model.vision_tower.vision_model.embeddings
    pixels = mx.array(np.concatenate([i.pixel_values for i in images]))
    pixels = pixels.astype(embeddings.patch_embedding.weight.dtype)
    # mlx-vlm's CLIP/SigLIP take channels-last images and return every layer.
    *_, hidden_states = model.vision_tower(pixels.transpose(0, 2, 3, 1),
                                           output_hidden_states=True)
    selected = hidden_states[layer]
    if model.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]  # the CLS position is no image token
    features = model.multi_modal_projector(selected)
    return features.reshape(-1, features.shape[-1])


_FEATURES = {"qwen2_vl": _qwen2_vl_features, "llava": _llava_features}


def image_features(model: nn.Module, family: VlmFamily,
                   images: Sequence[ImageInputs]) -> mx.array:
    """[sum of num_tokens, hidden] features of `images`, in order."""
    features = _FEATURES[family.model_type](model, images)
    expected = sum(i.num_tokens for i in images)
    if features.shape[0] != expected:
        raise FailedPrecondition(
            message=f"the vision tower gave {features.shape[0]} feature rows for "
            f"{expected} image tokens", reason="IMAGE_FEATURES_MISMATCH")
    return features


def merged_embeddings(model: nn.Module, input_ids: mx.array, features: mx.array | None,
                      image_rows: mx.array, image_mask: mx.array) -> mx.array:
    embeds = model.language_model.model.embed_tokens(input_ids)
    if features is None or features.shape[0] == 0:
        return embeds
    placed = features.astype(embeds.dtype)[image_rows]
    return mx.where(image_mask[..., None], placed, embeds)


def language_hidden(model: nn.Module, family: VlmFamily, input_ids: mx.array,
                    embeds: mx.array, positions: mx.array | None) -> mx.array:
    """The language backbone's final hidden states [B, T, H]."""
    backbone = model.language_model.model
    if family.mrope:
        return backbone(input_ids, inputs_embeds=embeds, position_ids=positions)
    return backbone(input_ids, inputs_embeds=embeds)


def output_head(model: nn.Module):
    """hidden -> logits of the language model, checked to be a plain head."""
    language = model.language_model
    args = getattr(language, "args", None) or getattr(language, "config", None)
    if any(getattr(args, name, None) for name in _LOGIT_TRANSFORMS):
        raise FailedPrecondition(message="this model transforms its logits after the head, "
                                 "which the VLM trainer does not support yet",
                                 reason="UNSUPPORTED_ARCHITECTURE")
    if isinstance(getattr(language, "lm_head", None), nn.Module):
        return language.lm_head
    return language.model.embed_tokens.as_linear


def vlm_logits(model: nn.Module, family: VlmFamily, input_ids: mx.array,
               features: mx.array | None, image_rows: mx.array, image_mask: mx.array,
               positions: mx.array | None) -> mx.array:
    """Full logits [B, T, vocab] (validation of the forward pass, generation)."""
    embeds = merged_embeddings(model, input_ids, features, image_rows, image_mask)
    return output_head(model)(language_hidden(model, family, input_ids, embeds, positions))
