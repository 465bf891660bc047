"""Write small randomly initialised vision-language models to disk as HF folders.

No VLM weights exist offline, so tests and benchmarks build tiny ones from
configs, as mlx-vlm's own tests do: the model comes from mlx-vlm's model class
for the family (so every tensor name and shape is the one real checkpoints
use), its weights are renamed back to the Hugging Face checkpoint layout
(``visual.*``/``model.*`` for Qwen2-VL, PyTorch's conv weight order) and
written with config.json, a tokenizer that holds the family's image tokens, a
chat template that renders image parts, and the image processor's files. The
normal loaders (mlx-vlm, transformers) read the folder like a downloaded one.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxtune.testing.tokenizer import build_tokenizer

VLM_FAMILIES = ("qwen2_vl", "llava")
_BASE_VOCAB = 512
# Vocabulary rows in the model: the BPE tokens plus the added image tokens,
# rounded up as real models round theirs.
_VOCAB_SIZE = 528

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The chat template renders an image part as the family's image placeholder;
# the processor expands each placeholder to the image's feature tokens.
_PART_LOOP = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
)


def _template(image_markup: str) -> str:
    loop = _PART_LOOP.replace("IMAGE", image_markup)
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}" + loop + "{{ '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


_FAMILY_TOKENS = {
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llava": ["<image>"],
}
_FAMILY_TEMPLATES = {
    "qwen2_vl": _template("<|vision_start|><|image_pad|><|vision_end|>"),
    "llava": _template("<image>\n"),
}


def tiny_vlm_config(family: str, token_ids: dict[str, int], *, hidden_size: int = 64,
                    num_layers: int = 2, vision_layers: int = 2) -> dict:
    """An HF config.json of a small model of `family`, image token ids filled in."""
    text = {
        "hidden_size": hidden_size, "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "vocab_size": _VOCAB_SIZE, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": token_ids["<|im_start|>"],
        "eos_token_id": token_ids["<|im_end|>"], "torch_dtype": "float32",
    }
    if family == "qwen2_vl":
        head_dim = hidden_size // 4
        # Qwen2-VL's hub configs keep the text settings at the top level.
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            **text, "tie_word_embeddings": True, "use_sliding_window": False,
            "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(head_dim)},
            "vision_start_token_id": token_ids["<|vision_start|>"],
            "vision_end_token_id": token_ids["<|vision_end|>"],
            "image_token_id": token_ids["<|image_pad|>"],
            "video_token_id": token_ids["<|video_pad|>"],
            "vision_config": {
                "depth": vision_layers, "embed_dim": 32, "hidden_size": hidden_size,
                "hidden_act": "quick_gelu", "mlp_ratio": 2, "num_heads": 2, "in_channels": 3,
                "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                "temporal_patch_size": 2, "model_type": "qwen2_vl",
            },
        }
    if family == "llava":
        return {
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": token_ids["<image>"], "projector_hidden_act": "gelu",
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
            "vocab_size": _VOCAB_SIZE, "tie_word_embeddings": False, "torch_dtype": "float32",
            "text_config": {**text, "model_type": "llama", "tie_word_embeddings": False},
            "vision_config": {
                "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": vision_layers, "num_attention_heads": 2, "image_size": 56,
                "patch_size": 14, "projection_dim": 32, "layer_norm_eps": 1e-5,
                "hidden_act": "quick_gelu", "num_channels": 3,
            },
        }
    raise ValueError(f"unknown VLM family {family!r}; known: {', '.join(VLM_FAMILIES)}")


def _mrope_section(head_dim: int) -> list[int]:
    # Temporal, height and width shares of the rotary half-dimension (Qwen2-VL
    # uses 16/24/24 of 64); they must add up to head_dim / 2.
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _preprocessor_files(family: str) -> dict[str, dict]:
    if family == "qwen2_vl":
        image = {
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
            "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "rescale_factor": 1 / 255, "resample": 3, "image_mean": _CLIP_MEAN,
            "image_std": _CLIP_STD, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            # 56x56 to 112x112 pixels: 4 to 16 image tokens per image.
            "min_pixels": 56 * 56, "max_pixels": 112 * 112,
        }
        video = {**image, "image_processor_type": None,
                 "video_processor_type": "Qwen2VLVideoProcessor"}
        return {"preprocessor_config.json": image, "video_preprocessor_config.json": video,
                "processor_config.json": {"processor_class": "Qwen2VLProcessor"}}
    image = {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
        "do_resize": True, "size": {"shortest_edge": 56}, "do_center_crop": True,
        "crop_size": {"height": 56, "width": 56}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
        "do_convert_rgb": True, "resample": 3,
    }
    processor = {"processor_class": "LlavaProcessor", "patch_size": 14,
                 "vision_feature_select_strategy": "default", "image_token": "<image>",
                 "num_additional_image_tokens": 1}
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def write_vlm_tokenizer(path: Path, family: str) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json with the family's image tokens;
    returns the special tokens' ids."""
    from tokenizers import AddedToken

    tokenizer = build_tokenizer(_BASE_VOCAB)
    extra = _FAMILY_TOKENS[family]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    tokenizer.save(str(path / "tokenizer.json"))
    template = _FAMILY_TEMPLATES[family]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": template, "model_max_length": 2048,
        "extra_special_tokens": {"image_token": "<image>"} if family == "llava" else {},
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # Processors of VLM checkpoints read their template from chat_template.json.
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    ids = {t: tokenizer.token_to_id(t) for t in ["<|im_start|>", "<|im_end|>", *extra]}
    if max(ids.values()) >= _VOCAB_SIZE:
        raise ValueError(f"tokenizer ids {ids} exceed the vocabulary of {_VOCAB_SIZE}")
    return ids


