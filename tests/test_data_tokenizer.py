"""Loading Hugging Face tokenizer directories and sentencepiece models."""

import json
import os

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from megatron_irl.data import DataError, load_tokenizer

EXAMPLE_MODEL = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "tokenizer.model")
VOCAB = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5}


def hf_dir(tmp_path, config=None, special_map=None):
    """A tokenizer directory with a word-level tokenizer.json whose post-processor adds <s>."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    files = {"tokenizer_config.json": config, "special_tokens_map.json": special_map}
    for name, content in files.items():
        if content is not None:
            (tmp_path / name).write_text(json.dumps(content))
    return str(tmp_path)


def test_hf_directory_reads_special_tokens_from_tokenizer_config(tmp_path):
    tok = load_tokenizer(
        hf_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    )
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 6)
    assert tok.encode("hello world") == [4, 5]  # no special tokens added by encode
    assert tok.decode([1, 4, 5, 2]) == "hello world"


def test_hf_special_tokens_map_with_added_token_dicts_and_pad_fallback(tmp_path):
    special = {"eos_token": {"content": "</s>", "lstrip": False}, "bos_token": {"content": "<s>"}}
    tok = load_tokenizer(hf_dir(tmp_path, special_map=special))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)


def test_hf_add_bos_token_false_means_no_bos(tmp_path):
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}
    assert load_tokenizer(hf_dir(tmp_path, config)).bos_id is None


def test_hf_bos_equal_to_eos_means_no_bos(tmp_path):
    config = {"bos_token": "</s>", "eos_token": "</s>"}
    assert load_tokenizer(hf_dir(tmp_path, config)).bos_id is None


def test_hf_tokenizer_json_path_is_accepted(tmp_path):
    hf_dir(tmp_path, {"eos_token": "</s>"})
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).eos_id == 2


def test_hf_without_eos_raises(tmp_path):
    with pytest.raises(DataError, match="no eos_token"):
        load_tokenizer(hf_dir(tmp_path, {"bos_token": "<s>"}))


def test_hf_special_token_outside_vocabulary_raises(tmp_path):
    with pytest.raises(DataError, match="eos_token '<eos>' is not in the vocabulary"):
        load_tokenizer(hf_dir(tmp_path, {"eos_token": "<eos>"}))


def test_sentencepiece_model_loads_with_its_ids():
    tok = load_tokenizer(EXAMPLE_MODEL)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 320)
    text = "Q: What is 3 plus 4?\nA:"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.bos_id] + tok.encode("It is 7.") + [tok.eos_id]) == "It is 7."


def test_missing_path_raises(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_tokenizer(str(tmp_path / "nope"))


def test_directory_without_tokenizer_json_raises(tmp_path):
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_unknown_file_type_raises(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(DataError, match="expected a Hugging Face tokenizer directory"):
        load_tokenizer(str(tmp_path / "vocab.txt"))


def test_corrupt_sentencepiece_model_raises(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a loadable sentencepiece model"):
        load_tokenizer(str(tmp_path / "bad.model"))


def test_truncated_tokenizer_json_names_the_file(tmp_path):
    directory = hf_dir(tmp_path, config={"eos_token": "</s>"})
    path = tmp_path / "tokenizer.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(DataError, match=f"{path}: not a readable tokenizer"):
        load_tokenizer(directory)
