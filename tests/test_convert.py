"""Hugging Face <-> megatron-irl conversion, checked against transformers' own model classes.

Tiny models (2 layers, hidden 64, 4 heads, 2 key/value heads, a 98-token vocabulary that
the Megatron side pads) are made with transformers and saved as safetensors; Megatron runs
on gloo ranks (megatron_irl.testing.run_distributed) at the layout under test.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from megatron_irl.config import ConfigError  # noqa: E402
from megatron_irl.convert import (  # noqa: E402
    ConversionError,
    convert_to_hf,
    import_checkpoint,
    plan_import,
)
from megatron_irl.convert.families import vocab_divisor  # noqa: E402
from megatron_irl.convert.mapping import QKV, RULES, VOCAB_ROWS, Dims  # noqa: E402
from megatron_irl.testing import run_distributed  # noqa: E402
from helpers import make_ascii_tokenizer, read_safetensors  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = torch.tensor([[1, 40, 41, 52, 60, 3, 77, 90, 12, 5, 33, 70],
                       [1, 9, 8, 7, 6, 50, 51, 52, 53, 20, 21, 97]])
ATOL = 1e-4


# ------------------------------------------------------------------ Hugging Face side


def make_hf_model(directory: str, family: str, tie: bool, seed: int = 0):
    """A random tiny ``<family>ForCausalLM`` saved (safetensors) with its tokenizer."""
    vocab_size = make_ascii_tokenizer(directory)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
        rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        max_position_embeddings=256)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # random norms and q/k/v biases, so that a swapped tensor shows
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


# ------------------------------------------------------------------ Megatron side (ranks)


def rank_import(hf_dir: str, output_dir: str, dtype: str = "float32") -> None:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    plan = plan_import(hf_dir, tp, world_size=tp * ps.get_pipeline_model_parallel_world_size(),
                       dtype=dtype)
    import_checkpoint(plan, output_dir)


def rank_logits(load_dir: str, tokens: torch.Tensor):
    """Load the latest checkpoint in ``load_dir`` as ``--finetune`` does, into this layout's
    model built from the checkpoint's own config; the full logits [b, s, v_padded] on the
    first rank of the last stage, None elsewhere. Plain causal mask."""
    import json

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_irl.config import TrainConfig
    from megatron_irl.core.checkpoint import iteration_dir, latest_iteration, load_checkpoint
    from megatron_irl.core.model import build_model_chunks
    from megatron_irl.core.vocabulary import real_vocab_size
    from megatron_irl.data import load_tokenizer

    directory = iteration_dir(load_dir, latest_iteration(load_dir))
    with open(os.path.join(directory, "training_state.json"), encoding="utf-8") as file:
        saved = json.load(file)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    cfg = TrainConfig.from_dict({"model": saved["config"]["model"], "parallel": {
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}})
    tokenizer = load_tokenizer(saved["config"]["data"]["tokenizer_model"])
    (chunk,) = build_model_chunks(cfg, real_vocab_size(cfg.model, tokenizer.vocab_size))
    load_checkpoint(load_dir, [chunk], load_optimizer=False, load_rng=False)
    chunk.eval()
    b, s = tokens.shape
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s)
    positions = torch.arange(s).expand(b, s)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(s, b, cfg.model.hidden_size)
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            chunk.set_input_tensor(hidden)
        output = chunk(tokens, positions, mask)
        if not ps.is_pipeline_last_stage():
            dist.send(output.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
        logits = gather_from_tensor_model_parallel_region(output)  # [b, s, v_padded]
    return logits if ps.get_tensor_model_parallel_rank() == 0 else None


def megatron_logits(load_dir: str, tp: int, pp: int) -> torch.Tensor:
    results = run_distributed(rank_logits, tp * pp, tp=tp, pp=pp, args=(load_dir, TOKENS))
    return next(result for result in results if result is not None)


def import_at(hf_dir: str, output_dir: str, tp: int, pp: int, dtype: str = "float32") -> None:
    run_distributed(rank_import, tp * pp, tp=tp, pp=pp, args=(hf_dir, output_dir, dtype))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` in the repository; a free MASTER_PORT for single-process runs."""
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def assert_logits_match(megatron: torch.Tensor, transformers_logits: torch.Tensor) -> None:
    vocab = transformers_logits.shape[-1]
    torch.testing.assert_close(megatron[..., :vocab], transformers_logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ tests: import


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_imported_llama_logits_match_transformers_at_each_layout(tmp_path, tp, pp):
    hf = make_hf_model(str(tmp_path / "hf"), "Llama", tie=False)
    import_at(str(tmp_path / "hf"), str(tmp_path / "mg"), tp, pp)
    logits = megatron_logits(str(tmp_path / "mg"), tp, pp)
    expected = hf_logits(hf)
    assert_logits_match(logits, expected)
    assert logits.shape[-1] == 128  # 98 tokens padded to make_vocab_size_divisible_by
    assert torch.all(logits[..., expected.shape[-1]:] == 0)  # padded rows are zero


def test_imported_qwen2_with_qkv_bias_and_tied_embeddings_matches_transformers(tmp_path):
    hf = make_hf_model(str(tmp_path / "hf"), "Qwen2", tie=True)
    import_at(str(tmp_path / "hf"), str(tmp_path / "mg"), 2, 1)
    assert_logits_match(megatron_logits(str(tmp_path / "mg"), 2, 1), hf_logits(hf))


def test_checkpoint_imported_at_one_layout_loads_at_another(tmp_path):
    hf = make_hf_model(str(tmp_path / "hf"), "Mistral", tie=False)
    import_at(str(tmp_path / "hf"), str(tmp_path / "mg"), 1, 2)
    assert_logits_match(megatron_logits(str(tmp_path / "mg"), 2, 2), hf_logits(hf))


def test_bfloat16_checkpoint_loads_into_an_fp32_model(tmp_path):
    hf = make_hf_model(str(tmp_path / "hf"), "Llama", tie=True)
    import_at(str(tmp_path / "hf"), str(tmp_path / "mg"), 2, 1, dtype="bfloat16")
    with torch.no_grad():  # the weights the checkpoint holds: a bf16 Megatron model keeps
        for parameter in hf.parameters():  # every weight in bf16, norms included (as
            parameter.copy_(parameter.to(torch.bfloat16))  # Megatron-LM's Float16Module)
    assert_logits_match(megatron_logits(str(tmp_path / "mg"), 1, 2), hf_logits(hf))


def test_model_yaml_holds_the_model_section_the_trainer_needs(tmp_path):
    make_hf_model(str(tmp_path / "hf"), "Mistral", tie=True)
    import_at(str(tmp_path / "hf"), str(tmp_path / "mg"), 2, 1)
    with open(tmp_path / "mg" / "model.yaml", encoding="utf-8") as file:
        text = file.read()
    converted = yaml.safe_load(text)
    assert converted["model"] == {
        "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
        "num_query_groups": 2, "kv_channels": 16, "max_position_embeddings": 256,
        "normalization": "RMSNorm", "norm_epsilon": 1e-5, "swiglu": True,
        "position_embedding_type": "rope", "rotary_base": 500000, "use_rope_scaling": False,
        "rope_scaling_factor": 8.0, "rotary_percent": 1.0, "qk_layernorm": False,
        "untie_embeddings_and_output_weights": False, "add_bias_linear": False,
        "add_qkv_bias": False, "init_method_std": 0.02, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "make_vocab_size_divisible_by": 128, "vocab_size": 98}
    assert converted["checkpoint"] == {"load": str(tmp_path / "mg"), "finetune": True}
    assert converted["data"] == {"tokenizer_model": str(tmp_path / "mg")}
    assert "sliding_window 4096" in text  # Mistral's window is noted, not silently dropped


# ------------------------------------------------------------------ tests: export


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """A tied Qwen2 model converted HF -> Megatron by the command-line tool (one process,
    TP 1, PP 1), then back to HF. Returns (original dir, Megatron dir, exported dir, model)."""
    root = tmp_path_factory.mktemp("round_trip")
    hf_dir, mg_dir, out_dir = (str(root / name) for name in ("hf", "mg", "out"))
    model = make_hf_model(hf_dir, "Qwen2", tie=True, seed=1)
    imported = run_tool("-m", "megatron_irl", "convert", "from-hf", "--hf-dir", hf_dir, "--output", mg_dir)
    assert imported.returncode == 0, imported.stderr[-3000:]
    convert_to_hf(mg_dir, out_dir, max_shard_bytes=40_000)  # several shards and an index
    return hf_dir, mg_dir, out_dir, model


def test_round_trip_gives_bit_identical_weights(round_trip):
    hf_dir, _, out_dir, _ = round_trip
    original, exported = read_safetensors(hf_dir), read_safetensors(out_dir)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name


def test_exported_model_loads_in_transformers_without_missing_keys(round_trip):
    hf_dir, _, out_dir, original = round_trip
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, output_loading_info=True)
    assert type(model) is transformers.Qwen2ForCausalLM
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == \
        (set(), set(), set())
    assert_logits_match(hf_logits(model.eval()), hf_logits(original))
    assert transformers.AutoTokenizer.from_pretrained(out_dir).encode("ab") == [13, 14]


