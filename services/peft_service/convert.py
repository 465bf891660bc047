"""Conversions between the PEFT core's plain objects and protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from mlxtune.adapters.apply import ParameterReport
from mlxtune.adapters.config import AdapterConfig
from mlxtune.common.v1 import checkpoint_pb2 as common
from mlxtune.peft.v1 import peft_service_pb2 as pb
from mlxtune.store.checkpoints import CheckpointRecord
from services.peft_service.core import ModelReport
from services.peft_service.generate import GenerationPiece, GenerationRequest

_METHOD_TO_PB = {
    "lora": common.ADAPTER_METHOD_LORA,
    "dora": common.ADAPTER_METHOD_DORA,
    "full": common.ADAPTER_METHOD_FULL,
}
_METHOD_FROM_PB = {v: k for k, v in _METHOD_TO_PB.items()}
_TOWER_TO_PB = {
    "language": common.MODEL_TOWER_LANGUAGE,
    "vision": common.MODEL_TOWER_VISION,
    "projector": common.MODEL_TOWER_PROJECTOR,
}
_TOWER_FROM_PB = {v: k for k, v in _TOWER_TO_PB.items()}
_FORMAT_TO_PB = {
    "hf": common.MODEL_FORMAT_HF,
    "mlx_quantized": common.MODEL_FORMAT_MLX_QUANTIZED,
    "gguf": common.MODEL_FORMAT_GGUF,
}
_ORIGIN_TO_PB = {
    "prepared": common.CHECKPOINT_ORIGIN_PREPARED,
    "trained": common.CHECKPOINT_ORIGIN_TRAINED,
    "imported": common.CHECKPOINT_ORIGIN_IMPORTED,
}


def adapter_config_from_pb(msg: common.AdapterConfig) -> AdapterConfig:
    """Unset fields keep the dataclass defaults."""
    kwargs: dict = {}
    if msg.method != common.ADAPTER_METHOD_UNSPECIFIED:
        kwargs["method"] = _METHOD_FROM_PB.get(msg.method, f"unknown({msg.method})")
    for name in ("rank", "alpha", "dropout", "num_layers", "seed"):
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    kwargs["use_rslora"] = msg.use_rslora
    if msg.target_modules:
        kwargs["target_modules"] = tuple(msg.target_modules)
    if msg.towers:
        kwargs["towers"] = tuple(_TOWER_FROM_PB.get(t, f"unknown({t})") for t in msg.towers)
    return AdapterConfig(**kwargs)


def adapter_config_to_pb(config: dict | AdapterConfig) -> common.AdapterConfig:
    c = config if isinstance(config, AdapterConfig) else AdapterConfig.from_dict(config)
    msg = common.AdapterConfig(
        method=_METHOD_TO_PB.get(c.method, common.ADAPTER_METHOD_UNSPECIFIED),
        rank=c.rank, alpha=c.effective_alpha, use_rslora=c.use_rslora, dropout=c.dropout,
        target_modules=list(c.target_modules), seed=c.seed,
        towers=[_TOWER_TO_PB[t] for t in c.towers if t in _TOWER_TO_PB])
    if c.num_layers is not None:
        msg.num_layers = c.num_layers
    return msg


def parameters_to_pb(parameters: dict) -> common.ParameterReport:
    report = ParameterReport(parameters["trainable"], parameters["total"])
    return common.ParameterReport(
        trainable_parameters=report.trainable,
        total_parameters=report.total,
        trainable_percent=report.percent,
        summary=report.summary,
        modules=[common.ModuleParameters(**m) for m in parameters.get("modules", [])],
        # Manifests from before towers: the whole model is the language tower.
        towers=[common.TowerParameters(tower=_TOWER_TO_PB.get(t["tower"], 0),
                                       trainable_parameters=t["trainable"],
                                       total_parameters=t["total"])
                for t in parameters.get("towers") or [
                    {"tower": "language", "trainable": report.trainable,
                     "total": report.total}]],
    )


def base_model_to_pb(base: dict) -> common.BaseModel:
    return common.BaseModel(
        model=base.get("model", ""), resolved_path=base.get("resolved_path", ""),
        format=_FORMAT_TO_PB.get(base.get("format", ""), common.MODEL_FORMAT_UNSPECIFIED),
        architecture=base.get("architecture", ""), digest=base.get("digest", ""))


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def checkpoint_to_pb(record: CheckpointRecord) -> common.Checkpoint:
    m = record.manifest
    msg = common.Checkpoint(
        name=m.name,
        base_model=base_model_to_pb(m.base_model),
        adapter_config=adapter_config_to_pb(m.adapter_config),
        parameters=parameters_to_pb(m.parameters),
        origin=_ORIGIN_TO_PB.get(m.origin, common.CHECKPOINT_ORIGIN_UNSPECIFIED),
        parent=f"checkpoints/{m.parent}" if m.parent else "",
        job=f"jobs/{m.job}" if m.job else "",
        step=m.step,
        create_time=timestamp(m.create_time),
        path=str(record.path),
        size_bytes=m.size_bytes,
    )
    if m.train_loss is not None:
        msg.train_loss = m.train_loss
    if m.eval_loss is not None:
        msg.eval_loss = m.eval_loss
    return msg


def model_report_to_pb(report: ModelReport) -> pb.InspectModelResponse:
    q = report.quantization or {}
    return pb.InspectModelResponse(
        base_model=base_model_to_pb(report.base_model),
        num_layers=report.num_layers,
        hidden_size=report.hidden_size,
        vocab_size=report.vocab_size,
        dtype=report.dtype,
        quantization=pb.Quantization(bits=q.get("bits", 0), group_size=q.get("group_size", 0),
                                     mode=q.get("mode", ""), gguf_types=report.gguf_types),
        total_parameters=report.total_parameters,
        targetable_modules=[
            pb.TargetableModule(name=g.name, layer_type=g.layer_type, count=g.count,
                                in_features=g.in_features, out_features=g.out_features)
            for g in report.targetable_modules
        ],
        has_chat_template=report.has_chat_template,
        weight_bytes=report.weight_bytes,
        towers=[pb.TowerInfo(
            tower=_TOWER_TO_PB.get(t.tower.value, 0), module=t.module, num_layers=t.num_layers,
            parameters=t.parameters,
            targetable_modules=[
                pb.TargetableModule(name=g.name, layer_type=g.layer_type, count=g.count,
                                    in_features=g.in_features, out_features=g.out_features)
                for g in t.targetable])
            for t in report.towers],
    )


_EXPORT_FORMAT_FROM_PB = {
    pb.EXPORT_FORMAT_UNSPECIFIED: "mlx",
    pb.EXPORT_FORMAT_MLX: "mlx",
    pb.EXPORT_FORMAT_PEFT: "peft",
    pb.EXPORT_FORMAT_FUSED: "fused",
}
_FINISH_TO_PB = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def export_format_from_pb(value: int) -> str:
    return _EXPORT_FORMAT_FROM_PB.get(value, f"unknown({value})")


def generate_request_from_pb(msg: pb.GenerateRequest) -> GenerationRequest:
    """Unset optional fields stay None (the documented defaults apply)."""
    return GenerationRequest(
        model=msg.model, checkpoint=msg.checkpoint, prompt=msg.prompt,
        messages=tuple((m.role, m.content) for m in msg.messages),
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        seed=msg.seed if msg.HasField("seed") else None)


def generation_piece_to_pb(piece: GenerationPiece) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(text=piece.text)
    if piece.finish_reason is not None:
        msg.finish_reason = _FINISH_TO_PB.get(piece.finish_reason,
                                              pb.FINISH_REASON_UNSPECIFIED)
        msg.prompt_tokens = piece.prompt_tokens
        msg.generated_tokens = piece.generated_tokens
        msg.tokens_per_second = piece.tokens_per_second
    return msg
