"""PEFT service metrics (the gRPC metrics come from the shared interceptor)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Preparing a checkpoint takes milliseconds to seconds; loading a model's
# structure is usually faster.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class PeftMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Each core gets its own registry unless the server passes the one it exports.
        registry = registry if registry is not None else CollectorRegistry()
        self.prepare_seconds = Histogram(
            "mlxtune_peft_prepare_duration_seconds",
            "Time to prepare a checkpoint (resolve, open, adapt, count, write).",
            ["method"], buckets=_BUCKETS, registry=registry)
        self.model_load_seconds = Histogram(
            "mlxtune_peft_model_load_duration_seconds",
            "Time to open a model's structure from its headers.",
            ["format"], buckets=_BUCKETS, registry=registry)
        self.export_seconds = Histogram(
            "mlxtune_peft_export_duration_seconds",
            "Time to prepare a checkpoint export (before streaming it).",
            ["format"], buckets=_BUCKETS, registry=registry)
        self.import_seconds = Histogram(
            "mlxtune_peft_import_duration_seconds",
            "Time to check and store an imported adapter (after receiving it).",
            buckets=_BUCKETS, registry=registry)
        self.generated_tokens = Counter(
            "mlxtune_peft_generated_tokens",
            "Tokens produced by Generate.", registry=registry)
        self.generate_model_loads = Counter(
            "mlxtune_peft_generate_model_loads",
            "Models Generate had to load (cache misses).", registry=registry)
        self.checkpoints = Gauge(
            "mlxtune_store_checkpoints",
            "Checkpoints in the shared store.", registry=registry)
        # Series exist from the start, so the first observation shows in rate().
        for method in ("lora", "dora", "full"):
            self.prepare_seconds.labels(method=method)
        for fmt in ("hf", "mlx_quantized", "gguf"):
            self.model_load_seconds.labels(format=fmt)
        for fmt in ("mlx", "peft", "fused"):
            self.export_seconds.labels(format=fmt)

    def track_store(self, store) -> None:
        """Count checkpoints at scrape time, so the gauge is never stale."""
        self.checkpoints.set_function(lambda: sum(1 for _ in store.dir.iterdir()))