def test_export_writes_safetensors_shards_with_an_index_and_no_pickle(round_trip):
    out_dir = round_trip[2]
    with open(os.path.join(out_dir, "model.safetensors.index.json"), encoding="utf-8") as file:
        index = json.load(file)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(
        name for name in os.listdir(out_dir) if name.endswith(".safetensors"))
    assert not [name for name in os.listdir(out_dir) if name.endswith((".bin", ".pt", ".pth"))]


def test_finetuned_checkpoint_exports_and_generates_with_transformers(tmp_path):
    """Fine-tune an imported Llama a few steps with the real trainer, export it, check that
    transformers reproduces Megatron's logits and generates."""
    hf_dir, mg_dir, run_dir, out_dir = (str(tmp_path / n) for n in ("hf", "mg", "run", "out"))
    original = make_hf_model(hf_dir, "Llama", tie=False)
    import_at(hf_dir, mg_dir, 2, 1)
    with open(os.path.join(REPO, "examples", "tiny.yaml"), encoding="utf-8") as file:
        config = yaml.safe_load(file)
    with open(os.path.join(mg_dir, "model.yaml"), encoding="utf-8") as file:
        converted = yaml.safe_load(file)
    config.update(model={**converted["model"], "seq_length": 96},
                  checkpoint={**converted["checkpoint"], "save": run_dir},
                  training={**config["training"], "train_iters": 3, "eval_interval": 3,
                            "eval_iters": 1},
                  optimizer={**config["optimizer"], "lr_warmup_iters": 1},
                  logging={"log_interval": 1})
    config["data"].update(tokenizer_model=converted["data"]["tokenizer_model"])
    for key in ("train_data_path", "valid_data_path"):
        config["data"][key] = os.path.join(REPO, config["data"][key])
    config_path = tmp_path / "finetune.yaml"
    config_path.write_text(yaml.safe_dump(config))
    trained = run_tool("-m", "megatron_irl", "train", "--config", str(config_path))
    assert trained.returncode == 0, trained.stderr[-3000:]
    convert_to_hf(run_dir, out_dir)

    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tuned = hf_logits(model)
    assert not torch.allclose(tuned, hf_logits(original), atol=1e-3)  # training moved it
    assert_logits_match(megatron_logits(run_dir, 2, 1), tuned)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    prompt = tokenizer("Q: What is 1 plus 1?", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 4)


