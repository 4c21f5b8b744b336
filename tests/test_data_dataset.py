"""Batches: shuffling, resume by iteration, data-parallel shares, evaluation, preprocessed data."""

from collections import Counter

import numpy as np
import pytest
import torch

from megatron_irl.data import (
    DataError,
    EvalBatches,
    SFTDataset,
    TrainingBatches,
    preprocess_jsonl,
)
from megatron_irl.data.packing import ROW_FIELDS
from helpers import CharTokenizer, write_jsonl

SEQ = 16


def records(n):
    """Documents of 5..11 positions, each ending with a distinctive response."""
    return [
        {"prompt": f"q{i}" + "x" * (i % 4), "response": f" a{i}" + "y" * (i % 3)} for i in range(n)
    ]


@pytest.fixture
def jsonl(tmp_path):
    rows = records(40) + [{"prompt": "p", "response": ""}]  # one problem for the report
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.fixture
def dataset(jsonl):
    return SFTDataset(jsonl, CharTokenizer(), SEQ)


def batches(dataset, rank=0, dp=1, seed=7, mbs=2, nm=3):
    return TrainingBatches(
        dataset, mbs, nm, data_parallel_rank=rank, data_parallel_size=dp, seed=seed
    )


def assert_same_micro_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ROW_FIELDS:
            assert torch.equal(x[name], y[name]), name


def test_micro_batch_tensor_layout(dataset):
    (first, *_rest) = batches(dataset).batches_for_iteration(0)
    dtypes = {
        "tokens": torch.int64,
        "labels": torch.int64,
        "loss_mask": torch.float32,
        "terminal": torch.bool,
        "position_ids": torch.int64,
        "document_ids": torch.int64,
        "next_position": torch.int64,
    }
    assert {k: v.dtype for k, v in first.items()} == dtypes
    assert all(v.shape == (2, SEQ) for v in first.values())


def test_same_seed_gives_same_batches_and_other_seed_differs(dataset):
    a, b, c = batches(dataset, seed=7), batches(dataset, seed=7), batches(dataset, seed=8)
    assert_same_micro_batches(a.batches_for_iteration(3), b.batches_for_iteration(3))
    assert not np.array_equal(a.rows_for_iteration(0), c.rows_for_iteration(0))


def test_resume_at_iteration_is_exact_without_other_state(dataset):
    running = batches(dataset)
    seen = [running.batches_for_iteration(k) for k in range(12)]  # spans several epochs
    resumed = batches(dataset)
    for k in (5, 11, 7):
        assert_same_micro_batches(resumed.batches_for_iteration(k), seen[k])


def test_each_epoch_visits_every_row_once_in_a_new_order(dataset):
    num_rows = len(dataset)
    per_iteration = 6
    sampler = batches(dataset)
    stream = np.concatenate(
        [sampler.rows_for_iteration(k).ravel() for k in range(2 * num_rows // per_iteration + 2)]
    )
    first, second = stream[:num_rows], stream[num_rows : 2 * num_rows]
    assert sorted(first) == list(range(num_rows)) and sorted(second) == list(range(num_rows))
    assert not np.array_equal(first, second)


def test_data_parallel_shares_are_disjoint_and_cover_the_global_batch(dataset):
    dp, iteration = 3, 2
    shares = [
        batches(dataset, rank=r, dp=dp).rows_for_iteration(iteration).ravel() for r in range(dp)
    ]
    whole = batches(dataset, nm=3 * dp).rows_for_iteration(iteration).ravel()  # same global batch
    assert np.array_equal(np.concatenate(shares), whole)
    assert len(set(whole.tolist())) == len(whole) <= len(dataset)  # disjoint within one epoch


def test_eval_batches_cover_every_row_once_across_ranks(dataset):
    dp, mbs = 2, 3
    per_rank = [list(EvalBatches(dataset, mbs, r, dp)) for r in range(dp)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(EvalBatches(dataset, mbs, 0, dp))
    seen = Counter(
        tuple(row.tolist()) for rank in per_rank for mb in rank for row in mb["document_ids"]
    )
    padding = seen.pop(tuple([-1] * SEQ), 0)
    expected = Counter(tuple(dataset.row(i)["document_ids"].tolist()) for i in range(len(dataset)))
    assert seen == expected
    assert padding == dp * mbs * len(per_rank[0]) - len(dataset) < dp * mbs


def test_invalid_batch_arguments_name_the_flag(dataset):
    with pytest.raises(ValueError, match="--micro-batch-size"):
        TrainingBatches(dataset, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank 2 is outside"):
        TrainingBatches(dataset, 1, 1, data_parallel_rank=2, data_parallel_size=2)


def test_preprocessed_prefix_gives_identical_batches_and_report(jsonl, dataset, tmp_path):
    prefix = str(tmp_path / "pre" / "train")
    preprocess_jsonl(jsonl, CharTokenizer(), prefix)
    from_prefix = SFTDataset(prefix, CharTokenizer(), SEQ)
    for k in range(4):
        assert_same_micro_batches(
            batches(from_prefix, rank=1, dp=2).batches_for_iteration(k),
            batches(dataset, rank=1, dp=2).batches_for_iteration(k),
        )
    assert from_prefix.report == dataset.report
    assert np.array_equal(from_prefix.prompt_tokens(3), dataset.prompt_tokens(3))


def test_preprocessed_prefix_with_other_tokenizer_raises(jsonl, tmp_path):
    prefix = str(tmp_path / "train")
    preprocess_jsonl(jsonl, CharTokenizer(), prefix)
    with pytest.raises(DataError, match="preprocessed with a different tokenizer"):
        SFTDataset(prefix, CharTokenizer(bos=False), SEQ)


def test_strict_load_of_preprocessed_data_raises_on_recorded_problems(jsonl, tmp_path):
    prefix = str(tmp_path / "train")
    preprocess_jsonl(jsonl, CharTokenizer(), prefix)
    with pytest.raises(DataError, match=r"train\.jsonl:41: empty response"):
        SFTDataset(prefix, CharTokenizer(), SEQ, strict=True)


def test_unknown_data_path_raises(tmp_path):
    with pytest.raises(DataError, match="neither a .jsonl file nor a complete preprocessed prefix"):
        SFTDataset(str(tmp_path / "nothing"), CharTokenizer(), SEQ)
