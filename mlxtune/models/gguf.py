"""GGUF files (llama.cpp's format) as mlx-lm models and tokenizers, without torch.

GGUF is what most users have on disk. A file carries no config.json or tokenizer.json: its
metadata is both. We rebuild an HF-style config from it (with transformers' key table), map
llama.cpp tensor names to the names mlx-lm's model classes use (with llama.cpp's own name map),
read the tensors (see gguf_weights), undo what llama.cpp's converter changed in the weights, and
build the tokenizer with transformers' GGUF tokenizer converter. None of those pieces needs torch.

    header = read_gguf_header(path)          # config, shapes, types: no tensor data read
    model, config = load_gguf_model(path)    # an mlx-lm model, quantized modules where the file is
    tokenizer = load_gguf_tokenizer(path)    # mlx-lm TokenizerWrapper with the file's chat template
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxtune.models.gguf_file import GgufFormatError, TensorEntry, read_gguf_file
from mlxtune.models.gguf_weights import read_tensors, readable_types, unpermute_rows

if TYPE_CHECKING:  # importing mlx-lm's tokenizer module pulls in transformers: only when used
    from mlx_lm.tokenizer_utils import TokenizerWrapper

__all__ = [
    "GgufHeader",
    "UnsupportedGguf",
    "SUPPORTED_ARCHITECTURES",
    "read_gguf_header",
    "load_gguf_weights",
    "load_gguf_model",
    "load_gguf_tokenizer",
]


class UnsupportedGguf(Exception):
    """A GGUF file whose architecture, tensors or tensor types this loader cannot handle."""


@dataclass(frozen=True)
class _Architecture:
    """How one llama.cpp architecture maps onto an mlx-lm model class."""

    model_type: str  # the mlx-lm module that runs it
    permuted_qk: bool = False  # llama.cpp's converter reordered attn_q/attn_k rows
    norm_offset: float = 0.0  # llama.cpp stores these norm weights plus this offset
    config_keys: str = ""  # the transformers key table to use, if not the architecture's own


_ARCHITECTURES = {
    # Mistral and most llama-shaped models are written under "llama" by llama.cpp.
    "llama": _Architecture("llama", permuted_qk=True),
    "qwen2": _Architecture("qwen2"),
    "qwen3": _Architecture("qwen3"),
    # Gemma computes x * (1 + w); llama.cpp bakes the 1 into the stored norm weights.
    "gemma": _Architecture("gemma", norm_offset=1.0, config_keys="gemma2"),
    "phi3": _Architecture("phi3"),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_ARCHITECTURES))


@dataclass
class GgufHeader:
    path: Path
    architecture: str  # general.architecture, e.g. "llama"
    config: dict  # HF-style config that mlx-lm's model classes take
    tensor_shapes: dict[str, tuple[int, ...]]  # HF name -> logical (dequantized) shape
    tensor_types: dict[str, str]  # HF name -> GGML type name ("Q4_1", "F32", "Q6_K"...)
    metadata: dict  # GGUF key/values, less the long arrays (token lists, merges, scores)
    weight_bytes: int  # bytes of tensor data in the file
    tensors: dict[str, TensorEntry] = field(default_factory=dict, repr=False)  # HF name -> entry


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Config, tensor names, shapes and types of a GGUF file, from its header alone."""
    path = Path(path)
    try:
        file = read_gguf_file(path)
    except GgufFormatError as error:
        raise UnsupportedGguf(f"{path}: {error}") from None
    architecture_name = file.metadata.get("general.architecture", "")
    architecture = _architecture(architecture_name)
    by_gguf_name = {entry.name: entry for entry in file.tensors}
    config = _hf_config(architecture_name, architecture, file.metadata, by_gguf_name)
    tensors = {
        hf_name: by_gguf_name[gguf_name]
        for gguf_name, hf_name in _hf_names(architecture_name, config, by_gguf_name).items()
    }
    _check_types(tensors)
    return GgufHeader(
        path=path,
        architecture=architecture_name,
        config=config,
        tensor_shapes={name: entry.shape for name, entry in tensors.items()},
        tensor_types={name: entry.ggml_type.name for name, entry in tensors.items()},
        metadata=file.metadata,
        weight_bytes=sum(entry.nbytes for entry in file.tensors),
        tensors=tensors,
    )


