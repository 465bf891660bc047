"""Records to token ids and a per-token loss mask.

mask[t] == 1 means "predicting tokens[t] from tokens[:t] counts in the loss",
the convention of `Batch`, so mask[0] is always 0.

Chat records are rendered with the tokenizer's own chat template and the loss
covers every assistant turn (mlx-lm's datasets mask all but the last
message). A turn is located by rendering the conversation up to it twice:

    before  = render(messages[:k], add_generation_prompt=True)  # ends with the assistant header
    through = render(messages[:k + 1])                          # ends after the turn

so the turn's tokens are through[len(before):]. Rendering whole prefixes
(never single messages) keeps whatever the template adds once, such as a
default system prompt, in its place. Both must be token prefixes of the full
rendering; a template for which they are not cannot be masked this way and
raises FailedPrecondition instead of training on the wrong tokens.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlxtune.data.formats import DatasetFormat
from mlxtune.errors import FailedPrecondition, InvalidArgument, Violations

DEFAULT_MAX_SEQ_LENGTH = 2048


class LossMaskMode(str, enum.Enum):
    """Which tokens the loss covers (the proto's LossMask)."""

    COMPLETION = "completion"  # completions, assistant turns; all of a text
    ALL_TOKENS = "all_tokens"


@dataclass
class TokenizedExample:
    tokens: np.ndarray  # int32 [T]
    mask: np.ndarray  # float32 [T]; mask[t] weights predicting tokens[t]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_supervised(self) -> int:
        return int(self.mask.sum())


@dataclass
class TokenizedDataset:
    examples: list[TokenizedExample]
    record_indices: list[int]  # the record each example came from
    truncated: int  # examples longer than max_seq_length, cut to it
    dropped: int  # examples left with no supervised token after truncation

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(e) for e in self.examples], dtype=np.int64)


class TemplateRenderError(ValueError):
    """The chat template refused a record (e.g. roles that must alternate)."""


def tokenize_record(record: dict[str, Any], fmt: DatasetFormat, tokenizer,
                    loss_mask: LossMaskMode = LossMaskMode.COMPLETION) -> TokenizedExample:
    """One validated record, untruncated."""
    if fmt == DatasetFormat.TEXT:
        tokens = _with_eos(tokenizer, list(tokenizer.encode(record["text"])))
        spans = [(0, len(tokens))]
    elif fmt == DatasetFormat.COMPLETIONS:
        if has_chat_template(tokenizer):
            messages = [{"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": record["completion"]}]
            tokens, spans = _chat_tokens(tokenizer, messages, record.get("tools"), loss_mask)
        else:
            prompt = list(tokenizer.encode(record["prompt"]))
            completion = list(tokenizer.encode(record["completion"], add_special_tokens=False))
            tokens = _with_eos(tokenizer, prompt + completion)
            spans = [(len(prompt), len(tokens))]
    else:
        tokens, spans = _chat_tokens(tokenizer, record["messages"], record.get("tools"), loss_mask)
    if loss_mask == LossMaskMode.ALL_TOKENS:
        spans = [(0, len(tokens))]
    mask = np.zeros(len(tokens), dtype=np.float32)
    for start, end in spans:
        mask[start:end] = 1.0
    if len(mask):
        mask[0] = 0.0  # the first token has no context to be predicted from
    return TokenizedExample(np.asarray(tokens, dtype=np.int32), mask)


