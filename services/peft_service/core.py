"""The PEFT service's core, plain Python: what each RPC does, without gRPC.

Tests and other tools call this directly; the servicer only converts
messages. All MLX work happens here, under one lock: preparing a checkpoint
seeds MLX's global random state, and two preparations interleaving would
make their initial adapters depend on timing.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxtune.adapters.apply import (
    ParameterReport,
    adapter_weights,
    count_parameters,
    get_peft_model,
)
from mlxtune.adapters.config import AdapterConfig, AdapterFileConfig
from mlxtune.adapters.targets import adaptable_modules
from mlxtune.errors import InvalidArgument
from mlxtune.models.resolve import resolve_model
from mlxtune.models.spec import ModelSpec, open_model_spec
from mlxtune.store.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CheckpointManifest,
    CheckpointRecord,
    CheckpointStore,
    parse_checkpoint_name,
)
from mlxtune.store.requests import RequestLog, validate_request_id
from services.peft_service.metrics import PeftMetrics


@dataclass
class TargetableGroup:
    name: str
    layer_type: str
    count: int
    in_features: int
    out_features: int


@dataclass
class ModelReport:
    """What InspectModel returns."""

    base_model: dict
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    quantization: dict | None
    gguf_types: dict[str, int]
    total_parameters: int
    targetable_modules: list[TargetableGroup] = field(default_factory=list)
    has_chat_template: bool = False
    weight_bytes: int = 0


def base_model_identity(spec: ModelSpec) -> dict:
    return {
        "model": spec.source.name,
        "resolved_path": str(spec.source.path),
        "format": spec.source.format.value,
        "architecture": spec.architecture,
        "digest": spec.digest,
    }


def checkpoint_id_for(digest: str, config: AdapterConfig) -> str:
    """Same base model and effective config → same id (PrepareCheckpoint is idempotent)."""
    key = json.dumps({"base": digest, "config": config.to_dict()}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class PeftCore:
    def __init__(self, store_root: str | Path, models_dir: str | Path | None,
                 *, allow_hub: bool = True, metrics: PeftMetrics | None = None) -> None:
        self.store = CheckpointStore(store_root)
        self.store.clean_staging()
        self.requests = RequestLog(Path(store_root) / "requests")
        self.models_dir = Path(models_dir) if models_dir else None
        self.allow_hub = allow_hub
        self.metrics = metrics or PeftMetrics()
        self._mlx_lock = threading.Lock()
        self.metrics.track_store(self.store)

    # -- models -------------------------------------------------------------

    def open_model(self, name: str) -> ModelSpec:
        source = resolve_model(name, self.models_dir, allow_hub=self.allow_hub)
        started = time.perf_counter()
        spec = open_model_spec(source)
        self.metrics.model_load_seconds.labels(format=source.format.value).observe(
            time.perf_counter() - started)
        return spec

    def inspect_model(self, name: str) -> ModelReport:
        with self._mlx_lock:
            spec = self.open_model(name)
            groups: dict[tuple, TargetableGroup] = {}
            for m in adaptable_modules(spec.model):
                key = (m.leaf, m.layer_type, m.in_features, m.out_features)
                if key not in groups:
                    groups[key] = TargetableGroup(m.leaf, m.layer_type, 0, m.in_features,
                                                  m.out_features)
                groups[key].count += 1
            total = count_parameters(spec.model).total
        cfg = spec.config.get("text_config", spec.config)
        return ModelReport(
            base_model=base_model_identity(spec),
            num_layers=spec.num_layers,
            hidden_size=int(cfg.get("hidden_size", 0)),
            vocab_size=int(cfg.get("vocab_size", 0)),
            dtype=spec.dtype,
            quantization=spec.quantization,
            gguf_types=spec.gguf_types,
            total_parameters=total,
            targetable_modules=list(groups.values()),
            has_chat_template=spec.has_chat_template,
            weight_bytes=spec.weight_bytes,
        )

    # -- checkpoints --------------------------------------------------------

    def prepare_checkpoint(self, name: str, config: AdapterConfig,
                           request_id: str = "") -> tuple[CheckpointRecord, bool]:
        """Apply `config` to model `name` and store the initial adapter.

        Returns (record, already_existed).
        """
        validate_request_id(request_id)
        if (earlier := self.requests.lookup("prepare", request_id)) is not None:
            return self.get_checkpoint(earlier), True
        config.validate()
        started = time.perf_counter()
        with self._mlx_lock:
            spec = self.open_model(name)
            # Problems of the config and of its fit to this model come back together.
            problems = config.violations(total_layers=spec.num_layers)
            effective = config.with_defaults(spec.num_layers)
            selection = get_peft_model(spec.model, effective, problems)
            report = count_parameters(spec.model, selection)
            weights = _initial_adapter_weights(spec, effective)
        manifest = CheckpointManifest(
            id=checkpoint_id_for(spec.digest, effective),
            base_model=base_model_identity(spec),
            adapter_config=effective.to_dict(),
            parameters=_report_dict(report),
            origin="prepared",
        )
        file_config = AdapterFileConfig(effective, spec.num_layers, selection.mlx_keys,
                                        selection.peft_targets, str(spec.source.path),
                                        extra={"base_model": manifest.base_model})

        def write(folder: Path) -> None:
            (folder / ADAPTER_CONFIG).write_text(
                json.dumps(file_config.to_json_dict(), indent=2))
            mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), weights)

        record, created = self.store.create(manifest, write)
        self.requests.record("prepare", request_id, record.manifest.name)
        self.metrics.prepare_seconds.labels(method=effective.method).observe(
            time.perf_counter() - started)
        return record, not created

    def get_checkpoint(self, name: str) -> CheckpointRecord:
        return self.store.get(parse_checkpoint_name(name))

    def list_checkpoints(self, page_size: int = 0, page_token: str = "",
                         parent: str = "") -> tuple[list[CheckpointRecord], str]:
        parent_id = parse_checkpoint_name(parent, "parent") if parent else None
        return self.store.list(page_size, page_token, parent=parent_id)

    def delete_checkpoint(self, name: str) -> None:
        self.store.delete(parse_checkpoint_name(name))


def _initial_adapter_weights(spec: ModelSpec, config: AdapterConfig) -> dict[str, mx.array]:
    """The freshly initialised adapter: LoRA A (seeded) and B (zeros).

    DoRA's magnitude vector starts as the base weight's row norms, so it is
    derived from the base model when training loads the checkpoint, never
    from the unread weights here. Full fine-tuning starts from the base model
    itself and stores no initial weights.
    """
    if config.method == "full":
        return {}
    weights = {k: v for k, v in adapter_weights(spec.model).items()
               if k.endswith((".lora_a", ".lora_b"))}
    if not weights:
        raise InvalidArgument.field("adapter_config.target_modules", "selected no modules")
    mx.eval(weights)
    return weights


def _report_dict(report: ParameterReport) -> dict:
    return {"trainable": report.trainable, "total": report.total,
            "modules": [asdict(m) for m in report.modules]}
