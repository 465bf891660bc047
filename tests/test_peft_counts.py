"""Parameter counts equal what Hugging Face PEFT and mlx-lm report.

Three independent computations must agree with PrepareCheckpoint's counts,
made from the model's structure alone:
1. the real PEFT package on the real transformers model (PyTorch, CPU);
2. mlx-lm's LoRA layers on the model with its weights loaded;
3. arithmetic on the safetensors header shapes.
"""

from __future__ import annotations

import json
import struct

import pytest

from mlxtune.adapters.config import AdapterConfig
from services.peft_service.core import PeftCore

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

CONFIGS = [
    AdapterConfig(),  # all-linear, r=8
    AdapterConfig(rank=4, alpha=16, target_modules=("q_proj", "v_proj")),
    AdapterConfig(method="dora", rank=2, target_modules=("o_proj", "down_proj")),
    AdapterConfig(rank=8, num_layers=1, use_rslora=True),
]
# Phi-3 fuses q/k/v and gate/up into one projection each.
PHI3_TARGETS = {("q_proj", "v_proj"): ("qkv_proj",), ("o_proj", "down_proj"): ("o_proj", "down_proj")}


def _config_for(arch: str, config: AdapterConfig) -> AdapterConfig:
    if arch == "phi3" and config.target_modules in PHI3_TARGETS:
        from dataclasses import replace

        return replace(config, target_modules=PHI3_TARGETS[config.target_modules])
    return config


def _peft_counts(folder, config: AdapterConfig, num_layers: int) -> tuple[int, int]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    effective = config.with_defaults(num_layers)
    first = num_layers - effective.num_layers
    targets = list(effective.target_modules)
    if targets == ["all-linear"] and first:
        # PEFT takes "all-linear" only without layers_to_transform: name every
        # linear layer of the blocks instead.
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.model.layers.named_modules()
                          if isinstance(m, torch.nn.Linear)})
    elif targets == ["all-linear"]:
        targets = "all-linear"
    lora = LoraConfig(
        r=config.rank, lora_alpha=effective.alpha, lora_dropout=config.dropout,
        target_modules=targets,
        use_dora=config.method == "dora", use_rslora=config.use_rslora,
        layers_to_transform=list(range(first, num_layers)) if first else None,
        task_type="CAUSAL_LM")
    return get_peft_model(model, lora).get_nb_trainable_parameters()


def _header_counts(folder, record) -> tuple[int, int]:
    """Trainable = r * (in + out) (+ out for DoRA) per adapted weight; total adds the base."""
    shapes = {}
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    base_total = sum(_numel(s) for s in shapes.values())
    cfg = record.manifest.adapter_config
    trainable = 0
    for module in record.manifest.parameters["modules"]:
        out_f, in_f = shapes[module["module"] + ".weight"]
        trainable += cfg["rank"] * (in_f + out_f) + (out_f if cfg["method"] == "dora" else 0)
    return trainable, base_total + trainable


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "phi3"])
@pytest.mark.parametrize("config_index", range(len(CONFIGS)))
def test_counts_match_peft_mlx_lm_and_headers(models_dir, tmp_path, arch, config_index):
    from mlxtune.adapters.apply import count_parameters
    from mlxtune.adapters.checkpoint import load_checkpoint_model

    config = _config_for(arch, CONFIGS[config_index])
    core = PeftCore(tmp_path / "store", models_dir)
    record, _ = core.prepare_checkpoint(f"tiny-{arch}", config)
    ours = (record.manifest.parameters["trainable"], record.manifest.parameters["total"])

    folder = models_dir / f"tiny-{arch}"
    num_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert ours == _peft_counts(folder, config, num_layers)
    assert ours == _header_counts(folder, record)
    loaded = count_parameters(load_checkpoint_model(record).model)
    assert ours == (loaded.trainable, loaded.total)


def test_quantized_model_counts_equal_its_float_original(models_dir, tmp_path):
    core = PeftCore(tmp_path / "store", models_dir)
    q, _ = core.prepare_checkpoint("tiny-llama-4bit", AdapterConfig())
    f, _ = core.prepare_checkpoint("tiny-llama", AdapterConfig())
    assert q.manifest.parameters["trainable"] == f.manifest.parameters["trainable"]
    assert q.manifest.parameters["total"] == f.manifest.parameters["total"]
    assert q.manifest.id != f.manifest.id  # different base model, different checkpoint
    assert core.inspect_model("tiny-llama-4bit").quantization["bits"] == 4


def test_print_trainable_parameters_prints_what_peft_prints(models_dir, tmp_path, capsys):
    from peft import LoraConfig
    from peft import get_peft_model as peft_get_peft_model
    from transformers import AutoModelForCausalLM

    from mlxtune.adapters.apply import print_trainable_parameters
    from mlxtune.adapters.checkpoint import load_checkpoint_model

    core = PeftCore(tmp_path / "store", models_dir)
    record, _ = core.prepare_checkpoint("tiny-qwen2", AdapterConfig(rank=4, method="dora"))
    ours = print_trainable_parameters(load_checkpoint_model(record).model)
    model = AutoModelForCausalLM.from_pretrained(models_dir / "tiny-qwen2", dtype=torch.float32)
    capsys.readouterr()
    peft_get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                          use_dora=True)).print_trainable_parameters()
    assert capsys.readouterr().out.strip() == ours
