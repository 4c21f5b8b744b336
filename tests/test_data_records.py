"""JSONL records: validation errors with file:line, chat rendering, and the data report."""

import re

import pytest

from megatron_irl.data import DataError, SFTDataset, render_chat
from helpers import CharTokenizer, EOS, write_jsonl


def dataset(path, seq_length=64, strict=False):
    return SFTDataset(str(path), CharTokenizer(), seq_length, strict=strict)


def test_render_chat_template_exact():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    assert render_chat(messages) == [
        ("System: Be brief.\nUser: 2+2?\nAssistant:", False),
        (" 4\n", True),
        ("User: and 3+3?\nAssistant:", False),
        (" 6", True),
    ]


def test_render_chat_stops_after_last_assistant_turn():
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert render_chat(messages) == [("User: a\nAssistant:", False), (" b", True)]


GOOD = {"prompt": "p", "response": "r"}
BAD_RECORDS = [
    ('{"prompt": "p", "response": ', "malformed JSON"),
    ('["p", "r"]', "expected a JSON object, got list"),
    ({"response": "r"}, "missing its 'prompt' field"),
    ({"prompt": "p"}, "missing its 'response' field"),
    ({"prompt": "p", "response": 3}, "'response' must be a string, got int"),
    ({"prompt": None, "response": "r"}, "'prompt' must be a string, got NoneType"),
    ({"text": "t"}, "needs 'prompt' and 'response' strings or a 'messages' list"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
    ({"messages": [{"content": "x"}]}, r"messages\[0\] is missing its 'role' field"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] is missing its 'content' field"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\] has role 'bot'"),
    ({"messages": [{"role": "user", "content": 1}]}, r"messages\[0\]\.content must be a string"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "p"}, "both 'messages' and"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS)
def test_bad_record_raises_naming_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + ".*" + message):
        dataset(path)


def test_invalid_utf8_raises_naming_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid UTF-8")):
        dataset(path)


def test_empty_file_raises(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="contains no records"):
        dataset(path)


def test_missing_file_raises_naming_it(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl"):
        dataset(tmp_path / "missing.jsonl")


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", GOOD, "  ", {"prompt": "p", "response": ""}])
    ds = dataset(path)
    assert ds.report.num_records == 2
    assert ds.report.problem_examples == {"empty_response": [f"{path}:4"]}


def test_empty_response_is_kept_trains_only_eos_and_is_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "response": ""}])
    ds = dataset(path)
    row = ds.row(0)
    assert row["labels"][row["loss_mask"] == 1].tolist() == [EOS]
    assert ds.report.problem_counts == {"empty_response": 1}


def test_strict_mode_raises_on_empty_response(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "ab", "response": " "}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: empty response")):
        dataset(path, strict=True)


def test_chat_without_assistant_turn_is_dropped_and_counted(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, chat])
    ds = dataset(path)
    assert ds.report.num_records == 2 and ds.report.num_documents == 1
    assert ds.report.problem_examples == {"no_assistant_turn": [f"{path}:2"]}


def test_chat_trailing_messages_are_counted(tmp_path):
    chat = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "bye"},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [chat])
    ds = dataset(path)
    assert ds.report.problem_counts == {"trailing_messages": 1}
    assert CharTokenizer().decode(ds.row(0)["tokens"]) == "User: hi\nAssistant: yo"


def test_report_counts_every_problem_with_first_examples(tmp_path):
    records = [{"prompt": "p", "response": ""}] * 7 + [{"prompt": "x" * 20, "response": "r"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    report = dataset(path, seq_length=10).report
    assert report.problem_counts == {"empty_response": 7, "no_response_in_window": 1}
    assert report.problem_examples["empty_response"] == [f"{path}:{i}" for i in range(1, 6)]
    text = report.format()
    assert "7 x empty response" in text and f"{path}:5, ..." in text
    dropped = "1 x prompt leaves no response token within seq_length positions: dropped"
    assert f"{dropped} (e.g. {path}:8)" in text


def test_line_cut_short_is_reported_at_its_end(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "resp\n')
    with pytest.raises(DataError, match=re.escape(
            f"{path}:2: malformed JSON at column 17: Unterminated string starting at")):
        dataset(path)
    path.write_text('{"prompt": "p", "response": "r"\n')
    with pytest.raises(DataError, match=re.escape(
            f"{path}:1: malformed JSON at column 32 (the end of the line: the record is cut "
            "short): Expecting ',' delimiter")):
        dataset(path)
