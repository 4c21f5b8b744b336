"""The bundled example data, its generators and the preprocessing CLI."""

import importlib.util
import os
import subprocess
import sys

from megatron_irl.commands import preprocess
from megatron_irl.data import SFTDataset, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "data")


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_bundled_data_is_small_and_loads_without_problems():
    assert sum(os.path.getsize(os.path.join(DATA, f)) for f in os.listdir(DATA)) < 1_000_000
    tokenizer = load_tokenizer(os.path.join(DATA, "tokenizer.model"))
    for split, at_least in (("train", 1000), ("valid", 100)):
        ds = SFTDataset(os.path.join(DATA, f"{split}.jsonl"), tokenizer, seq_length=128)
        assert ds.report.num_records >= at_least and ds.report.problem_counts == {}


def test_example_data_and_tokenizer_are_reproducible_from_their_tools(tmp_path):
    tool = os.path.join(ROOT, "tools", "make_example_data.py")
    subprocess.run(
        [sys.executable, tool, "--output-dir", str(tmp_path)], check=True, capture_output=True
    )
    for split in ("train.jsonl", "valid.jsonl"):
        assert read(tmp_path / split) == read(os.path.join(DATA, split)), split
    load_tool("train_tokenizer").train_tokenizer(
        [str(tmp_path / "train.jsonl")], str(tmp_path / "tokenizer.model"), vocab_size=320
    )
    assert read(tmp_path / "tokenizer.model") == read(os.path.join(DATA, "tokenizer.model"))


def test_preprocess_cli_writes_a_prefix_the_dataset_reads(tmp_path):
    prefix = str(tmp_path / "valid")
    model = os.path.join(DATA, "tokenizer.model")
    args = ["--input", os.path.join(DATA, "valid.jsonl"), "--tokenizer", model]
    args += ["--output-prefix", prefix]
    assert preprocess.main(args) == 0
    tokenizer = load_tokenizer(model)
    from_prefix = SFTDataset(prefix, tokenizer, seq_length=64)
    from_jsonl = SFTDataset(os.path.join(DATA, "valid.jsonl"), tokenizer, seq_length=64)
    assert len(from_prefix) == len(from_jsonl)
    for name, value in from_jsonl.row(len(from_jsonl) - 1).items():
        assert (from_prefix.row(len(from_prefix) - 1)[name] == value).all(), name


def test_preprocess_cli_reports_bad_record_and_fails(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": 1}\n')
    args = ["--input", str(bad), "--tokenizer", os.path.join(DATA, "tokenizer.model")]
    assert preprocess.main(args + ["--output-prefix", str(tmp_path / "o")]) == 1
    assert f"{bad}:2:" in capsys.readouterr().err
