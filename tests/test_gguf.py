"""GGUF loading: the real SmolLM2 file, and GGUFs written here the way llama.cpp's converter does.

The oracle is the model itself: on English prose SmolLM2 must predict the next token well (mean
loss ~3) and shuffled tokens badly (~7-8); leaving llama.cpp's q/k row order in place must hurt.
Files written here check what the real file cannot: each supported architecture, K-quants,
declared-but-unread data, and files we must refuse.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mlxtune.models.gguf import (
    UnsupportedGguf,
    load_gguf_model,
    load_gguf_tokenizer,
    load_gguf_weights,
    read_gguf_header,
)
from mlxtune.testing.random_models import random_weights, tiny_config

REPO = Path(__file__).resolve().parents[1]

# Public domain: Charles Darwin, On the Origin of Species (1859), chapter I.
PROSE = (
    "When we look to the individuals of the same variety or sub-variety of our older cultivated "
    "plants and animals, one of the first points which strikes us, is, that they generally differ "
    "much more from each other, than do the individuals of any one species or variety in a state "
    "of nature. When we reflect on the vast diversity of the plants and animals which have been "
    "cultivated, and which have varied during all ages under the most different climates and "
    "treatment, I think we are driven to conclude that this greater variability is simply due to "
    "our domestic productions having been raised under conditions of life not so uniform as, and "
    "somewhat different from, those to which the parent-species have been exposed in a state of "
    "nature."
)


# --- writing GGUFs as llama.cpp's converter does ------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter `permute` of q/k rows (its formula)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(arch: str, config: dict, hf_name: str) -> str:
    arch_id = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name_map = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def to_gguf_layout(arch: str, config: dict, weights: dict) -> dict[str, np.ndarray]:
    """HF-named float weights -> GGUF-named float32 arrays with llama.cpp's edits applied."""
    out = {}
    for name, value in weights.items():
        array = np.array(value.astype(mx.float32))
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, config["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, config["num_key_value_heads"])
        if arch == "gemma" and name.endswith("norm.weight"):
            array = array + 1.0  # llama.cpp stores Gemma's (1 + w)
        out[gguf_name(arch, config, name)] = array
    return out


def write_gguf(path: Path, arch: str, config: dict, tensors: dict, types=None) -> Path:
    """Write `config` as llama.cpp metadata and `tensors` ({GGUF name: float array stored as
    types.get(name, F32), or (uint8 blocks, type) stored as is})."""
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    for name, value in tensors.items():
        if isinstance(value, tuple):  # raw blocks
            writer.add_tensor(name, value[0], raw_dtype=value[1])
            continue
        ggml_type = (types or {}).get(name, T.F32)
        writer.add_tensor(name, gguf.quants.quantize(value, ggml_type), raw_dtype=ggml_type)
    finish(writer)
    return path


def finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Byte offsets of the float16 super-block scales (d, dmin) in each K-quant block.
K_SCALE_OFFSETS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_k_blocks(rng, ggml_type, shape, scale: float) -> np.ndarray:
    """Valid K-quant data (any bits decode) with small super-block scales."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (shape[0], shape[1] // block_size, block_bytes), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS[ggml_type]:
        blocks[..., offset : offset + 2] = np.array([scale], np.float16).view(np.uint8)
    return blocks.reshape(shape[0], -1)


def reference_logits(config: dict, weights: dict, tokens) -> np.ndarray:
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.load_weights(list(weights.items()), strict=True)
    return np.array(model(mx.array(tokens)[None]))


TOKENS = [1, 5, 9, 42, 7, 300, 11, 2, 64, 128, 3, 77]


# --- the real SmolLM2 file ----------------------------------------------------------------------


def test_header_of_smollm2(smollm2):
    read_gguf_header(smollm2)  # first call pays the imports
    start = time.perf_counter()
    header = read_gguf_header(smollm2)
    elapsed = time.perf_counter() - start

    assert header.architecture == "llama"
    config = header.config
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (
        30, 576, 1536,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["head_dim"], config["vocab_size"], config["tie_word_embeddings"]) == (
        64, 49152, True,
    )
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == pytest.approx(1e-5)
    assert header.tensor_shapes["model.embed_tokens.weight"] == (49152, 576)
    assert header.tensor_shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert header.tensor_types["model.embed_tokens.weight"] == "Q8_0"
    assert header.tensor_types["model.layers.29.mlp.down_proj.weight"] == "Q4_1"
    assert header.tensor_types["model.norm.weight"] == "F32"
    assert len(header.tensor_shapes) == 272
    assert 90e6 < header.weight_bytes < os.path.getsize(smollm2)
    assert "tokenizer.chat_template" in header.metadata
    assert "tokenizer.ggml.tokens" not in header.metadata  # long arrays stay out of the header
    assert elapsed < 1.0, f"header read took {elapsed:.2f}s"


def test_header_reads_no_tensor_data(tmp_path):
    """A file declaring 16 GiB of tensors, all a hole on disk, reads as fast as a small one."""
    config = tiny_config("llama", hidden_size=2048, num_layers=1, num_heads=16, num_kv_heads=4,
                         intermediate_size=64, vocab_size=1 << 20)
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))  # unevaluated: no memory
    shapes = {name: value.shape for name, value in tree_flatten(model.parameters())}
    path = tmp_path / "huge.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(2048)
    writer.add_feed_forward_length(64)
    writer.add_head_count(16)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    data_bytes = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        name = gguf_name("llama", config, name)
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        data_bytes += gguf.GGUFWriter.ggml_pad(nbytes, 32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    os.truncate(path, gguf.GGUFWriter.ggml_pad(path.stat().st_size, 32) + data_bytes)  # sparse

    start = time.perf_counter()
    header = read_gguf_header(path)
    elapsed = time.perf_counter() - start
    assert header.weight_bytes > 16 * 2**30
    assert header.tensor_shapes["model.embed_tokens.weight"] == (1 << 20, 2048)
    assert header.tensor_shapes["lm_head.weight"] == (1 << 20, 2048)
    assert header.tensor_types["lm_head.weight"] == "F32"
    assert header.config["tie_word_embeddings"] is False
    assert elapsed < 1.0, f"header read took {elapsed:.2f}s"


def test_numpy_repack_is_bit_identical_to_mx_load(smollm2):
    """Q4_1/Q8_0 blocks repacked here equal mx.load's packing, so mixed files keep them packed."""
    header = read_gguf_header(smollm2)
    native, native_quantization = load_gguf_weights(header)
    repacked, repacked_quantization = load_gguf_weights(header, force_numpy=True)
    assert native_quantization == repacked_quantization
    q8, q4 = ({"group_size": 32, "bits": bits, "mode": "affine"} for bits in (8, 4))
    assert native_quantization["model.embed_tokens"] == q8
    assert native_quantization["model.layers.0.mlp.up_proj"] == q4
    assert set(native) == set(repacked)
    for name, array in native.items():
        assert array.dtype == repacked[name].dtype and array.shape == repacked[name].shape, name
        assert mx.array_equal(array, repacked[name]).item(), name


def test_q4_0_repack_matches_reference_dequantizer(tmp_path):
    rng = np.random.default_rng(0)
    source = rng.standard_normal((8, 64)).astype(np.float32)
    path = tmp_path / "q4_0.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w.weight", gguf.quants.quantize(source, T.Q4_0), raw_dtype=T.Q4_0)
    finish(writer)
    from mlxtune.models.gguf_file import read_gguf_file
    from mlxtune.models.gguf_weights import read_tensors

    entries = {"w.weight": read_gguf_file(path).tensors[0]}
    for force_numpy in (False, True):
        weights, quantization = read_tensors(path, entries, force_numpy=force_numpy)
        assert quantization == {"w": {"group_size": 32, "bits": 4, "mode": "affine"}}
        # In float32 the affine form d*u - 8d is exact, so it must equal llama.cpp's d*(q-8).
        scales, biases = (weights[f"w.{part}"].astype(mx.float32) for part in ("scales", "biases"))
        values = mx.dequantize(weights["w.weight"], scales, biases, 32, 4)
        reference = gguf.quants.dequantize(gguf.quants.quantize(source, T.Q4_0), T.Q4_0)
        np.testing.assert_array_equal(np.array(values), reference)