def build_vlm(config: dict):
    """mlx-vlm's model for `config`, freshly initialised (weights in memory)."""
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    config = json.loads(json.dumps(config))  # from_dict mutates what it is given
    model_class, _ = get_model_and_args(config=config)
    model_config = model_class.ModelConfig.from_dict(config)
    model_config = update_module_configs(model_config, model_class, config,
                                         ["text", "vision", "projector"])
    return model_class.Model(model_config)


def random_vlm_weights(config: dict, seed: int = 0) -> dict[str, mx.array]:
    """MLX-named weights of the config's model, small random values."""
    mx.random.seed(seed)
    model = build_vlm(config)
    out = {}
    for name, w in tree_flatten(model.parameters()):
        leaf = name.rsplit(".", 1)[0]
        if "norm" in leaf or leaf.endswith(("ln_q", "layrnorm")):
            out[name] = w.astype(mx.float32)  # norms keep their identity init
        else:
            out[name] = (mx.random.normal(w.shape) * 0.02).astype(mx.float32)
    mx.eval(out)
    return out


def to_hf_names(family: str, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """MLX (sanitized) names and layouts back to the HF checkpoint's."""
    out = {}
    for name, w in weights.items():
        if family == "qwen2_vl":
            if name.startswith("vision_tower."):
                name = "visual." + name[len("vision_tower."):]
            elif name.startswith("language_model."):
                name = name[len("language_model."):]
            if name.endswith("patch_embed.proj.weight"):
                w = w.transpose(0, 4, 1, 2, 3)  # [O, T, P, P, C] -> PyTorch's [O, C, T, P, P]
        elif name.endswith("patch_embedding.weight"):
            w = w.transpose(0, 3, 1, 2)  # [O, kH, kW, C] -> PyTorch's [O, C, kH, kW]
        out[name] = w
    return out


def write_vlm(path: str | Path, family: str, *, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny `family` VLM as an HF folder; returns the folder."""
    if family not in VLM_FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}; known: {', '.join(VLM_FAMILIES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    token_ids = write_vlm_tokenizer(path, family)
    config = tiny_vlm_config(family, token_ids, **config_overrides)
    weights = to_hf_names(family, random_vlm_weights(config, seed))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    for name, content in _preprocessor_files(family).items():
        (path / name).write_text(json.dumps(content, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": token_ids["<|im_start|>"], "eos_token_id": token_ids["<|im_end|>"]}))
    return path
