"""VLM towers and parameter counts against an independent oracle: the same
config built by transformers (PyTorch) with Hugging Face PEFT on top.

The tiny folders are written by mlxtune.testing.random_vlms from mlx-vlm's
model classes; transformers must load their weights with no missing or
unexpected key (so the folders really are in the Hugging Face layout), and
PEFT's counts per tower must equal the PEFT service's."""

from __future__ import annotations

import pytest
from vlm_fixtures import FAMILIES, write_vlm_models

from mlxtune.adapters.config import AdapterConfig

# Module prefixes of each tower in transformers' classes.
HF_TOWERS = {
    "qwen2_vl": {"vision": ("model.visual.",), "projector": ("model.visual.merger.",)},
    "llava": {"vision": ("model.vision_tower.",),
              "projector": ("model.multi_modal_projector.",)},
}
CASES = [
    (("language",), "lora"),
    (("language", "vision"), "lora"),
    (("vision", "projector"), "dora"),
    (("language", "vision", "projector"), "lora"),
]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return write_vlm_models(tmp_path_factory.mktemp("vlms"))


@pytest.fixture(scope="module")
def core(vlm_dir, tmp_path_factory):
    from services.peft_service.core import PeftCore

    return PeftCore(tmp_path_factory.mktemp("store"), vlm_dir, allow_hub=False)


def hf_tower(family: str, name: str) -> str:
    towers = HF_TOWERS[family]
    if name.startswith(towers["projector"]):
        return "projector"
    if name.startswith(towers["vision"]):
        return "vision"
    return "language"


def peft_counts(path, family: str, towers, method: str, rank: int = 4) -> dict:
    """(trainable, total) per tower and overall, from transformers + PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    problems = ("missing_keys", "unexpected_keys", "mismatched_keys")
    assert not any(info.get(k) for k in problems), info
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not n.endswith("lm_head") and hf_tower(family, n + ".") in towers]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                  target_modules=targets,
                                                  use_dora=method == "dora"))
    out = {t: [0, 0] for t in ("language", "vision", "projector")}
    for name, p in peft_model.named_parameters():
        tower = hf_tower(family, name.removeprefix("base_model.model."))
        out[tower][1] += p.numel()
        out[tower][0] += p.numel() if p.requires_grad else 0
    trainable, total = peft_model.get_nb_trainable_parameters()
    return {"towers": {t: tuple(v) for t, v in out.items()}, "trainable": trainable,
            "total": total}


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_match_transformers_and_peft_per_tower(core, vlm_dir, family):
    for towers, method in CASES:
        record, _ = core.prepare_checkpoint(f"tiny-{family}", AdapterConfig(
            rank=4, method=method, towers=towers))
        ours = record.manifest.parameters
        oracle = peft_counts(vlm_dir / f"tiny-{family}", family, towers, method)
        assert (ours["trainable"], ours["total"]) == (oracle["trainable"], oracle["total"]), \
            (towers, method)
        by_tower = {t["tower"]: (t["trainable"], t["total"]) for t in ours["towers"]}
        assert by_tower == oracle["towers"], (towers, method)
        # Only the selected towers train.
        assert {t for t, (n, _) in by_tower.items() if n} == set(towers)


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_reports_three_towers(core, family):
    from services.peft_service.convert import model_report_to_pb

    report = core.inspect_model(f"tiny-{family}")
    towers = {t.tower.value: t for t in report.towers}
    assert list(towers) == ["language", "vision", "projector"]
    assert towers["language"].module == "language_model" and towers["language"].num_layers == 2
    assert towers["vision"].num_layers == 2 and towers["projector"].num_layers == 0
    assert report.total_parameters == sum(t.parameters for t in report.towers)
    assert report.num_layers == 2 and report.vocab_size == 528 and report.hidden_size == 64
    names = {g.name for g in towers["vision"].targetable}
    assert names >= ({"qkv", "fc1"} if family == "qwen2_vl" else {"q_proj", "fc1"})
    msg = model_report_to_pb(report)
    assert [t.module for t in msg.towers][0] == "language_model"
    assert sum(t.parameters for t in msg.towers) == msg.total_parameters


def test_text_models_report_one_language_tower(tmp_path):
    from mlxtune.testing.random_models import tiny_config, write_hf_model
    from services.peft_service.convert import checkpoint_to_pb
    from services.peft_service.core import PeftCore

    write_hf_model(tmp_path / "models" / "tiny-llama", tiny_config("llama"), seed=1)
    text_core = PeftCore(tmp_path / "store", tmp_path / "models", allow_hub=False)
    report = text_core.inspect_model("tiny-llama")
    assert [(t.tower.value, t.module) for t in report.towers] == [("language", "")]
    assert report.towers[0].parameters == report.total_parameters
    record, _ = text_core.prepare_checkpoint("tiny-llama", AdapterConfig(rank=4))
    msg = checkpoint_to_pb(record)
    assert len(msg.parameters.towers) == 1
    assert msg.parameters.towers[0].trainable_parameters == msg.parameters.trainable_parameters
    # Text checkpoints keep the ids they had before towers existed.
    assert "towers" not in record.manifest.adapter_config
    from mlxtune.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as exc:
        text_core.prepare_checkpoint("tiny-llama", AdapterConfig(towers=("language", "vision")))
    assert any(v.field == "adapter_config.towers" for v in exc.value.violations)


def test_target_names_stay_inside_the_selected_towers(core):
    from mlxtune.errors import InvalidArgument

    # "fc1" exists only in the vision tower: not selectable for the language tower.
    with pytest.raises(InvalidArgument) as exc:
        core.prepare_checkpoint("tiny-llava", AdapterConfig(target_modules=("fc1",)))
    assert "matches no module of the towers language" in str(exc.value)
    record, _ = core.prepare_checkpoint("tiny-llava", AdapterConfig(
        rank=4, target_modules=("q_proj",), towers=("language", "vision")))
    adapted = [m["module"] for m in record.manifest.parameters["modules"]]
    assert len(adapted) == 4 and all(m.endswith("q_proj") for m in adapted)
    assert {m.split(".")[0] for m in adapted} == {"language_model", "vision_tower"}


def test_full_fine_tuning_trains_whole_towers(core):
    record, _ = core.prepare_checkpoint("tiny-qwen2_vl", AdapterConfig(
        method="full", towers=("projector",)))
    towers = {t["tower"]: t for t in record.manifest.parameters["towers"]}
    assert towers["projector"]["trainable"] == towers["projector"]["total"] > 0
    assert towers["vision"]["trainable"] == towers["language"]["trainable"] == 0
