"""Generate's work: text from a base model and an optional adapter, token by token.

Models are loaded with the same loaders training uses and kept in a small
LRU cache keyed by (base digest, checkpoint id), so a chat of several turns
pays the load once and a changed base file is never served from the cache.
Decoding is mlx-lm's ``stream_generate`` with its ``make_sampler``.

The MLX work runs on one long-lived generation thread that holds the core's
MLX lock from loading to the last token, so a seeded sample never interleaves
with other MLX work that draws from the global random state; text pieces go
through a queue, so a slow reader never holds the lock. A cancelled stream
stops the producer at the next token. One thread, not one per request:
mlx-lm generates on a thread-local MLX stream, and every new thread's stream
starts worker threads that live as long as the process (measured: two more
OS threads per request with a thread per request).
"""

from __future__ import annotations

import json
import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlxtune.errors import FailedPrecondition, InvalidArgument, Violations
from mlxtune.models.resolve import ModelFormat, ModelSource
from mlxtune.models.spec import folder_digest, gguf_digest
from mlxtune.store.checkpoints import CheckpointStore, parse_checkpoint_name

DEFAULT_MAX_TOKENS = 128
MAX_TOKENS_LIMIT = 4096
MAX_PROMPT_CHARS = 1_000_000
ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class GenerationRequest:
    model: str = ""
    checkpoint: str = ""
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def violations(self) -> Violations:
        v = Violations()
        if not self.model and not self.checkpoint:
            v.add("model", "give a model, a checkpoint, or both")
        if bool(self.prompt) == bool(self.messages):
            v.add("prompt", "give either prompt or messages (exactly one)")
        size = len(self.prompt) + sum(len(c) for _, c in self.messages)
        v.check(size <= MAX_PROMPT_CHARS, "prompt",
                f"the prompt is {size} characters; at most {MAX_PROMPT_CHARS}")
        for i, (role, _) in enumerate(self.messages):
            v.check(role in ROLES, f"messages[{i}].role",
                    f"{role!r} is not one of {', '.join(ROLES)}")
        if self.max_tokens is not None:
            v.check(1 <= self.max_tokens <= MAX_TOKENS_LIMIT, "max_tokens",
                    f"must be between 1 and {MAX_TOKENS_LIMIT}, got {self.max_tokens}")
        if self.temperature is not None:
            v.check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
                    f"must be a finite number >= 0, got {self.temperature}")
        if self.top_p is not None:
            v.check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        return v


@dataclass
class GenerationPiece:
    """The next piece of text; the last one says why generation stopped."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last piece
    prompt_tokens: int = 0
    generated_tokens: int = 0
    tokens_per_second: float = 0.0


@dataclass
class _Loaded:
    model: object
    tokenizer: object


class ModelCache:
    """The most recently used models, at most `capacity` of them."""

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[tuple, _Loaded] = OrderedDict()

    def get(self, key: tuple, load: Callable[[], _Loaded]) -> tuple[_Loaded, bool]:
        """(model, was cached)."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], True
        while len(self._items) >= self.capacity:
            self._items.popitem(last=False)
            mx.clear_cache()  # hand the evicted model's buffers back
        loaded = load()
        self._items[key] = loaded
        return loaded, False

    def __len__(self) -> int:
        return len(self._items)


