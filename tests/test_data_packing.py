"""Packing: loss masks, terminals, truncation, drops, positions and the attention mask."""

import os
import tempfile

import numpy as np
import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_irl.data import DataError, SFTDataset, block_causal_attention_mask
from helpers import BOS, CharTokenizer, EOS, PAD, ids, write_jsonl


def packed(tmp_path, records, seq_length, bos=True, strict=False):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    return SFTDataset(path, CharTokenizer(bos=bos), seq_length, strict=strict)


def test_single_document_row_fields_exact(tmp_path):
    ds = packed(tmp_path, [{"prompt": "ab", "response": "c"}], seq_length=6)
    row = ds.row(0)
    a, b, c = ids("abc")
    assert row["tokens"].tolist() == [BOS, a, b, c, PAD, PAD]
    assert row["labels"].tolist() == [a, b, c, EOS, PAD, PAD]
    assert row["loss_mask"].tolist() == [0, 0, 1, 1, 0, 0]
    assert row["terminal"].tolist() == [False, False, False, True, False, False]
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 0, 0]
    assert row["document_ids"].tolist() == [0, 0, 0, 0, -1, -1]


def test_last_prompt_position_predicts_first_response_token_and_counts(tmp_path):
    ds = packed(tmp_path, [{"prompt": "pq", "response": "xyz"}], seq_length=8)
    row = ds.row(0)
    first_trained = int(np.flatnonzero(row["loss_mask"])[0])
    assert row["tokens"][first_trained] == ids("q")[0]  # the last prompt token
    assert row["labels"][first_trained] == ids("x")[0]  # predicts the first response token
    assert row["loss_mask"][:first_trained].sum() == 0


def test_without_bos_the_first_token_is_never_a_label(tmp_path):
    ds = packed(tmp_path, [{"prompt": "", "response": "xy"}], seq_length=4, bos=False)
    row = ds.row(0)
    assert row["labels"].tolist()[:2] == [ids("y")[0], EOS]
    assert row["loss_mask"].tolist() == [1, 1, 0, 0]


def test_next_fit_packing_never_splits_documents(tmp_path):
    records = [
        {"prompt": "ab", "response": "c"},  # 4 positions
        {"prompt": "a", "response": "b"},  # 3: does not fit next to the first
        {"prompt": "", "response": "x"},  # 2: fits next to the second
        {"prompt": "a", "response": "bc"},  # 4: new row
    ]
    ds = packed(tmp_path, records, seq_length=6)
    rows = [ds.row(r) for r in range(len(ds))]
    assert [r["document_ids"].tolist() for r in rows] == [
        [0, 0, 0, 0, -1, -1],
        [1, 1, 1, 2, 2, -1],
        [3, 3, 3, 3, -1, -1],
    ]
    assert rows[1]["position_ids"].tolist() == [0, 1, 2, 0, 1, 0]
    assert rows[1]["terminal"].tolist() == [False, False, True, False, True, False]
    # The last position of a document predicts its EOS, never the next document's BOS.
    assert rows[1]["labels"].tolist()[:5] == [ids("a")[0], ids("b")[0], EOS, ids("x")[0], EOS]
    assert ds.report.num_rows == 3 and ds.report.num_packed_documents == 4


def test_padding_positions_are_untrained_non_terminal_pad_tokens(tmp_path):
    row = packed(tmp_path, [{"prompt": "a", "response": "b"}], seq_length=7).row(0)
    pad = row["document_ids"] == -1
    assert pad.sum() == 4
    assert (row["tokens"][pad] == PAD).all() and (row["labels"][pad] == PAD).all()
    assert row["loss_mask"][pad].sum() == 0 and not row["terminal"][pad].any()


def test_overlong_document_is_truncated_not_terminal_and_counted(tmp_path):
    ds = packed(tmp_path, [{"prompt": "abc", "response": "defg"}], seq_length=4)
    row = ds.row(0)
    assert row["tokens"].tolist() == [BOS] + ids("abc")
    assert row["labels"].tolist() == ids("abcd")
    assert row["loss_mask"].tolist() == [0, 0, 0, 1]
    assert not row["terminal"].any()
    assert ds.report.problem_counts == {"truncated": 1}
    assert ds.report.problem_examples["truncated"] == [f"{tmp_path / 'd.jsonl'}:1"]


def test_document_filling_exactly_seq_length_keeps_its_terminal(tmp_path):
    ds = packed(tmp_path, [{"prompt": "ab", "response": "c"}], seq_length=4)
    assert ds.row(0)["terminal"].tolist() == [False, False, False, True]
    assert ds.report.problem_counts == {}


