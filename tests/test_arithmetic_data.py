"""The arithmetic word-problem task (tools/make_arithmetic_data.py) and its bundled files."""

import importlib.util
import json
import os
import random
import statistics

import pytest

from megatron_irl.data import SFTDataset, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "arithmetic")
SMALL = {"train": 200, "valid": 40, "test": 40, "pretrain": 100}


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = load_tool("make_arithmetic_data")


def read_lines(split):
    with open(os.path.join(DATA, f"{split}.jsonl"), encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def small():
    return gen.make_dataset(7, SMALL)


def test_generation_is_deterministic_per_seed(small):
    assert gen.make_dataset(7, SMALL)[1] == small[1]
    assert gen.make_dataset(8, SMALL)[1]["train"] != small[1]["train"]


def test_every_response_is_a_checked_worked_solution_of_its_answer(small):
    for split in ("train", "valid", "test"):
        for problem, r in zip(small[0][split], small[1][split]):
            assert r["answer"] == str(problem.answer) and problem.answer >= 1
            assert r["response"].endswith(f"\n#### {r['answer']}")
            assert gen.check_response(r["prompt"], r["response"], r["answer"]) == [], r


def test_check_response_rejects_a_wrong_step_an_unfounded_operand_and_a_wrong_answer():
    prompt = "Q: Tom has 3 bags of 4 apples. He buys 5 more apples. How many?\nA:"
    assert gen.check_response(prompt, " 3 x 4 = 12.\n12 + 5 = 17.\n#### 17", "17") == []
    assert gen.check_response(prompt, " 3 x 4 = 12.\n12 + 5 = 18.\n#### 18", "17")
    assert gen.check_response(prompt, " 3 x 4 = 12.\n12 + 6 = 18.\n#### 18", "18")
    assert gen.check_response(prompt, " 3 x 4 = 12.\n12 + 5 = 17.\n#### 12", "17")
    assert gen.check_response(prompt, " It is 17.\n#### 17", "17")


def test_splits_hold_disjoint_problems(small):
    problems = small[0]
    for a, b in [("train", "valid"), ("train", "test"), ("valid", "test"),
                 ("pretrain", "train"), ("pretrain", "valid"), ("pretrain", "test")]:
        assert not {p.key for p in problems[a]} & {p.key for p in problems[b]}, (a, b)


def test_bundled_splits_hold_disjoint_prompts():
    prompts = {s: {json.loads(line)["prompt"] for line in read_lines(s)}
               for s in ("train", "valid", "test")}
    assert not prompts["train"] & prompts["valid"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["valid"] & prompts["test"]


def test_a_typical_prompt_has_several_distinct_valid_solutions(small):
    counts = []
    for problem in small[0]["train"][:20]:
        prompt = gen.prompt_of(problem)
        solutions = {gen.write_solution(problem, random.Random(k)) for k in range(40)}
        for response in solutions:
            assert gen.check_response(prompt, response, str(problem.answer)) == []
        step_orders = {tuple(gen.solution_steps(problem, random.Random(k))) for k in range(40)}
        counts.append((len(solutions), len(step_orders)))
    assert statistics.median(c[0] for c in counts) >= 15  # of 40 draws
    assert all(c[1] >= 2 for c in counts)  # every problem: several orders of steps


def test_bundled_files_equal_a_fresh_generation():
    sizes = {split: len(read_lines(split)) for split in gen.SPLITS}
    assert sizes == gen.DEFAULT_SIZES
    records = gen.make_dataset(gen.DEFAULT_SEED, sizes)[1]
    for split in gen.SPLITS:
        assert [json.dumps(r) for r in records[split]] == read_lines(split), split


def test_bundled_tokenizer_is_reproducible_from_its_tool(tmp_path):
    inputs = [os.path.join(DATA, "pretrain.jsonl"), os.path.join(DATA, "train.jsonl")]
    output = str(tmp_path / "tokenizer.model")
    load_tool("train_tokenizer").train_tokenizer(inputs, output, 320, split_digits=True)
    with open(output, "rb") as fresh, open(os.path.join(DATA, "tokenizer.model"), "rb") as kept:
        assert fresh.read() == kept.read()


def test_bundled_tokenizer_splits_digits_and_fits_documents_in_128_positions():
    tokenizer = load_tokenizer(os.path.join(DATA, "tokenizer.model"))
    digits = [tokenizer.decode([i]) for i in tokenizer.encode(" 1234 + 56")]
    assert [d for d in digits if d.strip().isdigit()] == ["1", "2", "3", "4", "5", "6"]
    for split in ("train", "valid", "test"):
        ds = SFTDataset(os.path.join(DATA, f"{split}.jsonl"), tokenizer, seq_length=128)
        assert ds.report.problem_counts == {}, split  # nothing truncated or dropped
        records = [json.loads(line) for line in read_lines(split)]
        assert max(len(tokenizer.encode(r["response"])) for r in records) <= 60, split


def test_bundled_pretraining_documents_are_trained_on_their_whole_text():
    tokenizer = load_tokenizer(os.path.join(DATA, "tokenizer.model"))
    ds = SFTDataset(os.path.join(DATA, "pretrain.jsonl"), tokenizer, seq_length=128)
    report = ds.report
    assert report.problem_counts == {} and report.num_documents == gen.DEFAULT_SIZES["pretrain"]
    # [BOS] + text + [EOS]: every position after BOS predicts a trained token.
    tokens = sum(len(tokenizer.encode(json.loads(line)["response"])) + 1
                 for line in read_lines("pretrain"))
    assert report.num_trained_positions == tokens


def test_bundled_data_is_small():
    assert sum(os.path.getsize(os.path.join(DATA, f)) for f in os.listdir(DATA)) < 5_000_000