def load_gguf_weights(
    header: GgufHeader,
    dtype: mx.Dtype | None = None,
    *,
    undo_qk_permute: bool = True,
    force_numpy: bool = False,
) -> tuple[dict[str, mx.array], dict | None]:
    """HF-named weights ready for `model.load_weights`, and the per-module quantization to apply
    first ({module path: {"group_size", "bits", "mode"}}), or None when nothing stays packed.

    Q4_0/Q4_1/Q8_0 tensors stay MLX-quantized; other quantized types are dequantized to `dtype`
    (default float16); `dtype` also casts every other float array when given. `undo_qk_permute`
    and `force_numpy` (skip mx.load) exist for tests and diagnosis: with undo_qk_permute=False a
    llama file keeps llama.cpp's q/k row order, which makes a broken model.
    """
    weights, quantization = read_tensors(header.path, header.tensors, dtype, force_numpy)
    architecture = _ARCHITECTURES[header.architecture]
    if architecture.permuted_qk and undo_qk_permute:
        weights = _unpermute_qk(weights, header)
    if architecture.norm_offset:
        for name, entry in header.tensors.items():
            if entry.name.endswith("norm.weight"):
                weights[name] = weights[name] - architecture.norm_offset
    return weights, quantization or None


def load_gguf_model(
    path: str | Path, dtype: mx.Dtype | None = None, **options
) -> tuple[nn.Module, dict]:
    """The mlx-lm model a GGUF file holds, and its config (with mlx-lm's "quantization" entry
    when modules stay packed, so the model saves and reloads like any mlx-lm checkpoint).
    `options` go to load_gguf_weights."""
    header = read_gguf_header(path)
    weights, quantization = load_gguf_weights(header, dtype, **options)
    config = dict(header.config)
    model = _build_model(config)
    if quantization:
        nn.quantize(model, class_predicate=lambda module, _: quantization.get(module, False))
        # mlx-lm reads per-module entries by path; the top-level pair is its default.
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine", **quantization}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model, config


def load_gguf_tokenizer(path: str | Path) -> TokenizerWrapper:
    """The file's tokenizer as an mlx-lm TokenizerWrapper (HF fast tokenizer inside), with its
    chat template and bos/eos/pad tokens."""
    from mlx_lm.utils import load_tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    metadata = read_gguf_file(path, keep_long_arrays=True).metadata
    # transformers' table sorts llama.cpp's tokenizer.* keys into the converter's vocabulary
    # dict and the tokenizer's init arguments.
    vocabulary = _renamed(metadata, "tokenizer.", GGUF_TOKENIZER_MAPPING["tokenizer"])
    init_kwargs = _renamed(metadata, "tokenizer.", GGUF_TOKENIZER_MAPPING["tokenizer_config"])
    if "tokens" not in vocabulary:
        raise UnsupportedGguf(f"{path}: the file has no tokenizer (tokenizer.ggml.tokens)")
    try:
        backend, extra_kwargs = convert_gguf_tokenizer(metadata["general.architecture"], vocabulary)
    except ValueError as error:
        raise UnsupportedGguf(f"{path}: {error}") from None
    if vocabulary.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS for a sentencepiece vocabulary whose file does not say otherwise.
        init_kwargs.setdefault("add_bos_token", True)
    for role in ("bos", "eos", "unk", "pad"):
        if (token_id := vocabulary.get(f"{role}_token_id")) is not None:
            init_kwargs[f"{role}_token"] = vocabulary["tokens"][token_id]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **init_kwargs, **extra_kwargs)
    # Going through a folder lets mlx-lm wrap it exactly as it wraps a downloaded model
    # (streaming detokenizer, tool-call and thinking markers inferred the same way).
    with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return load_tokenizer(Path(folder))


def _architecture(name: str) -> _Architecture:
    if name not in _ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise UnsupportedGguf(f"architecture {name!r} is not supported; supported: {supported}")
    return _ARCHITECTURES[name]


def _renamed(metadata: dict, prefix: str, renames: dict) -> dict:
    """{new name: metadata[prefix + old name]} for the renames the metadata has."""
    present = {old: new for old, new in renames.items() if new and prefix + old in metadata}
    return {new: metadata[prefix + old] for old, new in present.items()}


