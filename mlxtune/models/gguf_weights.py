"""Tensor data of a GGUF file as MLX arrays.

Q4_0, Q4_1 and Q8_0 tensors stay packed, as MLX affine quantization with group size 32
(weight + scales + biases): their blocks are exactly that format with another bit layout, so
they load small and lossless. Plain floats stay as stored. Every other quantized type is
dequantized with the `gguf` package (llama.cpp's reference dequantizers, numpy).

Two readers, chosen per file:

* `mx.load` when every tensor is a type it decodes exactly (F32, F16, Q4_0, Q4_1, Q8_0): fast
  (SmolLM2's 98 MB in ~0.2 s). It cannot read Q5_0, Q5_1, Q3_K, Q5_K or the IQ types, decodes
  Q2_K and Q4_K *wrongly* (checked against llama.cpp's reference and transformers' dequantizer)
  and reads a whole file or nothing -- so a file holding any other type goes to:
* a memory map read tensor by tensor, repacking Q4_0/Q4_1/Q8_0 blocks into MLX's layout here
  and dequantizing the rest, so a module is packed or not by its own type, never its neighbours'.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from mlxtune.models.gguf_file import TensorEntry

logger = logging.getLogger(__name__)

T = GGMLQuantizationType

# The types mx.load keeps quantized, and their bit width (group size is always 32).
MLX_QUANTIZED_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q8_0: 8}
MLX_GROUP_SIZE = 32
# The types mx.load decodes exactly.
MLX_EXACT_TYPES = {T.F32, T.F16, *MLX_QUANTIZED_BITS}
# Plain float types the numpy reader takes as they are.
_FLOAT_TYPES = {T.F32, T.F16, T.BF16}


def readable_types() -> set[GGMLQuantizationType]:
    """The types this module can read: plain floats and every type the gguf package dequantizes."""
    dequantizable = {t for t in T if isinstance(getattr(quants, t.name, None), type)}
    return _FLOAT_TYPES | dequantizable


def read_tensors(
    path: Path,
    entries: dict[str, TensorEntry],
    dtype: mx.Dtype | None = None,
    force_numpy: bool = False,
) -> tuple[dict[str, mx.array], dict[str, dict]]:
    """The tensors of `entries` (keyed by the names to give them), and the quantization of each
    module left packed: {module path: {"group_size", "bits", "mode"}}.

    `dtype` applies to every float array (dequantized weights default to float16, other floats
    keep their stored type). `force_numpy` takes the gguf-package path even where mx.load works.
    """
    if not force_numpy and all(e.ggml_type in MLX_EXACT_TYPES for e in entries.values()):
        weights = _read_with_mlx(path, entries)
    else:
        weights = _read_with_numpy(path, entries, dtype or mx.float16)
    quantization = {
        name.removesuffix(".weight"): _quantization(entry.ggml_type)
        for name, entry in entries.items()
        if entry.ggml_type in MLX_QUANTIZED_BITS
    }
    if dtype is not None:
        weights = {
            name: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a
            for name, a in weights.items()
        }
    return weights, quantization


def _quantization(ggml_type: GGMLQuantizationType) -> dict:
    bits = MLX_QUANTIZED_BITS[ggml_type]
    return {"group_size": MLX_GROUP_SIZE, "bits": bits, "mode": "affine"}


def _read_with_mlx(path: Path, entries: dict[str, TensorEntry]) -> dict[str, mx.array]:
    stored = mx.load(str(path))
    weights = {}
    for name, entry in entries.items():
        weights[name] = stored[entry.name]
        if entry.ggml_type in MLX_QUANTIZED_BITS:
            # mx.load names a packed tensor's parts after it: X.weight, X.scales, X.biases.
            stored_base, module = entry.name.removesuffix(".weight"), name.removesuffix(".weight")
            weights[f"{module}.scales"] = stored[f"{stored_base}.scales"]
            weights[f"{module}.biases"] = stored[f"{stored_base}.biases"]
    return weights


def _read_with_numpy(path: Path, entries: dict[str, TensorEntry], dequantized_dtype: mx.Dtype):
    data = np.memmap(path, dtype=np.uint8, mode="r")
    weights, dequantized = {}, set()
    for name, entry in entries.items():
        raw = data[entry.offset : entry.offset + entry.nbytes]
        if entry.ggml_type in _FLOAT_TYPES:
            weights[name] = _float_tensor(raw, entry)
        elif entry.ggml_type in MLX_QUANTIZED_BITS:
            module = name.removesuffix(".weight")
            parts = _repack_for_mlx(raw, entry)
            weights[name], weights[f"{module}.scales"], weights[f"{module}.biases"] = parts
        else:
            weights[name] = _dequantize(raw, entry).astype(dequantized_dtype)
            dequantized.add(entry.ggml_type.name)
        mx.eval(weights)  # copy out now, so one tensor at a time is in numpy form
    if dequantized:
        logger.info(
            "%s: dequantized %s tensors to %s with the gguf package",
            path.name, "/".join(sorted(dequantized)), dequantized_dtype,
        )
    del data
    return weights


def _float_tensor(raw: np.ndarray, entry: TensorEntry) -> mx.array:
    if entry.ggml_type == T.BF16:
        # numpy has no bfloat16: carry the bits over as uint16 and reinterpret them in MLX.
        return mx.array(raw.view(np.uint16).reshape(entry.shape)).view(mx.bfloat16)
    np_dtype = np.float32 if entry.ggml_type == T.F32 else np.float16
    return mx.array(raw.view(np_dtype).reshape(entry.shape))


def _dequantize(raw: np.ndarray, entry: TensorEntry) -> mx.array:
    block_size, block_bytes = GGML_QUANT_SIZES[entry.ggml_type]
    row_bytes = entry.shape[-1] // block_size * block_bytes
    rows = raw.reshape(*entry.shape[:-1], row_bytes)
    return mx.array(quants.dequantize(rows, entry.ggml_type))


def _repack_for_mlx(raw: np.ndarray, entry: TensorEntry) -> tuple[mx.array, mx.array, mx.array]:
    """Q4_0/Q4_1/Q8_0 blocks of 32 as MLX affine quantization (w = scale * u + bias, u unsigned).

    Q8_0: d, 32 x int8 q; w = d*q = d*(q+128) - 128d.   Q4_0: d, 16 bytes; w = d*(q-8).
    Q4_1: d, m, 16 bytes; w = d*q + m. A 4-bit block holds elements j and j+16 in byte j's low and
    high nibbles; MLX packs element i at bits 4*(i % 8) of word i // 8, i.e. pairs per byte.
    """
    block_bytes = GGML_QUANT_SIZES[entry.ggml_type][1]
    blocks = raw.reshape(-1, block_bytes)
    scales = blocks[:, :2].view(np.float16)
    if entry.ggml_type == T.Q8_0:
        biases = scales * np.float16(-128)
        codes = blocks[:, 2:] ^ 0x80  # int8 -> int8 + 128 as uint8: flip the sign bit
    else:
        if entry.ggml_type == T.Q4_0:
            biases, nibbles = scales * np.float16(-8), blocks[:, 2:]
        else:
            biases, nibbles = blocks[:, 2:4].view(np.float16), blocks[:, 4:]
        values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)  # elements 0..31 in order
        codes = values[:, 0::2] | (values[:, 1::2] << 4)
    rows = entry.shape[:-1]
    weight = np.ascontiguousarray(codes).view(np.uint32)
    return tuple(mx.array(part.reshape(*rows, -1)) for part in (weight, scales, biases))


def unpermute_rows(array: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's converter `permute` of attn_q/attn_k rows.

    llama.cpp's rotary embedding pairs adjacent dimensions (2j, 2j+1) where Hugging Face's pairs
    (j, j + d/2), so its converter reorders each head's rows from (half, j) to (j, half). Only
    output rows move, so packed weights, scales, biases and 1-D biases all take the same inverse.
    """
    rows = array.shape[0]
    head_dim = rows // n_heads
    grouped = array.reshape(n_heads, head_dim // 2, 2, *array.shape[1:])
    return grouped.swapaxes(1, 2).reshape(array.shape)