def test_truncated_document_fills_its_own_row(tmp_path):
    records = [{"prompt": "a", "response": "b"}, {"prompt": "abc", "response": "defgh"}]
    ds = packed(tmp_path, records, seq_length=5)
    assert [ds.row(r)["document_ids"].tolist() for r in range(len(ds))] == [
        [0, 0, 0, -1, -1],
        [1, 1, 1, 1, 1],
    ]


def test_prompt_leaving_no_response_token_in_window_is_dropped_and_counted(tmp_path):
    records = [
        {"prompt": "abcd", "response": "x"},  # response token at index 5 > seq_length: dropped
        {"prompt": "abc", "response": "x"},  # response token at index 4: predicted by position 3
    ]
    ds = packed(tmp_path, records, seq_length=4)
    assert len(ds) == 1
    row = ds.row(0)
    assert row["document_ids"].tolist() == [1, 1, 1, 1]
    assert row["loss_mask"].tolist() == [0, 0, 0, 1]
    assert ds.report.problem_counts == {"no_response_in_window": 1, "truncated": 1}
    assert ds.report.problem_examples["no_response_in_window"] == [f"{tmp_path / 'd.jsonl'}:1"]


def test_strict_mode_raises_on_truncation_with_file_and_line(tmp_path):
    records = [{"prompt": "a", "response": "b"}, {"prompt": "abc", "response": "defg"}]
    with pytest.raises(DataError, match=r"d\.jsonl:2: document longer than seq_length"):
        packed(tmp_path, records, seq_length=4, strict=True)


def test_no_usable_document_raises(tmp_path):
    with pytest.raises(DataError, match="no usable document"):
        packed(tmp_path, [{"prompt": "abcdefgh", "response": "x"}], seq_length=4)


def test_chat_loss_mask_covers_every_assistant_turn_only(tmp_path):
    messages = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "k"},
    ]
    ds = packed(tmp_path, [{"messages": messages}], seq_length=64)
    row = ds.row(0)
    trained = row["labels"][row["loss_mask"] == 1]
    assert CharTokenizer().decode(trained) == " yo\n k"
    assert trained[-1] == EOS
    assert row["terminal"].sum() == 1 and row["labels"][row["terminal"]][0] == EOS
    text = CharTokenizer().decode(row["tokens"])
    assert text == "System: be kind\nUser: hi\nAssistant: yo\nUser: ok\nAssistant: k"


def test_block_causal_attention_mask_exact():
    mask = block_causal_attention_mask(torch.tensor([[0, 0, 1, -1]]))
    allowed = [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],  # padding attends only itself
    ]
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    assert (~mask[0, 0]).int().tolist() == allowed


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=12),
    seq_length=st.integers(3, 14),
)
def test_packing_invariants_on_random_documents(lengths, seq_length):
    records = [{"prompt": "p" * p, "response": "r" * r} for p, r in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(os.path.join(tmp, "d.jsonl"), records)
        try:
            ds = SFTDataset(path, CharTokenizer(), seq_length)
        except DataError:
            assert all(1 + p > seq_length for p, _ in lengths)  # nothing usable
            return
        rows = [ds.row(r) for r in range(len(ds))]
    kept = [i for i, (p, _) in enumerate(lengths) if 1 + p <= seq_length]
    placed = []
    for row in rows:
        doc_ids = row["document_ids"]
        starts = np.flatnonzero(row["position_ids"] == 0)
        for start in starts[doc_ids[starts] >= 0]:
            doc = int(doc_ids[start])
            span = np.flatnonzero(doc_ids == doc)
            assert span[0] == start and np.array_equal(span, np.arange(start, start + len(span)))
            p, r = lengths[doc]
            positions = 2 + p + r - 1  # [BOS] + prompt + response + [EOS], minus one
            assert len(span) == min(positions, seq_length)
            assert row["position_ids"][span].tolist() == list(range(len(span)))
            assert row["loss_mask"][span].sum() == len(span) - p
            assert row["terminal"][span].tolist() == [False] * (len(span) - 1) + [
                positions <= seq_length
            ]
            assert np.array_equal(row["labels"][span][:-1], row["tokens"][span][1:])
            placed.append(doc)
    assert placed == kept
    counts = ds.report.problem_counts
    assert counts.get("no_response_in_window", 0) == len(lengths) - len(kept)
    truncated = sum(1 + p + r > seq_length for p, r in (lengths[i] for i in kept))
    assert counts.get("truncated", 0) == truncated