def _hf_config(name: str, architecture: _Architecture, metadata: dict, tensors: dict) -> dict:
    """An HF-style config from llama.cpp's `<arch>.*` keys, through transformers' key table."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    def key(suffix, default=None):
        return metadata.get(f"{name}.{suffix}", default)

    keys = GGUF_CONFIG_MAPPING[architecture.config_keys or name]
    config = {
        "model_type": architecture.model_type,
        **_renamed(metadata, f"{name}.", keys),
        **_renamed(metadata, "tokenizer.", GGUF_CONFIG_MAPPING["tokenizer"]),
    }
    required = {"hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"}
    if absent := [f"{name}.{old}" for old, new in keys.items() if new in required - set(config)]:
        raise UnsupportedGguf(f"the file's metadata lacks {absent}")
    if "token_embd.weight" not in tensors:
        raise UnsupportedGguf("the file has no token_embd.weight tensor")
    # Files often omit the vocabulary size; the embedding states it.
    config["vocab_size"] = tensors["token_embd.weight"].shape[0]
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config["head_dim"] = key("attention.key_length") or config.get("head_dim") or (
        config["hidden_size"] // config["num_attention_heads"]
    )
    config.setdefault("rope_theta", 10000.0)  # llama.cpp's default when the key is absent
    # llama.cpp writes an output matrix only when it differs from the embedding.
    config["tie_word_embeddings"] = "output.weight" not in tensors
    config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    if (rope_dims := key("rope.dimension_count")) and name == "phi3":
        config["partial_rotary_factor"] = rope_dims / config["head_dim"]
    if original_context := key("rope.scaling.original_context_length"):
        config["original_max_position_embeddings"] = original_context
    config["rope_scaling"] = _rope_scaling(key("rope.scaling.type"), key("rope.scaling.factor"))
    return config


def _rope_scaling(kind: str | None, factor: float | None) -> dict | None:
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    raise UnsupportedGguf(f"rope scaling {kind!r} is not supported (only linear)")


def _build_model(config: dict) -> nn.Module:
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def _hf_names(architecture_name: str, config: dict, tensors: dict) -> dict[str, str]:
    """{GGUF name: mlx-lm parameter name}, from llama.cpp's name map applied to the parameters of
    the mlx-lm model the config builds (unevaluated, so no memory is used)."""
    arch_ids = {arch_name: arch_id for arch_id, arch_name in gguf.MODEL_ARCH_NAMES.items()}
    name_map = gguf.get_tensor_name_map(arch_ids[architecture_name], config["num_hidden_layers"])
    parameters = [name for name, _ in tree_flatten(_build_model(config).parameters())]
    mapping, missing = {}, []
    for parameter in parameters:
        gguf_name = name_map.get_name(parameter, try_suffixes=(".weight", ".bias"))
        if gguf_name in tensors:
            mapping[gguf_name] = parameter
        else:
            missing.append(parameter)
    unplaced = sorted(set(tensors) - set(mapping))
    if missing or unplaced:
        raise UnsupportedGguf(
            f"the {architecture_name} file does not match mlx-lm's {config['model_type']} model: "
            f"tensors with no place in the model: {unplaced[:8]}; "
            f"parameters missing from the file: {missing[:8]}"
        )
    return mapping


def _check_types(tensors: dict[str, TensorEntry]) -> None:
    readable = readable_types()
    unreadable = {entry.ggml_type.name for entry in tensors.values()} - {t.name for t in readable}
    if unreadable:
        raise UnsupportedGguf(
            f"tensor types {sorted(unreadable)} are not supported; supported: "
            f"{', '.join(sorted(t.name for t in readable))}"
        )


def _unpermute_qk(weights: dict[str, mx.array], header: GgufHeader) -> dict[str, mx.array]:
    heads = {
        "attn_q": header.config["num_attention_heads"],
        "attn_k": header.config["num_key_value_heads"],
    }
    # module path -> head count, for every q/k projection (weight, scales, biases and bias alike)
    permuted = {
        name.rsplit(".", 1)[0]: heads[entry.name.split(".")[2]]
        for name, entry in header.tensors.items()
        if entry.name.startswith("blk.") and entry.name.split(".")[2] in heads
    }
    unpermuted = dict(weights)
    for name, array in weights.items():
        if (module := name.rsplit(".", 1)[0]) in permuted:
            unpermuted[name] = unpermute_rows(array, permuted[module])
    return unpermuted
