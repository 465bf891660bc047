"""Write small randomly initialised models to disk, in the layouts users have.

No model hub is needed: the tests, benchmarks and examples build Hugging Face
folders (config.json + model.safetensors + tokenizer files) of several
architectures from configs, exactly as a downloaded model would look, and can
quantize them into MLX-quantized folders. The weights come from mlx-lm's own
model classes, so their names and shapes are the ones real checkpoints use.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxtune.testing.tokenizer import write_tokenizer

# Hugging Face architectures and model-specific config keys per family.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def tiny_config(
    model_type: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    tie_word_embeddings: bool | None = None,
) -> dict:
    """An HF-style config of a small model of the given family."""
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(_ARCHITECTURES)}")
    config = {
        "model_type": model_type,
        "architectures": [_ARCHITECTURES[model_type]],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size or hidden_size * 3,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if model_type == "gemma":
        config["head_dim"] = hidden_size // num_heads
        config["hidden_act"] = "gelu_pytorch_tanh"
        config["hidden_activation"] = "gelu_pytorch_tanh"
        config["tie_word_embeddings"] = True
    elif model_type == "phi3":
        config["tie_word_embeddings"] = False
        config["rope_scaling"] = None
        config["original_max_position_embeddings"] = 2048
        config["pad_token_id"] = 0
    elif model_type == "qwen2":
        config["tie_word_embeddings"] = True
        config["use_sliding_window"] = False
    else:
        config["tie_word_embeddings"] = False
    if tie_word_embeddings is not None:
        config["tie_word_embeddings"] = tie_word_embeddings
    return config


def random_weights(config: dict, seed: int = 0, dtype=mx.float32) -> dict[str, mx.array]:
    """Weights of the config's mlx-lm model class, randomly initialised."""
    from mlx_lm.utils import _get_classes

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    # Small weights keep activations tame in deep random stacks.
    out = {}
    for name, w in weights.items():
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("_norm.weight"):
            out[name] = w.astype(dtype)
        else:
            out[name] = (mx.random.normal(w.shape) * 0.02).astype(dtype)
    mx.eval(out)
    return out


def write_hf_model(
    path: str | Path,
    config: dict,
    *,
    seed: int = 0,
    dtype=mx.float32,
    shards: int = 1,
) -> Path:
    """Write an HF folder: config.json, model*.safetensors and a tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = random_weights(config, seed=seed, dtype=dtype)
    config = dict(config, torch_dtype=str(dtype).split(".")[-1])
    (path / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(weights)
    if shards <= 1:
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    else:
        index = {"metadata": {}, "weight_map": {}}
        per = -(-len(names) // shards)
        for i in range(shards):
            part = names[i * per : (i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            mx.save_safetensors(str(path / fname), {k: weights[k] for k in part},
                                metadata={"format": "pt"})
            index["weight_map"].update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_tokenizer(path, vocab_size=config["vocab_size"])
    return path


def write_mlx_quantized_model(hf_path: str | Path, out_path: str | Path,
                              bits: int = 4, group_size: int = 32) -> Path:
    """Quantize an HF folder into an MLX-quantized folder with mlx-lm's converter."""
    from mlx_lm.convert import convert

    out_path = Path(out_path)
    convert(str(hf_path), mlx_path=str(out_path), quantize=True, q_bits=bits,
            q_group_size=group_size)
    return out_path