def test_tokenizer_of_smollm2(smollm2):
    tokenizer = load_gguf_tokenizer(smollm2)
    # The ids transformers' own GGUF tokenizer loader gives for this text.
    expected_ids = [19556, 905, 17, 657, 506, 253, 4979, 1194, 30]
    assert tokenizer.encode("Hello world! It's a fine day.") == expected_ids
    text = "Ünïcödé — naïve café\n\tdone <|im_end|> 12345"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.encode("<|im_end|>") == [2]
    assert 2 in tokenizer.eos_token_ids
    assert tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.has_chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


ORACLE = """
import json, sys, time
sys.modules["torch"] = None  # as where torch is not installed: the runtime must not need it
from mlxtune import blas
blas.activate()  # before mlx: float32 matmuls on OpenBLAS
import mlx.core as mx, mlx.nn as nn, numpy as np
from mlx_lm.utils import dequantize_model
from mlxtune.models.gguf import load_gguf_model, load_gguf_tokenizer

path, text = sys.argv[1], sys.argv[2]
tokens = load_gguf_tokenizer(path).encode(text)
head = 64  # shuffled tokens are scored on fewer: their loss is far off anyway

def token_losses(model, ids):
    x = mx.array(ids)[None]
    return nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:])[0]

start = time.perf_counter()
model, _ = load_gguf_model(path, dtype=mx.float32)
result = {"tokens": len(tokens), "load_s": time.perf_counter() - start}
prefix = mx.array(tokens[:4])[None]
packed_logits = model(prefix)
# Same values as float32 matrices: packed kernels are too slow on a CPU for a whole paragraph.
dequantize_model(model)
result["dequantize_max_diff"] = mx.abs(model(prefix) - packed_logits).max().item()
losses = token_losses(model, tokens)
result["loss"] = losses.mean().item()
shuffled = np.random.default_rng(0).permutation(tokens)[:head].tolist()
result["shuffled"] = token_losses(model, shuffled).mean().item()
broken, _ = load_gguf_model(path, dtype=mx.float32, undo_qk_permute=False)
result["loss_without_unpermute"] = token_losses(dequantize_model(broken), tokens).mean().item()
result["torch_imported"] = sys.modules.get("torch") is not None
print(json.dumps(result))
"""