class TextGenerator:
    def __init__(self, lock: threading.Lock, resolve: Callable[[str], ModelSource],
                 store: CheckpointStore, cache_size: int = 2, on_tokens=None,
                 on_load=None) -> None:
        self.lock = lock
        self.resolve = resolve
        self.store = store
        self.cache = ModelCache(cache_size)
        self.on_tokens = on_tokens or (lambda n: None)
        self.on_load = on_load or (lambda: None)
        # Requests wait here in order; the MLX lock then orders them against other MLX work.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def stream(self, request: GenerationRequest) -> Iterator[GenerationPiece]:
        request.violations().raise_if_any()
        key, load = self._model_key(request)  # bad names fail before any work
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()

        def produce() -> None:
            if stop.is_set():  # cancelled while waiting for its turn
                pieces.put(done)
                return
            try:
                with self.lock:
                    for piece in self._generate(request, key, load):
                        pieces.put(piece)
                        if stop.is_set():
                            break
            except BaseException as error:  # noqa: BLE001 - re-raised on the RPC's thread
                pieces.put(error)
            finally:
                pieces.put(done)

        self._worker.submit(produce)
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def _generate(self, request: GenerationRequest, key: tuple,
                  load: Callable[[], _Loaded]) -> Iterator[GenerationPiece]:
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        loaded, cached = self.cache.get(key, load)
        if not cached:
            self.on_load()
        prompt = request.prompt or _render_chat(loaded.tokenizer, request)
        mx.random.seed((request.seed or 0) & 0xFFFF_FFFF_FFFF_FFFF)
        sampler = make_sampler(temp=request.temperature or 0.0,
                               top_p=request.top_p if request.top_p is not None else 1.0)
        max_tokens = request.max_tokens or DEFAULT_MAX_TOKENS
        for response in stream_generate(loaded.model, loaded.tokenizer, prompt,
                                        max_tokens=max_tokens, sampler=sampler):
            if response.finish_reason is None:
                if response.text:
                    yield GenerationPiece(response.text)
                continue
            self.on_tokens(response.generation_tokens)
            yield GenerationPiece(response.text, response.finish_reason,
                                  response.prompt_tokens, response.generation_tokens,
                                  response.generation_tps)

    def _model_key(self, request: GenerationRequest) -> tuple[tuple, Callable[[], _Loaded]]:
        """Cache key and loader of the requested base (+ adapter)."""
        from mlxtune.adapters.checkpoint import load_checkpoint_model
        from mlxtune.models.load import load_base_model

        if request.checkpoint:
            record = self.store.get(parse_checkpoint_name(request.checkpoint, "checkpoint"))
            base = record.manifest.base_model
            base_path = Path(base["resolved_path"])
            if request.model and self.resolve(request.model).path.resolve() != \
                    base_path.resolve():
                raise InvalidArgument.field(
                    "model", f"{request.model!r} is not the base model of {record.manifest.name} "
                    f"({base.get('model')!r}); leave model empty to use its base")

            def load_checkpoint() -> _Loaded:
                loaded = load_checkpoint_model(record, for_training=False)
                return _Loaded(loaded.model, loaded.tokenizer)

            key = (_digest(base_path, base["format"]), record.manifest.id)
            require_text_model(_folder_config(base_path, base["format"]),
                               base.get("model", ""), "Generate")
            return key, load_checkpoint
        source = self.resolve(request.model)
        require_text_model(_folder_config(source.path, source.format.value), request.model,
                           "Generate")

        def load_base() -> _Loaded:
            model, tokenizer, _ = load_base_model(source.path, source.format.value)
            model.eval()
            return _Loaded(model, tokenizer)

        return (_digest(source.path, source.format.value), ""), load_base


def require_text_model(config: dict, model: str, what: str) -> None:
    """Refuse vision-language models, which these paths (mlx-lm's text loaders,
    PEFT's text-model names) do not handle."""
    from mlxtune.vlm.families import vlm_family

    if vlm_family(config) is not None:
        raise FailedPrecondition(
            message=f"{what} does not support vision-language models yet ({model!r} is one)",
            reason="VLM_NOT_SUPPORTED", metadata={"model": model})


def _folder_config(path: Path, fmt: str) -> dict:
    if fmt == ModelFormat.GGUF.value:
        return {}  # GGUF bases are text models
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _digest(path: Path, fmt: str) -> str:
    if not path.exists():
        raise FailedPrecondition(message=f"base model {path} no longer exists",
                                 reason="BASE_MODEL_MISSING")
    return gguf_digest(path) if fmt == ModelFormat.GGUF.value else folder_digest(path)


def _render_chat(tokenizer, request: GenerationRequest) -> str:
    if not getattr(tokenizer, "has_chat_template", False):
        raise FailedPrecondition(
            message=f"model {request.model or request.checkpoint!r} has no chat template; "
            "send a raw prompt instead of messages", reason="NO_CHAT_TEMPLATE")
    messages = [{"role": role, "content": content} for role, content in request.messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
