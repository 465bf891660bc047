"""JSONL dataset formats: detection and whole-file validation.

A dataset is rejected before it is stored, with every bad line listed, so a
user fixes the file once instead of once per error. Three record layouts are
accepted (the ones mlx-lm's tuner reads):

- text:        {"text": str}
- completions: {"prompt": str, "completion": str}
- chat:        {"messages": [{"role": ..., "content": str}, ...], "tools": [...]?}

Unknown extra keys are allowed and ignored (exports often carry ids or
metadata); a message may carry template-specific keys such as "tool_calls".
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mlxtune.errors import InvalidArgument, Violations


class DatasetFormat(str, enum.Enum):
    """Record layout; the values are what meta.json stores."""

    TEXT = "text"
    COMPLETIONS = "completions"
    CHAT = "chat"


CHAT_ROLES = ("system", "user", "assistant", "tool")
UNKNOWN_FORMAT = 'cannot tell the format: expected "text", "prompt" and "completion", or "messages"'

# Abuse limits. A line is one example; 8 MiB holds a very long conversation.
DEFAULT_MAX_LINE_BYTES = 8 << 20
DEFAULT_MAX_RECORDS = 2_000_000
# How many problems are listed; the rest are only counted, so an error reply
# for a wholly wrong 1 GiB file stays small.
MAX_REPORTED_PROBLEMS = 50


@dataclass(frozen=True)
class OversizedLine:
    """Stands in for a line longer than the limit, so readers that stream a
    file never have to hold such a line in memory (see `iter_file_lines`)."""

    size: int


@dataclass
class ValidationReport:
    """A valid dataset: its format and records (empty if not kept)."""

    format: DatasetFormat
    num_records: int
    records: list[dict[str, Any]] = field(default_factory=list)


def detect_format(record: Any) -> DatasetFormat | None:
    """The format a record's keys suggest, or None.

    "messages" wins over the others, then prompt+completion, then text, so a
    chat export that also carries a "text" summary is read as chat.
    """
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return DatasetFormat.CHAT
    if "prompt" in record or "completion" in record:
        return DatasetFormat.COMPLETIONS
    if "text" in record:
        return DatasetFormat.TEXT
    return None


def _string_problem(record: dict, key: str) -> str | None:
    if key not in record:
        return f'missing key "{key}"'
    value = record[key]
    if not isinstance(value, str):
        return f'"{key}" must be a string, got {_json_type(value)}'
    if not value.strip():
        return f'"{key}" is empty'
    return None


def _chat_problems(record: dict) -> list[str]:
    messages = record.get("messages")
    if not isinstance(messages, list):
        return [f'"messages" must be a list, got {_json_type(messages)}']
    if not messages:
        return ['"messages" is empty']
    problems = []
    has_assistant_content = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append(f"{where} must be an object, got {_json_type(message)}")
            continue
        role = message.get("role")
        if role not in CHAT_ROLES:
            problems.append(f'{where}.role must be one of {", ".join(CHAT_ROLES)}, got {json.dumps(role)}')
        content = message.get("content")
        if isinstance(content, list):
            # Vision-language chats: a list of text and image parts.
            from mlxtune.vlm.images import content_problems

            problems.extend(f"{where}.{p}" for p in content_problems(content))
            if role == "assistant" and any(isinstance(p, dict) and str(p.get("text", "")).strip()
                                           for p in content):
                has_assistant_content = True
        elif not isinstance(content, str):
            problems.append(f"{where}.content must be a string or a list of parts, "
                            f"got {_json_type(content)}")
        elif role == "assistant" and content.strip():
            has_assistant_content = True
    if not problems and not has_assistant_content:
        problems.append("no assistant message with content; there is nothing to train on")
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        problems.append('"tools" must be a list of objects')
    return problems


def record_problems(record: Any, fmt: DatasetFormat) -> list[str]:
    """Why `record` is not a valid record of format `fmt` (empty if it is)."""
    if not isinstance(record, dict):
        return [f"a record must be a JSON object, got {_json_type(record)}"]
    own = detect_format(record)
    if own is not None and own != fmt:
        return [f"looks like a {own.value} record, but the dataset is {fmt.value}"]
    if fmt == DatasetFormat.TEXT:
        problems = [_string_problem(record, "text")]
    elif fmt == DatasetFormat.COMPLETIONS:
        problems = [_string_problem(record, "prompt"), _string_problem(record, "completion")]
    else:
        return _chat_problems(record)
    return [p for p in problems if p]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _lines(data: bytes | Iterable[bytes | str | OversizedLine]) -> Iterable:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data).split(b"\n")
    if isinstance(data, str):
        return data.split("\n")
    return data


def validate_jsonl(data: bytes | Iterable[bytes | str | OversizedLine],
                   declared_format: DatasetFormat | None = None, *,
                   keep_records: bool = True,
                   max_records: int = DEFAULT_MAX_RECORDS,
                   max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> ValidationReport:
    """Parse and check every line; raise InvalidArgument listing every problem.

    `data` is the whole file or an iterable of its lines (a binary file
    object works). Blank lines are skipped; line numbers count from 1 as an
    editor shows them. Without `declared_format`, the first record's keys
    decide it and every later record must match. With `keep_records=False`
    only the count is returned (for storing a large file without holding it).
    """
    problems = _Problems()
    records: list[dict[str, Any]] = []
    fmt = declared_format
    num_records = 0
    for line_number, line in enumerate(_lines(data), start=1):
        if isinstance(line, OversizedLine):
            problems.append((line_number, f"line is {line.size} bytes, more than the limit of {max_line_bytes}"))
            continue
        if isinstance(line, str):
            line = line.encode("utf-8", "surrogatepass")
        if len(line) > max_line_bytes:
            problems.append((line_number, f"line is {len(line)} bytes, more than the limit of {max_line_bytes}"))
            continue
        if not line.strip():
            continue
        num_records += 1
        if num_records > max_records:
            problems.append((line_number, f"more than {max_records} records; split the dataset"))
            break
        try:
            # utf-8-sig: editors on Windows start files with a byte-order mark.
            text = line.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problems.append((line_number, f"not valid UTF-8 (byte {e.start})"))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append((line_number, f"not valid JSON: {e.msg} at column {e.colno}"))
            continue
        if not isinstance(record, dict):
            problems.append((line_number, f"a record must be a JSON object, got {_json_type(record)}"))
            continue
        if fmt is None:
            fmt = detect_format(record)
            if fmt is None:
                problems.append((line_number, UNKNOWN_FORMAT))
                continue
        record_issues = record_problems(record, fmt)
        for issue in record_issues:
            problems.append((line_number, issue))
        if keep_records and not record_issues:
            records.append(record)
    if not problems and num_records == 0:
        raise InvalidArgument.field("records", "the dataset has no records", reason="EMPTY_DATASET")
    if problems:
        raise problems.error()
    return ValidationReport(format=fmt, num_records=num_records, records=records)


class _Problems:
    """Keeps the first MAX_REPORTED_PROBLEMS problems and counts the rest, so
    a wholly wrong 1 GiB file costs no more memory than a slightly wrong one."""

    def __init__(self) -> None:
        self.listed: list[tuple[int, str]] = []
        self.total = 0

    def append(self, problem: tuple[int, str]) -> None:
        self.total += 1
        if len(self.listed) < MAX_REPORTED_PROBLEMS:
            self.listed.append(problem)

    def __bool__(self) -> bool:
        return self.total > 0

    def error(self) -> InvalidArgument:
        violations = Violations()
        for line_number, reason in self.listed:
            violations.add(f"records[line {line_number}]", reason)
        if self.total > len(self.listed):
            violations.add("records", f"{self.total - len(self.listed)} more problems not listed")
        message = (f"the dataset has {self.total} problem(s), the first on line "
                   f"{self.listed[0][0]}")
        return InvalidArgument.of(violations.items, reason="INVALID_DATASET", message=message)


def iter_file_lines(fileobj, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
    """Yield the lines of a binary file, never holding more than one line of
    at most `max_line_bytes` in memory; longer lines come as OversizedLine."""
    while True:
        line = fileobj.readline(max_line_bytes + 1)
        if not line:
            return
        if len(line) <= max_line_bytes or (line.endswith(b"\n") and len(line) == max_line_bytes + 1):
            yield line.rstrip(b"\n")
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = fileobj.readline(1 << 20)
            if not line:
                break
            size += len(line)
        yield OversizedLine(size=size - (1 if line.endswith(b"\n") else 0))
