"""JSONL data: what gets loss in each shape, truncation, packing, and errors that name file and line."""

import json

import pytest

from deltaw.train.data import IGNORE, DataError, collate, load_jsonl, pack, split_validation
from tests.conftest import chat, write_jsonl


def loss_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_chat_loss_is_on_assistant_turns_only(tmp_path, tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Ahoy!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Fair winds."},
    ]}
    example = load_jsonl(write_jsonl(tmp_path / "d.jsonl", [record]), tokenizer, 512).examples[0]
    assert loss_text(tokenizer, example) == "Ahoy!<|im_end|>\nFair winds.<|im_end|>\n"
    full = tokenizer.decode(example.input_ids)
    assert full == tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert [label for label in example.labels if label != IGNORE] == [
        t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]


def test_prompt_completion_loss_is_on_the_completion_and_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2 + 2 =", "completion": " 4"}])
    example = load_jsonl(path, tokenizer, 512).examples[0]
    assert loss_text(tokenizer, example) == " 4" + tokenizer.eos_token
    assert tokenizer.decode(example.input_ids) == "2 + 2 = 4" + tokenizer.eos_token


def test_text_loss_is_on_every_token(tmp_path, tokenizer):
    example = load_jsonl(write_jsonl(tmp_path / "d.jsonl", [{"text": "Hello world"}]), tokenizer, 512).examples[0]
    assert example.labels == example.input_ids and example.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_to_seq_len(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "word " * 100}])
    assert len(load_jsonl(path, tokenizer, 16).examples[0].input_ids) == 16


def test_an_example_left_without_loss_by_truncation_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "long " * 50, "completion": "x"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: no tokens with loss left after truncation to --seq-len 8"):
        load_jsonl(path, tokenizer, 8)


BAD_LINES = {
    "bad json": ('{"text": "unterminated', "bad JSON"),
    "not an object": ('["text"]', "expected a JSON object"),
    "unknown shape": ({"question": "hi"}, "unknown shape with keys \\['question'\\]"),
    "empty content": (chat("Hi", "  "), "messages\\[1\\].content' is empty"),
    "no assistant": ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    "bad role": ({"messages": [{"role": "bot", "content": "Hi"}]}, "role must be one of"),
    "missing completion": ({"prompt": "Hi"}, "'completion' must be a string"),
    "empty text": ({"text": ""}, "'text' is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_lines_are_errors_naming_file_and_line(tmp_path, tokenizer, case):
    bad, message = BAD_LINES[case]
    path = write_jsonl(tmp_path / "data.jsonl", [chat("a", "b"), "", bad, chat("c", "d")])
    with pytest.raises(DataError, match=f"data.jsonl:3: .*{message}.*--skip-bad-lines"):
        load_jsonl(path, tokenizer, 512)


def test_skip_bad_lines_counts_and_reports_them(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", [chat("a", "b"), "{oops", {"text": ""}, chat("c", "d")])
    dataset = load_jsonl(path, tokenizer, 512, skip_bad_lines=True)
    assert len(dataset.examples) == 2 and [e.line for e in dataset.examples] == [1, 4]
    assert len(dataset.skipped) == 2 and "data.jsonl:2: bad JSON" in dataset.skipped[0]
    assert "skipped 2 bad lines" in dataset.summary()


def test_missing_file_and_all_bad(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such data file"):
        load_jsonl(tmp_path / "nope.jsonl", tokenizer, 512)
    path = write_jsonl(tmp_path / "bad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match="no usable examples \\(2 bad lines\\)"):
        load_jsonl(path, tokenizer, 512, skip_bad_lines=True)


def test_packing_concatenates_without_splitting_examples(tmp_path, tokenizer):
    records = [{"text": f"example number {i}"} for i in range(10)]
    examples = load_jsonl(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, 64).examples
    packed = pack(examples, 20)
    assert all(len(p.input_ids) <= 20 for p in packed) and len(packed) < len(examples)
    assert [t for p in packed for t in p.input_ids] == [t for e in examples for t in e.input_ids]
    assert [t for p in packed for t in p.labels] == [t for e in examples for t in e.labels]


def test_validation_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    records = [{"text": f"line {i}"} for i in range(20)]
    examples = load_jsonl(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, 64).examples
    train_a, val_a = split_validation(examples, 0.25, seed=1)
    train_b, val_b = split_validation(examples, 0.25, seed=1)
    assert [e.line for e in val_a] == [e.line for e in val_b] and len(val_a) == 5
    assert not {e.line for e in train_a} & {e.line for e in val_a}
    with pytest.raises(DataError, match="between 0 and 1"):
        split_validation(examples, 1.5, seed=1)


def test_collate_pads_right_and_masks_pads(tmp_path, tokenizer):
    records = [{"text": "short"}, {"text": "a somewhat longer line of text"}]
    examples = load_jsonl(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, 64).examples
    batch = collate(examples, pad_id=2)
    size = len(examples[0].input_ids)
    assert batch["input_ids"].shape == (2, len(examples[1].input_ids))
    assert batch["attention_mask"][0, :size].all() and not batch["attention_mask"][0, size:].any()
    assert (batch["labels"][0, size:] == IGNORE).all()


def test_a_line_that_is_not_utf8_is_that_lines_error_or_skipped(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    good = json.dumps(chat("a", "b")).encode()
    path.write_bytes(good + b"\n" + b'{"text": "caf\xe9"}\n' + good + b"\n")  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"data.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)"):
        load_jsonl(path, tokenizer, 512)
    dataset = load_jsonl(path, tokenizer, 512, skip_bad_lines=True)
    assert [e.line for e in dataset.examples] == [1, 3] and "data.jsonl:2: not UTF-8" in dataset.skipped[0]
