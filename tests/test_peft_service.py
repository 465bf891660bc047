"""The PEFT service over gRPC: real server on loopback, tiny real model files."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request

import grpc
import pytest
from grpc_helpers import prepare, rpc_error
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mlxtune.common.v1 import checkpoint_pb2 as common
from mlxtune.peft.v1 import peft_service_pb2 as ppb
from mlxtune.serving import error_details


def violations(err: grpc.RpcError) -> dict[str, str]:
    _, bad_request = error_details(err)
    return {v.field: v.description for v in bad_request.field_violations}


@pytest.mark.parametrize("arch,layers", [("llama", 2), ("qwen2", 2), ("gemma", 2), ("phi3", 2)])
def test_inspect_reports_structure_without_loading_weights(services, arch, layers):
    info = services.peft_stub.InspectModel(ppb.InspectModelRequest(model=f"tiny-{arch}"))
    assert info.base_model.architecture == arch
    assert info.base_model.format == common.MODEL_FORMAT_HF
    assert info.base_model.digest.startswith("sha256:")
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (layers, 64, 512)
    assert info.dtype == "float32" and info.has_chat_template
    names = {m.name for m in info.targetable_modules}
    assert ({"qkv_proj", "o_proj"} if arch == "phi3" else {"q_proj", "v_proj"}) <= names
    assert info.total_parameters > 0 and info.weight_bytes > 0


def test_inspect_quantized_model(services):
    info = services.peft_stub.InspectModel(ppb.InspectModelRequest(model="tiny-llama-4bit"))
    assert info.base_model.format == common.MODEL_FORMAT_MLX_QUANTIZED
    assert (info.quantization.bits, info.quantization.group_size) == (4, 32)
    q_proj = next(m for m in info.targetable_modules if m.name == "q_proj")
    assert q_proj.layer_type == "QuantizedLinear" and (q_proj.in_features, q_proj.out_features) \
        == (64, 64)


def test_prepare_reports_counts_identity_and_writes_peft_and_mlx_readable_files(services):
    checkpoint = prepare(services.peft_stub, model="tiny-qwen2", rank=4, alpha=8,
                         target_modules=["q_proj", "v_proj"], dropout=0.05)
    assert checkpoint.name.startswith("checkpoints/")
    params = checkpoint.parameters
    # qwen2 tiny: q 64x64, v 64x32 per layer, 2 layers; r=4: 4*(64+64) + 4*(64+32) per layer.
    assert params.trainable_parameters == 2 * (4 * 128 + 4 * 96)
    assert params.summary == (f"trainable params: {params.trainable_parameters:,d} || all params: "
                              f"{params.total_parameters:,d} || trainable%: "
                              f"{100 * params.trainable_parameters / params.total_parameters:.4f}")
    assert [m.module for m in params.modules] == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    config = checkpoint.adapter_config
    assert (config.method, config.rank, config.alpha, config.num_layers) == \
        (common.ADAPTER_METHOD_LORA, 4, 8.0, 2)
    assert checkpoint.base_model.resolved_path.endswith("tiny-qwen2")

    folder = services.store / "checkpoints" / checkpoint.name.split("/")[1]
    files = json.loads((folder / "adapter_config.json").read_text())
    assert (files["r"], files["lora_alpha"], files["peft_type"], files["task_type"]) == \
        (4, 8.0, "LORA", "CAUSAL_LM")
    assert files["lora_parameters"]["scale"] == 2.0
    from peft import LoraConfig

    peft_config = LoraConfig.from_pretrained(str(folder))
    assert peft_config.r == 4 and set(peft_config.target_modules) == {"q_proj", "v_proj"}
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(services.models_dir / "tiny-qwen2")
    load_adapters(model, str(folder))  # mlx-lm's own loader, with its shape checks
    assert not list((services.store / "tmp").iterdir())


def test_same_inputs_give_the_same_checkpoint_and_request_ids_are_idempotent(services):
    stub = services.peft_stub
    request = ppb.PrepareCheckpointRequest(model="tiny-llama",
                                           adapter_config=common.AdapterConfig(rank=2, seed=5))
    first = stub.PrepareCheckpoint(request)
    again = stub.PrepareCheckpoint(request)
    assert first.checkpoint.name == again.checkpoint.name and again.already_existed
    other_seed = stub.PrepareCheckpoint(ppb.PrepareCheckpointRequest(
        model="tiny-llama", adapter_config=common.AdapterConfig(rank=2, seed=6)))
    assert other_seed.checkpoint.name != first.checkpoint.name

    retried = ppb.PrepareCheckpointRequest(model="tiny-llama", request_id="req-42",
                                           adapter_config=common.AdapterConfig(rank=3))
    one = stub.PrepareCheckpoint(retried)
    # A retry with the same request_id returns the first result, even if the body drifted.
    retried.adapter_config.rank = 5
    two = stub.PrepareCheckpoint(retried)
    assert one.checkpoint.name == two.checkpoint.name and two.already_existed


def test_get_list_pages_and_delete(services):
    stub = services.peft_stub
    made = [prepare(stub, rank=1, seed=100 + i).name for i in range(5)]
    assert stub.GetCheckpoint(ppb.GetCheckpointRequest(name=made[0])).checkpoint.name == made[0]
    seen, token = [], ""
    while True:
        page = stub.ListCheckpoints(ppb.ListCheckpointsRequest(page_size=2, page_token=token))
        assert len(page.checkpoints) <= 2
        seen += [c.name for c in page.checkpoints]
        if not (token := page.next_page_token):
            break
    assert set(made) <= set(seen) and len(seen) == len(set(seen))
    times = [stub.GetCheckpoint(ppb.GetCheckpointRequest(name=n)).checkpoint.create_time.ToNanoseconds()
             for n in seen]
    assert times == sorted(times, reverse=True)
    stub.DeleteCheckpoint(ppb.DeleteCheckpointRequest(name=made[0]))
    assert rpc_error(stub.GetCheckpoint, ppb.GetCheckpointRequest(name=made[0])).code() == \
        grpc.StatusCode.NOT_FOUND
    assert rpc_error(stub.DeleteCheckpoint, ppb.DeleteCheckpointRequest(name=made[0])).code() == \
        grpc.StatusCode.NOT_FOUND


def test_bad_adapter_configs_list_every_violation(services):
    err = rpc_error(services.peft_stub.PrepareCheckpoint, ppb.PrepareCheckpointRequest(
        model="tiny-llama", adapter_config=common.AdapterConfig(rank=0, dropout=1.0, alpha=-1)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err)) == {"adapter_config.rank", "adapter_config.dropout",
                                    "adapter_config.alpha"}
    err = rpc_error(services.peft_stub.PrepareCheckpoint, ppb.PrepareCheckpointRequest(
        model="tiny-llama", adapter_config=common.AdapterConfig(
            rank=65, target_modules=["q_proj", "attention"], num_layers=3)))
    found = violations(err)
    assert "available: " in found["adapter_config.target_modules[1]"]
    assert "q_proj" in found["adapter_config.target_modules[1]"]
    assert "2 layers" in found["adapter_config.num_layers"]
    err = rpc_error(services.peft_stub.PrepareCheckpoint, ppb.PrepareCheckpointRequest(
        model="tiny-llama", adapter_config=common.AdapterConfig(rank=65)))
    assert "at most" in violations(err)["adapter_config.rank"]
    info, _ = error_details(err)
    assert info.reason == "INVALID_ADAPTER_CONFIG" and info.domain == "mlxtune"


@pytest.mark.parametrize("name,code", [
    ("no-such-model", grpc.StatusCode.NOT_FOUND),
    ("org/no-such-model", grpc.StatusCode.NOT_FOUND),
    ("../tiny-llama", grpc.StatusCode.INVALID_ARGUMENT),
    ("/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
    ("", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_model_names_resolve_only_inside_the_models_dir(services, name, code):
    err = rpc_error(services.peft_stub.InspectModel, ppb.InspectModelRequest(model=name))
    assert err.code() == code
    if code == grpc.StatusCode.NOT_FOUND:
        assert str(services.models_dir) in err.details()  # every place searched is listed


@pytest.mark.parametrize("name", ["checkpoints/../../etc", "checkpoints/UPPER", "jobs/x", "a/b/c"])
def test_checkpoint_names_cannot_escape_the_store(services, name):
    assert rpc_error(services.peft_stub.GetCheckpoint, ppb.GetCheckpointRequest(
        name=name)).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unsupported_architecture_and_quantized_full_are_failed_precondition(services):
    odd = services.models_dir / "odd-arch"
    if not odd.exists():
        shutil.copytree(services.models_dir / "tiny-llama", odd)
        config = json.loads((odd / "config.json").read_text())
        (odd / "config.json").write_text(json.dumps(dict(config, model_type="no_such_arch")))
    err = rpc_error(services.peft_stub.InspectModel, ppb.InspectModelRequest(model="odd-arch"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(err)[0].reason == "UNSUPPORTED_ARCHITECTURE"
    err = rpc_error(services.peft_stub.PrepareCheckpoint, ppb.PrepareCheckpointRequest(
        model="tiny-llama-4bit",
        adapter_config=common.AdapterConfig(method=common.ADAPTER_METHOD_FULL)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_health_reflection_and_metrics_pass_promtool(services):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(services.peft_channel)
    for service in ("", "mlxtune.peft.v1.PeftService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(services.peft_channel)
    reply = next(reflection.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "mlxtune.peft.v1.PeftService" in {s.name for s in reply.list_services_response.service}

    prepare(services.peft_stub, rank=1, seed=999)
    for service in (services.peft, services.trainer):
        text = urllib.request.urlopen(service.metrics_url, timeout=10).read().decode()
        assert "grpc_server_handled_total" in text
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.fail("promtool is missing: install the Debian package 'prometheus'")
        check = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                               capture_output=True)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    text = urllib.request.urlopen(services.peft.metrics_url, timeout=10).read().decode()
    assert 'mlxtune_peft_prepare_duration_seconds_count{method="lora"}' in text
    assert "mlxtune_store_checkpoints " in text
    assert ('grpc_server_handled_total{grpc_code="OK",grpc_method="PrepareCheckpoint",'
            'grpc_service="mlxtune.peft.v1.PeftService",grpc_type="unary"}') in text