def tokenize_records(records: Sequence[dict[str, Any]], fmt: DatasetFormat, tokenizer,
                     max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
                     loss_mask: LossMaskMode = LossMaskMode.COMPLETION) -> TokenizedDataset:
    """Tokenize, truncate (keeping the start) and drop unsupervised examples.

    Records the chat template refuses raise InvalidArgument naming each one
    (`records[i]`, 0-based), rather than being skipped silently."""
    if max_seq_length < 2:
        raise InvalidArgument.field("config.max_seq_length", "must be at least 2")
    examples, indices, truncated, dropped = [], [], 0, 0
    violations = Violations()
    for i, record in enumerate(records):
        try:
            example = tokenize_record(record, fmt, tokenizer, loss_mask)
        except TemplateRenderError as e:
            if len(violations.items) < 50:
                violations.add(f"records[{i}]", str(e))
            continue
        if len(example) > max_seq_length:
            truncated += 1
            example = TokenizedExample(example.tokens[:max_seq_length], example.mask[:max_seq_length])
        if example.num_supervised == 0:
            dropped += 1
            continue
        examples.append(example)
        indices.append(i)
    violations.raise_if_any(reason="CHAT_TEMPLATE_REJECTED_RECORD",
                            message="the tokenizer's chat template cannot render some records")
    return TokenizedDataset(examples, indices, truncated, dropped)


def has_chat_template(tokenizer) -> bool:
    # TokenizerWrapper knows about templates the HF tokenizer does not hold
    # (custom renderers); a bare transformers tokenizer has only chat_template.
    flag = getattr(tokenizer, "has_chat_template", None)
    if isinstance(flag, bool):
        return flag
    return getattr(tokenizer, "chat_template", None) is not None


def eos_token_ids(tokenizer) -> set[int]:
    # TokenizerWrapper holds a set (generation_config's too); transformers'
    # tokenizers may answer a single id under the same name.
    extra = getattr(tokenizer, "eos_token_ids", None)
    ids = {extra} if isinstance(extra, int) else set(extra or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _with_eos(tokenizer, tokens: list[int]) -> list[int]:
    # Without a final EOS the model never learns where a document ends.
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not tokens or tokens[-1] != eos):
        tokens.append(eos)
    return tokens


def _render(tokenizer, messages: list[dict], tools, add_generation_prompt: bool) -> list[int]:
    kwargs = {"tools": tools} if tools else {}
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as e:  # jinja's raise_exception() and template bugs alike
        raise TemplateRenderError(f"the chat template failed: {e}") from e
    # The rendered text already holds BOS and friends where the template wants them.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _chat_tokens(tokenizer, messages: list[dict], tools,
                 loss_mask: LossMaskMode) -> tuple[list[int], list[tuple[int, int]]]:
    if not has_chat_template(tokenizer):
        raise FailedPrecondition(
            message="the tokenizer has no chat template, so chat records cannot be rendered",
            reason="NO_CHAT_TEMPLATE")
    full = _render(tokenizer, messages, tools, add_generation_prompt=False)
    if loss_mask == LossMaskMode.ALL_TOKENS:
        return full, []
    eos_ids = eos_token_ids(tokenizer)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], tools, add_generation_prompt=True)
        through = _render(tokenizer, messages[: k + 1], tools, add_generation_prompt=False)
        if through[: len(before)] != before or full[: len(through)] != through:
            raise FailedPrecondition(
                message=("the tokenizer's chat template is not prefix-stable (rendering the "
                         f"conversation up to message {k} is not a prefix of rendering it "
                         "further), so assistant turns cannot be located; train with "
                         "LOSS_MASK_ALL_TOKENS or use a prefix-stable template"),
                reason="CHAT_TEMPLATE_NOT_PREFIX_STABLE")
        end = _strip_turn_separator(tokenizer, through, len(before), len(through), eos_ids)
        spans.append((len(before), end))
    return full, spans


def _strip_turn_separator(tokenizer, tokens: list[int], start: int, end: int,
                          eos_ids: set[int]) -> int:
    """End of the supervised part of a turn: the end-of-turn token stays in
    (it teaches the model to stop), the whitespace many templates put after
    it (ChatML's "\\n") does not, since it belongs to the next turn's layout."""
    while end > start and tokens[end - 1] not in eos_ids:
        if tokenizer.decode([tokens[end - 1]]).strip():
            break
        end -= 1
    return end
