"""Adapters in and out over gRPC: MLX / PEFT / fused exports, PEFT imports.

Oracles: mlx-lm's own adapter loader and model loader, and the real
Hugging Face PEFT package on the real transformers model of the same tiny
base, whose logits must match mlxtune's base+adapter logits.
"""

from __future__ import annotations

import json

import grpc
import mlx.core as mx
import numpy as np
import pytest
from grpc_helpers import prepare, rpc_error
from mlxtune_client.adapters import export_checkpoint, import_adapter

from mlxtune.adapters.checkpoint import load_checkpoint_model
from mlxtune.common.v1 import checkpoint_pb2 as common
from mlxtune.common.v1 import files_pb2
from mlxtune.peft.v1 import peft_service_pb2 as ppb
from mlxtune.serving import error_details
from mlxtune.store.checkpoints import CheckpointManifest, CheckpointStore

TOKENS = [[5, 17, 99, 230, 7, 301, 42, 11, 480, 64, 3, 150]]


def violations(err: grpc.RpcError) -> dict[str, str]:
    _, bad_request = error_details(err)
    return {v.field: v.description for v in bad_request.field_violations}


def randomized(store_root, checkpoint: common.Checkpoint, *, seed: int = 0,
               b_std: float = 0.3, dtype=None) -> str:
    """A copy of `checkpoint` with random non-zero adapter weights (as if trained):
    with B = 0 every adapter is the identity and no comparison could fail."""
    store = CheckpointStore(store_root)
    record = store.get(checkpoint.name.split("/")[1])
    # mlx-lm's loader derives DoRA's magnitudes from the base: take them from there.
    model = load_checkpoint_model(record, compute_dtype="float32", for_training=False).model
    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in _adapter_params(model).items():
        shape = value.shape
        if name.endswith(".m"):
            new = np.array(value) * (1 + 0.2 * rng.standard_normal(shape))
        elif name.endswith(".lora_a"):
            new = rng.standard_normal(shape) / np.sqrt(shape[0])
        else:
            new = rng.standard_normal(shape) * b_std
        weights[name] = mx.array(new.astype(np.float32)).astype(dtype or mx.float32)
    manifest = CheckpointManifest(
        id=f"{record.manifest.id[:10]}-r{seed}-{str(dtype or mx.float32).split('.')[-1]}",
        base_model=record.manifest.base_model,
        adapter_config=record.manifest.adapter_config, parameters=record.manifest.parameters,
        origin="trained", parent=record.manifest.id)

    def write(folder):
        (folder / "adapter_config.json").write_bytes((record.path / "adapter_config.json")
                                                     .read_bytes())
        mx.save_safetensors(str(folder / "adapters.safetensors"), weights)

    return store.create(manifest, write)[0].manifest.name