@pytest.mark.slow
def test_smollm2_predicts_english_without_torch(smollm2):
    child = subprocess.run(
        [sys.executable, "-c", ORACLE, str(smollm2), PROSE],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        # One BLAS thread: on a shared 2-core box two spinning threads ran this 5x slower.
        env=dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1"),
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(result)
    assert not result["torch_imported"]
    assert result["tokens"] > 100
    assert result["dequantize_max_diff"] < 1e-2
    assert result["loss"] < 4.0  # measured 3.12
    assert result["shuffled"] > result["loss"] + 3.0  # measured 8.0
    assert result["loss_without_unpermute"] > result["loss"] + 1.0  # measured 4.56


# --- files written here -------------------------------------------------------------------------


def tiny_family_config(model_type: str) -> dict:
    if model_type == "qwen3":  # not among random_models' families: qwen2's shape plus q/k norms
        return dict(tiny_config("qwen2"), model_type="qwen3", head_dim=16)
    return tiny_config(model_type)


# (mlx-lm model type written, GGUF architecture llama.cpp writes it under)
FAMILIES = [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"),
            ("gemma", "gemma"), ("phi3", "phi3")]


@pytest.mark.parametrize(("model_type", "arch"), FAMILIES)
def test_round_trip_matches_mlx_lm_model(tmp_path, model_type, arch):
    config = tiny_family_config(model_type)
    weights = random_weights(config, seed=3)
    tensors = to_gguf_layout(arch, config, weights)
    path = write_gguf(tmp_path / f"{model_type}.gguf", arch, config, tensors)

    model, loaded_config = load_gguf_model(path, dtype=mx.float32)
    assert loaded_config["model_type"] == arch and "quantization" not in loaded_config
    expected = reference_logits(config, weights, TOKENS)
    got = np.array(model(mx.array(TOKENS)[None]))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    if arch == "llama":
        unpermuted, _ = load_gguf_model(path, dtype=mx.float32, undo_qk_permute=False)
        wrong = np.array(unpermuted(mx.array(TOKENS)[None]))
        assert np.abs(wrong - expected).max() > 100 * np.abs(got - expected).max() + 1e-3


def test_k_quant_file_loads_and_matches_source(tmp_path):
    """Q4_K/Q5_K/Q6_K tensors (mx.load rejects the file), packed Q8_0 q/k rows, F16, BF16, F32."""
    config = tiny_config("llama", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=512, vocab_size=512)
    source = random_weights(config, seed=4)
    tensors = to_gguf_layout("llama", config, source)
    rng = np.random.default_rng(4)
    k_types = {"attn_output": (T.Q6_K, 2e-5), "ffn_gate": (T.Q4_K, 4e-5), "ffn_up": (T.Q5_K, 3e-5)}
    types = {}
    for name, array in tensors.items():
        kind = name.split(".")[-2]
        if kind in k_types:
            ggml_type, scale = k_types[kind]
            tensors[name] = (random_k_blocks(rng, ggml_type, array.shape, scale), ggml_type)
        elif kind in ("attn_q", "attn_k", "token_embd"):
            types[name] = T.Q8_0
        elif kind in ("attn_v", "output"):
            types[name] = T.F16
        elif kind == "ffn_down":
            types[name] = T.BF16
    path = write_gguf(tmp_path / "k.gguf", "llama", config, tensors, types)
    with pytest.raises(RuntimeError, match="gguf_tensor_to_f16"):
        mx.load(str(path))  # Q5_K: why the gguf-package path exists

    header = read_gguf_header(path)
    assert header.tensor_types["model.layers.0.mlp.up_proj.weight"] == "Q5_K"
    assert header.tensor_shapes["model.layers.0.mlp.up_proj.weight"] == (512, 256)
    weights, quantization = load_gguf_weights(header)
    assert weights["model.layers.0.mlp.gate_proj.weight"].dtype == mx.float16  # dequantized default
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.bfloat16  # floats as stored
    assert weights["model.norm.weight"].dtype == mx.float32
    assert set(quantization) == {"model.embed_tokens"} | {
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qk"
    }

    # The packed q/k rows are back in HF order: within Q8_0 error of the source.
    model, _ = load_gguf_model(path, dtype=mx.float32)
    q_proj = model.model.layers[1].self_attn.q_proj
    q = mx.dequantize(q_proj.weight, q_proj.scales, q_proj.biases, 32, 8)
    source_q = np.array(source["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_allclose(np.array(q), source_q, atol=5e-4)

    # Against mlx-lm's model holding what the file decodes to, in HF order.
    expected = {}
    for name in source:
        stored = tensors[gguf_name("llama", config, name)]
        if not isinstance(stored, tuple):
            ggml_type = types.get(gguf_name("llama", config, name), T.F32)
            stored = (gguf.quants.quantize(stored, ggml_type), ggml_type)
        value = gguf.quants.dequantize(*stored).astype(np.float32)
        if ".q_proj." in name:
            value = llama_cpp_unpermute(value, config["num_attention_heads"])
        elif ".k_proj." in name:
            value = llama_cpp_unpermute(value, config["num_key_value_heads"])
        expected[name] = mx.array(value)
    got = np.array(model(mx.array(TOKENS)[None]))
    expected_logits = reference_logits(config, expected, TOKENS)
    np.testing.assert_allclose(got, expected_logits, atol=1e-4, rtol=1e-4)


# --- files we must refuse -----------------------------------------------------------------------


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    finish(writer)
    supported = "supported: gemma, llama, phi3, qwen2, qwen3"
    with pytest.raises(UnsupportedGguf, match=f"'gpt2' is not supported; {supported}"):
        read_gguf_header(path)


def test_tensor_without_a_place_is_refused(tmp_path):
    config = tiny_config("llama")
    tensors = to_gguf_layout("llama", config, random_weights(config))
    tensors["rope_freqs.weight"] = np.ones(8, np.float32)  # llama 3 rope scaling: not reproduced
    path = write_gguf(tmp_path / "extra.gguf", "llama", config, tensors)
    with pytest.raises(UnsupportedGguf, match="rope_freqs.weight"):
        read_gguf_header(path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(UnsupportedGguf, match="not a GGUF"):
        read_gguf_header(path)