# ------------------------------------------------------------------ tests: sentencepiece export


SENTENCEPIECE_MODEL = os.path.join(REPO, "examples", "data", "tokenizer.model")
SAMPLE_TEXT = "Q: What is 17 plus 14?\nA: It is 31.\nQ: Count the letters in cat."


def rank_save_model_and_logits(save_dir: str, tokenizer_model: str, tokens: torch.Tensor):
    """Save examples/tiny.yaml's model, trained with ``tokenizer_model``, as an iteration-0
    checkpoint (random weights, random norm weights), then reload it as :func:`rank_logits`
    does; the logits [b, s, v_padded]. One rank."""
    from megatron_irl.config import TrainConfig
    from megatron_irl.core.checkpoint import TrainingState, save_checkpoint
    from megatron_irl.core.model import build_model_chunks
    from megatron_irl.data import load_tokenizer

    with open(os.path.join(REPO, "examples", "tiny.yaml"), encoding="utf-8") as file:
        model = yaml.safe_load(file)["model"]
    # 128 pads the 320 pieces to 384 rows, so that the export has padding to remove.
    cfg = TrainConfig.from_dict({"model": {**model, "make_vocab_size_divisible_by": 128},
                                 "data": {"tokenizer_model": tokenizer_model}})
    (chunk,) = build_model_chunks(cfg, load_tokenizer(tokenizer_model).vocab_size)
    with torch.no_grad():  # so that a swapped norm weight shows in the logits
        for name, parameter in chunk.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.1)
    save_checkpoint(save_dir, TrainingState(0, 0, cfg.to_dict()), [chunk], optimizer=None,
                    scheduler=None)
    return rank_logits(save_dir, tokens)