def _adapter_params(model) -> dict[str, mx.array]:
    from mlx.utils import tree_flatten

    return {n: v for n, v in tree_flatten(model.parameters())
            if n.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")}


def mlxtune_logits(store_root, name: str) -> np.ndarray:
    record = CheckpointStore(store_root).get(name.split("/")[1])
    model = load_checkpoint_model(record, compute_dtype="float32", for_training=False).model
    return np.array(model(mx.array(TOKENS)))


def mlx_lm_logits(folder, adapter_path=None) -> np.ndarray:
    from mlx_lm.utils import load

    model, _ = load(str(folder), adapter_path=str(adapter_path) if adapter_path else None)
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def load_tensors(path) -> dict[str, np.ndarray]:
    # Compare raw bits: uint views make "bit-identical" literal, bf16 included.
    out = {}
    for name, value in mx.load(str(path)).items():
        bits = {2: mx.uint16, 4: mx.uint32}[value.itemsize]
        out[name] = (str(value.dtype), tuple(value.shape), np.array(value.view(bits)).tobytes())
    return out


def test_mlx_export_loads_in_mlx_lm(services, tmp_path):
    checkpoint = prepare(services.peft_stub, model="tiny-qwen2", rank=4,
                         target_modules=["q_proj", "v_proj"])
    name = randomized(services.store, checkpoint)
    files = export_checkpoint(services.peft_stub, name, "mlx", tmp_path)
    assert sorted(f.name for f in files) == ["adapter_config.json", "adapters.safetensors"]
    base = services.models_dir / "tiny-qwen2"
    adapted = mlx_lm_logits(base, tmp_path)  # mlx-lm's loader, with its shape checks
    np.testing.assert_allclose(adapted, mlxtune_logits(services.store, name), atol=1e-5)
    assert np.abs(adapted - mlx_lm_logits(base)).max() > 1e-2  # the adapter does something
    assert not list((services.store / "tmp").iterdir())  # the export's staging is gone


@pytest.mark.parametrize("method,dtype", [(common.ADAPTER_METHOD_LORA, mx.float32),
                                          (common.ADAPTER_METHOD_LORA, mx.bfloat16),
                                          (common.ADAPTER_METHOD_DORA, mx.float32)])
def test_round_trip_mlx_peft_mlx_is_bit_identical(services, tmp_path, method, dtype):
    checkpoint = prepare(services.peft_stub, model="tiny-llama", method=method, rank=4,
                         num_layers=1, use_rslora=True, alpha=6)
    name = randomized(services.store, checkpoint, seed=1, dtype=dtype)
    export_checkpoint(services.peft_stub, name, "mlx", tmp_path / "mlx")
    export_checkpoint(services.peft_stub, name, "peft", tmp_path / "peft", chunk_size=1024)
    peft_tensors = load_tensors(tmp_path / "peft" / "adapter_model.safetensors")
    assert {dt for dt, _, _ in peft_tensors.values()} == {str(dtype)}

    imported = import_adapter(services.peft_stub, "tiny-llama", tmp_path / "peft")
    assert imported.origin == common.CHECKPOINT_ORIGIN_IMPORTED
    assert imported.parameters.trainable_parameters == checkpoint.parameters.trainable_parameters
    export_checkpoint(services.peft_stub, imported.name, "mlx", tmp_path / "back")

    assert load_tensors(tmp_path / "back" / "adapters.safetensors") == \
        load_tensors(tmp_path / "mlx" / "adapters.safetensors")
    before, after = (json.loads((tmp_path / d / "adapter_config.json").read_text())
                     for d in ("mlx", "back"))
    for key in ("fine_tune_type", "num_layers", "lora_parameters", "r", "lora_alpha",
                "use_rslora", "use_dora"):
        assert before[key] == after[key], key
    # Importing the same files again gives the same checkpoint.
    assert import_adapter(services.peft_stub, "tiny-llama", tmp_path / "peft").name == \
        imported.name


# (architecture, adapter config): biases on q/k/v (qwen2), fused qkv (phi3),
# tied embeddings and norm offsets (gemma), DoRA, rsLoRA, a layer subset, an
# embedding adapter (PEFT's lora_embedding_A/B).
PEFT_CASES = [
    ("llama", dict(rank=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(method=common.ADAPTER_METHOD_DORA, rank=4, num_layers=1)),
    ("qwen2", dict(rank=8, alpha=4, use_rslora=True)),
    ("gemma", dict(rank=4, target_modules=["o_proj", "gate_proj"])),
    ("phi3", dict(rank=4, num_layers=1)),
    ("llama", dict(rank=4, target_modules=["embed_tokens", "k_proj"])),
]


@pytest.mark.parametrize("arch,config", PEFT_CASES, ids=[f"{a}-{i}" for i, (a, _) in
                                                          enumerate(PEFT_CASES)])
def test_real_peft_loads_peft_export_with_matching_logits(services, tmp_path, arch, config):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    checkpoint = prepare(services.peft_stub, model=f"tiny-{arch}", **config)
    name = randomized(services.store, checkpoint, seed=2)
    export_checkpoint(services.peft_stub, name, "peft", tmp_path)
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    if config.get("num_layers") == 1:
        assert peft_config["layers_to_transform"] == [1]

    base = AutoModelForCausalLM.from_pretrained(services.models_dir / f"tiny-{arch}",
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        peft_logits = model(torch.tensor(TOKENS)).logits.numpy()
        with model.disable_adapter():
            base_logits = model(torch.tensor(TOKENS)).logits.numpy()
    ours = mlxtune_logits(services.store, name)
    assert np.abs(peft_logits - base_logits).max() > 1e-2  # the comparison can fail
    np.testing.assert_allclose(ours, peft_logits, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("use_dora", [False, True])
def test_import_of_an_adapter_made_by_real_peft_matches_its_logits(services, tmp_path,
                                                                    use_dora):
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(services.models_dir / "tiny-llama",
                                                dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, use_rslora=True, use_dora=use_dora,
                        target_modules=["q_proj", "o_proj", "up_proj"], layers_to_transform=[1])
    model = get_peft_model(base, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
        expected = model(torch.tensor(TOKENS)).logits.numpy()
    model.save_pretrained(str(tmp_path))

    checkpoint = import_adapter(services.peft_stub, "tiny-llama", tmp_path)
    assert checkpoint.adapter_config.num_layers == 1
    assert checkpoint.adapter_config.method == (common.ADAPTER_METHOD_DORA if use_dora
                                                else common.ADAPTER_METHOD_LORA)
    np.testing.assert_allclose(mlxtune_logits(services.store, checkpoint.name), expected,
                               atol=2e-4, rtol=1e-3)


def _peft_files(services, tmp_path, **config):
    checkpoint = prepare(services.peft_stub, model="tiny-llama", **config)
    name = randomized(services.store, checkpoint, seed=3)
    export_checkpoint(services.peft_stub, name, "peft", tmp_path)
    return (json.loads((tmp_path / "adapter_config.json").read_text()),
            dict(mx.load(str(tmp_path / "adapter_model.safetensors"))))


def _write(tmp_path, config: dict, tensors: dict):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(tmp_path / "adapter_model.safetensors"), tensors)
    return tmp_path


def test_import_names_unknown_modules_and_wrong_shapes(services, tmp_path):
    config, tensors = _peft_files(services, tmp_path, rank=4, target_modules=["q_proj"])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = mx.zeros((32, 4))  # q_proj has 64 outputs
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = mx.zeros((4, 64))
    tensors["base_model.model.model.norm.weight"] = mx.zeros((64,))
    err = rpc_error(import_adapter, services.peft_stub, "tiny-llama",
                    _write(tmp_path, config, tensors))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err)
    unknown = found["adapter_model.safetensors[base_model.model.model.layers.7.self_attn."
                    "q_proj.lora_A.weight]"]
    assert "no adaptable module 'model.layers.7.self_attn.q_proj'" in unknown
    assert "not a LoRA tensor" in found["adapter_model.safetensors[base_model.model.model."
                                        "norm.weight]"]

    del tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"]
    del tensors["base_model.model.model.norm.weight"]
    err = rpc_error(import_adapter, services.peft_stub, "tiny-llama",
                    _write(tmp_path, config, tensors))
    assert violations(err)[f"adapter_model.safetensors[{key}]"] == \
        "expected shape (64, 4), got (32, 4)"


def test_import_refuses_rank_mismatch_and_unsupported_features(services, tmp_path):
    config, tensors = _peft_files(services, tmp_path, rank=4, target_modules=["v_proj"])
    err = rpc_error(import_adapter, services.peft_stub, "tiny-llama",
                    _write(tmp_path, dict(config, r=8), tensors))
    found = violations(err)
    assert found["adapter_config.json.r"] == "r is 8, but the tensors have rank 4"
    assert found["adapter_model.safetensors[base_model.model.model.layers.0.self_attn.v_proj."
                 "lora_A.weight]"] == "expected shape (8, 64), got (4, 64)"

    unsupported = dict(config, bias="all", modules_to_save=["lm_head"], peft_type="IA3")
    found = violations(rpc_error(import_adapter, services.peft_stub, "tiny-llama",
                                 _write(tmp_path, unsupported, tensors)))
    assert {"adapter_config.json.bias", "adapter_config.json.modules_to_save",
            "adapter_config.json.peft_type"} <= set(found)

    # Layers 0 only of 2: mlx-lm's format adapts the last N layers.
    first_only = {k: v for k, v in tensors.items() if ".layers.0." in k}
    found = violations(rpc_error(import_adapter, services.peft_stub, "tiny-llama",
                                 _write(tmp_path, config, first_only)))
    assert "adapted in layers 0; mlx-lm's adapter format" in found["adapter_model.safetensors"]


def _upload(stub, *chunks, model="tiny-llama"):
    messages = [ppb.ImportAdapterRequest(header=ppb.ImportAdapterHeader(model=model))]
    messages += [ppb.ImportAdapterRequest(chunk=c) for c in chunks]
    return rpc_error(stub.ImportAdapter, iter(messages))


def test_import_checks_the_stream(services):
    stub = services.peft_stub
    escape = files_pb2.FileChunk(path="../adapter_config.json", data=b"{}", eof=True)
    assert "chunk.path" in violations(_upload(stub, escape))
    other = files_pb2.FileChunk(path="adapter_model.bin", data=b"x", eof=True)
    assert "unexpected file" in violations(_upload(stub, other))["chunk.path"]
    wrong_digest = files_pb2.FileChunk(path="adapter_config.json", data=b"{}", eof=True,
                                       sha256="sha256:" + "0" * 64)
    assert "digest" in violations(_upload(stub, wrong_digest))["chunk.sha256"]
    gap = files_pb2.FileChunk(path="adapter_config.json", offset=5, data=b"{}")
    assert "expected offset 0" in violations(_upload(stub, gap))["chunk.offset"]
    huge = files_pb2.FileChunk(path="adapter_config.json", data=b"{", size=2 << 20)
    assert "limit" in violations(_upload(stub, huge))["chunk.size"]
    config_only = files_pb2.FileChunk(path="adapter_config.json", data=b"{}", eof=True)
    assert "adapter_model.safetensors" in violations(_upload(stub, config_only))["chunk.path"]
    truncated = files_pb2.FileChunk(path="adapter_model.safetensors", data=b"\x10\0\0\0",
                                    eof=True)
    assert "safetensors" in violations(_upload(stub, config_only, truncated))[
        "adapter_model.safetensors"]
    no_header = rpc_error(stub.ImportAdapter, iter([ppb.ImportAdapterRequest(chunk=escape)]))
    assert violations(no_header) == {"header": "the first message must be the header"}
    assert not list((services.store / "tmp").iterdir())  # refused uploads leave nothing


def test_peft_export_refuses_what_peft_cannot_hold(services, tmp_path):
    checkpoint = prepare(services.peft_stub, model="tiny-llama",
                         method=common.ADAPTER_METHOD_FULL, num_layers=1)
    err = rpc_error(export_checkpoint, services.peft_stub, checkpoint.name, "peft", tmp_path)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "EXPORT_FORMAT_FUSED" in err.details()
    # gemma ties its embedding to the output head: PEFT would not adapt the head.
    tied = prepare(services.peft_stub, model="tiny-gemma", rank=4,
                   target_modules=["embed_tokens"])
    err = rpc_error(export_checkpoint, services.peft_stub, tied.name, "peft", tmp_path)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "tied" in err.details()
    err = rpc_error(export_checkpoint, services.peft_stub, checkpoint.name, "mlx", tmp_path,
                    chunk_size=10)
    assert "chunk_size" in violations(err)
    err = rpc_error(export_checkpoint, services.peft_stub, "checkpoints/nope", "mlx", tmp_path)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_fused_export_matches_base_plus_adapter(services, tmp_path):
    checkpoint = prepare(services.peft_stub, model="tiny-gemma", rank=4)
    name = randomized(services.store, checkpoint, seed=4)
    files = {f.name for f in export_checkpoint(services.peft_stub, name, "fused", tmp_path)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert "quantization" not in json.loads((tmp_path / "config.json").read_text())
    fused = mlx_lm_logits(tmp_path)  # mlx-lm's own loader reads the folder
    np.testing.assert_allclose(fused, mlxtune_logits(services.store, name), atol=1e-4)


def test_fused_export_of_4bit_base_keeps_the_small_delta(services, tmp_path):
    import mlx.nn as nn
    from mlx_lm.utils import load

    checkpoint = prepare(services.peft_stub, model="tiny-llama-4bit", rank=4)
    # Updates far below one 4-bit step, as a short fine-tune makes them.
    name = randomized(services.store, checkpoint, seed=5, b_std=2e-3)
    export_checkpoint(services.peft_stub, name, "fused", tmp_path / "fused")
    export_checkpoint(services.peft_stub, name, "mlx", tmp_path / "adapter")
    base_dir = services.models_dir / "tiny-llama-4bit"
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config

    adapted = mlx_lm_logits(base_dir, tmp_path / "adapter")  # quantized base + LoRA, mlx-lm
    base = mlx_lm_logits(base_dir)
    fused = mlx_lm_logits(tmp_path / "fused")
    requantized_model, _ = load(str(tmp_path / "fused"))
    nn.quantize(requantized_model, group_size=32, bits=4)  # what fuse without dequantize does
    requantized = np.array(requantized_model(mx.array(TOKENS)))

    delta = np.abs(adapted - base).max()
    fused_error = np.abs(fused - adapted).max()
    requantized_error = np.abs(requantized - adapted).max()
    assert fused_error < 0.02 * delta, (fused_error, delta)
    assert requantized_error > 0.3 * delta, (requantized_error, delta)
