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
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxtune.adapters.apply import (
    ParameterReport,
    adapter_weights,
    count_parameters,
)
from mlxtune.adapters.checkpoint import verify_base_unchanged
from mlxtune.adapters.config import AdapterConfig, AdapterFileConfig
from mlxtune.adapters.peft_import import adapter_from_peft
from mlxtune.adapters.targets import TargetGroup, adaptable_modules, group_targets
from mlxtune.errors import InvalidArgument
from mlxtune.models.resolve import ModelFormat, ModelSource, resolve_model
from mlxtune.models.spec import ModelSpec, open_model_spec
from mlxtune.serving.file_chunks import FileSpool
from mlxtune.store.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CheckpointManifest,
    CheckpointRecord,
    CheckpointStore,
    parse_checkpoint_name,
)
from mlxtune.store.requests import RequestLog, validate_request_id
from mlxtune.vlm.peft import inspect_towers, prepare_adapters, towers_dict
from services.peft_service import export
from services.peft_service.adapter_files import (
    DEFAULT_MAX_IMPORT_BYTES,
    import_spool,
    read_peft_files,
    staged_digest,
)
from services.peft_service.generate import (
    GenerationPiece,
    GenerationRequest,
    TextGenerator,
    require_text_model,
)
from services.peft_service.metrics import PeftMetrics


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
    targetable_modules: list[TargetGroup] = field(default_factory=list)
    has_chat_template: bool = False
    weight_bytes: int = 0
    towers: list = field(default_factory=list)  # mlxtune.vlm.towers.TowerReport


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
                 *, allow_hub: bool = True, metrics: PeftMetrics | None = None,
                 generate_cache_size: int = 2,
                 max_import_bytes: int = DEFAULT_MAX_IMPORT_BYTES) -> None:
        self.store = CheckpointStore(store_root)
        self.store.clean_staging()
        self.requests = RequestLog(Path(store_root) / "requests")
        self.models_dir = Path(models_dir) if models_dir else None
        self.allow_hub = allow_hub
        self.metrics = metrics or PeftMetrics()
        self._mlx_lock = threading.Lock()
        self.metrics.track_store(self.store)
        self.max_import_bytes = max_import_bytes
        self.generator = TextGenerator(
            self._mlx_lock, self.resolve, self.store, generate_cache_size,
            on_tokens=self.metrics.generated_tokens.inc,
            on_load=self.metrics.generate_model_loads.inc)

    # -- models -------------------------------------------------------------

    def resolve(self, name: str) -> ModelSource:
        return resolve_model(name, self.models_dir, allow_hub=self.allow_hub)

    def open_model(self, name: str) -> ModelSpec:
        source = self.resolve(name)
        started = time.perf_counter()
        spec = open_model_spec(source)
        self.metrics.model_load_seconds.labels(format=source.format.value).observe(
            time.perf_counter() - started)
        return spec

    def inspect_model(self, name: str) -> ModelReport:
        with self._mlx_lock:
            spec = self.open_model(name)
            groups = group_targets(adaptable_modules(spec.model))
            towers = inspect_towers(spec)
        # The towers' sum: parameters only (mlx-vlm layers also hold buffers).
        total = sum(t.parameters for t in towers)
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
            targetable_modules=groups,
            has_chat_template=spec.has_chat_template,
            weight_bytes=spec.weight_bytes,
            towers=towers,
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
            # Text models: get_peft_model + count_parameters; VLMs: per tower.
            selection, report, tower_counts = prepare_adapters(spec, effective, problems)
            weights = _initial_adapter_weights(spec, effective)
        manifest = CheckpointManifest(
            id=checkpoint_id_for(spec.digest, effective),
            base_model=base_model_identity(spec),
            adapter_config=effective.to_dict(),
            parameters={**_report_dict(report), "towers": towers_dict(tower_counts)},
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

    # -- adapters in and out, generation --------------------------------------

    def export_checkpoint(self, name: str, fmt: str = "mlx") -> export.ExportedFiles:
        """The checkpoint's files in layout `fmt`, in a staging folder the caller removes."""
        record = self.get_checkpoint(name)
        export.check_format(fmt)
        started = time.perf_counter()
        exported = export.ExportedFiles(
            self.store.staging / f"export-{record.manifest.id}.{uuid.uuid4().hex[:8]}", [])
        exported.folder.mkdir(parents=True)
        try:
            if fmt == "mlx":
                exported.names = export.export_mlx(record, exported.folder)
            else:
                with self._mlx_lock:
                    verify_base_unchanged(record)
                    spec = open_model_spec(_base_source(record))
                    require_text_model(spec.config, spec.source.name, f"{fmt} export")
                    write = export.export_peft if fmt == "peft" else export.export_fused
                    exported.names = write(record, spec, exported.folder)
        except BaseException:
            exported.cleanup()
            raise
        self.metrics.export_seconds.labels(format=fmt).observe(time.perf_counter() - started)
        return exported

    def import_spool(self) -> FileSpool:
        """Where an ImportAdapter stream's files are received (removed on exit)."""
        return import_spool(self.store.staging, self.max_import_bytes)

    def import_adapter(self, model: str, files: dict[str, Path],
                       request_id: str = "") -> tuple[CheckpointRecord, bool]:
        """A PEFT adapter (adapter_config.json + adapter_model.safetensors, already
        received into `files`) as a new checkpoint of `model`; (record, already_existed)."""
        validate_request_id(request_id)
        if (earlier := self.requests.lookup("import", request_id)) is not None:
            return self.get_checkpoint(earlier), True
        started = time.perf_counter()
        config_data, tensors = read_peft_files(files)
        with self._mlx_lock:
            spec = self.open_model(model)
            require_text_model(spec.config, model, "ImportAdapter")
            imported = adapter_from_peft(spec.model, model, config_data, tensors)
            report = count_parameters(spec.model, imported.selection)
            mx.eval(imported.weights)
        config, selection = imported.config, imported.selection
        identity = base_model_identity(spec)
        key = json.dumps({"base": spec.digest, "config": config.to_dict(),
                          "files": staged_digest(files)}, sort_keys=True)
        manifest = CheckpointManifest(
            id=hashlib.sha256(key.encode()).hexdigest()[:16], base_model=identity,
            adapter_config=config.to_dict(), parameters=_report_dict(report), origin="imported",
            extra={"imported_from": imported.peft.base_model_name_or_path})
        file_config = AdapterFileConfig(
            config, spec.num_layers, selection.mlx_keys, selection.peft_targets,
            str(spec.source.path), extra={"base_model": identity,
                                          "imported_from": imported.peft.base_model_name_or_path})

        def write(folder: Path) -> None:
            (folder / ADAPTER_CONFIG).write_text(json.dumps(file_config.to_json_dict(), indent=2))
            mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), imported.weights)

        record, created = self.store.create(manifest, write)
        self.requests.record("import", request_id, record.manifest.name)
        self.metrics.import_seconds.observe(time.perf_counter() - started)
        return record, not created

    def generate(self, request: GenerationRequest) -> Iterator[GenerationPiece]:
        """Text pieces as they are generated; the last one carries the finish reason."""
        return self.generator.stream(request)


def _base_source(record: CheckpointRecord) -> ModelSource:
    base = record.manifest.base_model
    return ModelSource(base.get("model", ""), Path(base["resolved_path"]),
                       ModelFormat(base["format"]))


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