@pytest.fixture(scope="module")
def sentencepiece_export(tmp_path_factory):
    """A checkpoint whose ``--tokenizer-model`` is the bundled sentencepiece model, exported
    with the tokenizer left to the checkpoint. Returns (exported dir, our tokenizer, the
    sample text's tokens [1, s] (BOS first, as the data pipeline does), Megatron's logits
    of them [1, s, v_padded])."""
    from megatron_irl.data.tokenizer import SentencePieceTokenizer

    root = tmp_path_factory.mktemp("sentencepiece")
    mg_dir, out_dir = str(root / "mg"), str(root / "out")
    tokenizer = SentencePieceTokenizer(SENTENCEPIECE_MODEL)
    tokens = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(SAMPLE_TEXT)]])
    (logits,) = run_distributed(rank_save_model_and_logits, 1,
                                args=(mg_dir, SENTENCEPIECE_MODEL, tokens))
    convert_to_hf(mg_dir, out_dir)
    return out_dir, tokenizer, tokens, logits


def test_sentencepiece_export_loads_as_a_llama_tokenizer_with_our_ids(sentencepiece_export):
    out_dir, tokenizer, tokens, _ = sentencepiece_export
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= \
        set(os.listdir(out_dir))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert type(hf_tokenizer) is transformers.LlamaTokenizer
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id,
            hf_tokenizer.unk_token_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, 0)
    assert hf_tokenizer(SAMPLE_TEXT)["input_ids"] == tokens[0].tolist()  # BOS added, no EOS
    with open(os.path.join(REPO, "examples", "data", "valid.jsonl"), encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    for text in [record["prompt"] + record["response"] for record in records[:50]]:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert hf_tokenizer.decode(tokens[0], skip_special_tokens=True) == SAMPLE_TEXT


def test_sentencepiece_export_config_has_the_piece_count_and_the_models_special_ids(
        sentencepiece_export):
    out_dir, tokenizer, _, _ = sentencepiece_export
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as file:
        config = json.load(file)
    assert config["vocab_size"] == tokenizer.vocab_size == 320
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (1, 2, 3) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


def test_sentencepiece_export_logits_match_megatron(sentencepiece_export):
    out_dir, _, tokens, megatron = sentencepiece_export
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, output_loading_info=True)
    assert type(model) is transformers.LlamaForCausalLM
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == \
        (set(), set(), set())
    assert megatron.shape[-1] == 384
    with torch.no_grad():
        assert_logits_match(megatron, model.eval()(tokens).logits.float())


# ------------------------------------------------------------------ tests: refusals


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], '
                                          '"model_type": "gpt2"}')
    with pytest.raises(ConversionError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM.*"
                                              "MistralForCausalLM.*Qwen2ForCausalLM.*"
                                              "Qwen3ForCausalLM"):
        plan_import(str(tmp_path), 1)


def test_tensor_parallel_size_not_dividing_query_groups_is_refused_in_the_plan(tmp_path):
    make_hf_model(str(tmp_path), "Llama", tie=False)
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 4 must divide "
                                          "num_query_groups 2"):
        plan_import(str(tmp_path), 4)


def test_vocab_padding_covers_embedding_rows_beyond_the_tokenizer():
    # Qwen2-style: 151665 tokenizer tokens, 151936 embedding rows.
    assert vocab_divisor(151665, 151936, 1, None) == 512  # pads to 152064
    assert vocab_divisor(151665, 151936, 8, None) == 512
    assert vocab_divisor(151665, 151936, 3, None) == 768  # lcm(128, 3) doubled: 152064
    with pytest.raises(ConfigError, match="--make-vocab-size-divisible-by 128"):
        vocab_divisor(151665, 151936, 1, 128)


# ------------------------------------------------------------------ tests: the table


def test_qkv_fusion_interleaves_query_heads_with_their_group_key_and_value():
    dims = Dims(num_attention_heads=4, num_query_groups=2, kv_channels=1, vocab_size=1,
                padded_vocab_size=1)
    q, k, v = torch.tensor([[0.], [1], [2], [3]]), torch.tensor([[10.], [11]]), \
        torch.tensor([[20.], [21]])
    fused = QKV.to_megatron((q, k, v), dims)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(QKV.to_hf(fused, dims), (q, k, v)))


def test_every_rule_round_trips_its_tensors():
    dims = Dims(num_attention_heads=4, num_query_groups=2, kv_channels=3, vocab_size=5,
                padded_vocab_size=8)
    for rule in RULES:
        shapes = {"QKV": [(12, 6), (6, 6), (6, 6)], "VOCAB": [(5, 6)]}
        key = "QKV" if rule.transform is QKV else "VOCAB" if rule.transform is VOCAB_ROWS else None
        tensors = [torch.randn(shape) for shape in shapes.get(key, [(4, 6)] * len(rule.hf))]
        back = rule.transform.to_hf(rule.transform.to_megatron(tensors, dims), dims)
        assert len(back) == len(tensors) and all(map(torch.equal, back, tensors)), rule.megatron
