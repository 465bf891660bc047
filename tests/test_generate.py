"""Generate over gRPC: streaming, determinism, adapters, finish reasons, bad requests."""

from __future__ import annotations

import json
import urllib.request

import grpc
import mlx.core as mx
import numpy as np
import pytest
from grpc_helpers import rpc_error
from mlxtune_client.adapters import generate, import_adapter

from mlxtune.peft.v1 import peft_service_pb2 as ppb
from mlxtune.serving import error_details

PROMPT = "The quick brown fox"


def violations(err: grpc.RpcError) -> dict[str, str]:
    _, bad_request = error_details(err)
    return {v.field: v.description for v in bad_request.field_violations}


def run(stub, **request) -> list[ppb.GenerateResponse]:
    return list(generate(stub, **request))


def text(responses) -> str:
    return "".join(r.text for r in responses)


@pytest.fixture(scope="module")
def adapter(services, tmp_path_factory) -> str:
    """A PEFT adapter with large random B on tiny-llama, imported as a checkpoint."""
    folder = tmp_path_factory.mktemp("peft-adapter")
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in (0, 1):
        for module, out in (("q_proj", 64), ("v_proj", 32)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = mx.array(rng.standard_normal((4, 64)) / 8)
            tensors[f"{prefix}.lora_B.weight"] = mx.array(rng.standard_normal((out, 4)))
    mx.save_safetensors(str(folder / "adapter_model.safetensors"),
                        {k: v.astype(mx.float32) for k, v in tensors.items()})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    return import_adapter(services.peft_stub, "tiny-llama", folder).name


def test_greedy_generation_streams_and_is_deterministic(services):
    first = run(services.peft_stub, model="tiny-llama", prompt=PROMPT, max_tokens=24)
    second = run(services.peft_stub, model="tiny-llama", prompt=PROMPT, max_tokens=24)
    assert text(first) == text(second) and len(text(first)) > 0
    assert len(first) > 3  # pieces arrive as they are generated
    *pieces, last = first
    assert all(p.finish_reason == ppb.FINISH_REASON_UNSPECIFIED for p in pieces)
    assert last.finish_reason in (ppb.FINISH_REASON_LENGTH, ppb.FINISH_REASON_STOP)
    if last.finish_reason == ppb.FINISH_REASON_LENGTH:
        assert last.generated_tokens == 24
    assert last.prompt_tokens > 0 and last.tokens_per_second > 0
    with urllib.request.urlopen(services.peft.metrics_url) as page:
        metrics = page.read().decode()
    assert "mlxtune_peft_generated_tokens_total" in metrics


def test_default_max_tokens_and_chat_messages(services):
    responses = run(services.peft_stub, model="tiny-llama",
                    messages=[("system", "Be brief."), {"role": "user", "content": "Hello"}])
    last = responses[-1]
    assert last.finish_reason in (ppb.FINISH_REASON_LENGTH, ppb.FINISH_REASON_STOP)
    if last.finish_reason == ppb.FINISH_REASON_LENGTH:
        assert last.generated_tokens == 128
    # The template wraps the chat: the prompt is longer than the words in it.
    assert last.prompt_tokens > 8


def test_adapter_changes_the_output(services, adapter):
    base = text(run(services.peft_stub, model="tiny-llama", prompt=PROMPT, max_tokens=16))
    adapted = run(services.peft_stub, checkpoint=adapter, prompt=PROMPT, max_tokens=16)
    assert text(adapted) != base
    # Same checkpoint, model named explicitly: the same (cached) model.
    again = run(services.peft_stub, model="tiny-llama", checkpoint=adapter, prompt=PROMPT,
                max_tokens=16)
    assert text(again) == text(adapted)


def test_sampling_follows_the_seed(services):
    def sample(seed):
        return text(run(services.peft_stub, model="tiny-llama", prompt=PROMPT, max_tokens=8,
                        temperature=1.0, top_p=0.95, seed=seed))

    assert sample(7) == sample(7)
    assert sample(8) != sample(7)


@pytest.mark.parametrize("request_fields,field", [
    (dict(model="tiny-llama"), "prompt"),
    (dict(model="tiny-llama", prompt="a", messages=[("user", "b")]), "prompt"),
    (dict(prompt="a"), "model"),
    (dict(model="tiny-llama", prompt="a", max_tokens=0), "max_tokens"),
    (dict(model="tiny-llama", prompt="a", max_tokens=5000), "max_tokens"),
    (dict(model="tiny-llama", prompt="a", temperature=-1), "temperature"),
    (dict(model="tiny-llama", prompt="a", top_p=0), "top_p"),
    (dict(model="tiny-llama", messages=[("robot", "hi")]), "messages[0].role"),
    (dict(checkpoint="not a name", prompt="a"), "checkpoint"),
])
def test_bad_requests_name_the_field(services, request_fields, field):
    err = rpc_error(run, services.peft_stub, **request_fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(err)


def test_missing_models_and_mismatched_bases(services, adapter):
    err = rpc_error(run, services.peft_stub, model="no-such-model", prompt="a")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(run, services.peft_stub, checkpoint="checkpoints/abc123", prompt="a")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(run, services.peft_stub, model="tiny-qwen2", checkpoint=adapter, prompt="a")
    assert "not the base model" in violations(err)["model"]


def test_model_cache_keeps_the_most_recent():
    from services.peft_service.generate import ModelCache

    cache, loads = ModelCache(capacity=2), []

    def loader(key):
        return lambda: loads.append(key) or key

    for key in ("a", "b", "a", "c", "a", "b"):
        cache.get((key,), loader(key))
    assert loads == ["a", "b", "c", "b"] and len(cache) == 2


def test_generation_runs_on_one_thread(models_dir, tmp_path):
    # mlx-lm generates on a thread-local MLX stream; a thread per request would
    # leave MLX worker threads behind for every request.
    import os

    from services.peft_service.core import PeftCore
    from services.peft_service.generate import GenerationRequest

    core = PeftCore(tmp_path / "store", models_dir, allow_hub=False)
    request = GenerationRequest(model="tiny-llama", prompt=PROMPT, max_tokens=2)

    def threads_after(requests: int) -> int:
        for _ in range(requests):
            assert list(core.generate(request))[-1].generated_tokens == 2
        return len(os.listdir("/proc/self/task"))

    assert threads_after(6) == threads_after(2)


@pytest.mark.slow
def test_smollm2_answers_and_stops(services, smollm2):
    link = services.models_dir / "smollm2-generate.gguf"
    link.symlink_to(smollm2)
    try:
        responses = run(services.peft_stub, model="smollm2-generate",
                        messages=[("user", "What is the capital of France? One word.")],
                        max_tokens=24)
    finally:
        link.unlink()
    assert "Paris" in text(responses)
    assert responses[-1].finish_reason == ppb.FINISH_REASON_STOP
    assert responses[-1].generated_tokens < 24
