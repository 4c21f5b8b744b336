"""Models imported from Hugging Face, whose vocabulary gets padded, score like transformers.

Tiny random Llama, Mistral and Qwen2 models (tests/test_convert.py's shapes) with a 98-token
tokenizer: Llama and Mistral have 98 embedding rows, Qwen2 100 (more rows than tokenizer tokens,
as the real Qwen2 has; transformers' softmax covers them all). The import pads them to 128
rows. ``megatron-irl rewards`` (its library path at TP 1 and TP 2, and the command itself at
TP 2 for Qwen2) must give the log-probabilities transformers computes, and generation, with the
padded logits made huge, must never emit a padded id and must report transformers'
log-probabilities for what it emitted.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_irl.testing import run_distributed  # noqa: E402
from helpers import make_ascii_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDING_ROWS = {"Llama": 98, "Mistral": 98, "Qwen2": 100}
TEXTS = [("Q: 2+2?\nA:", " 4"), ("Q: Is 7 odd?\nA:", " yes, 7 is odd."),
         ("Say hi.", " hi there!")]
ATOL = 1e-4
HUGE = 1e4  # the padded logits during generation


def _make_hf_model(directory: str, family: str, rows: int, seed: int):
    make_ascii_tokenizer(directory)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=family == "Qwen2",
        rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        max_position_embeddings=64)
    torch.manual_seed(seed)
    # The default init's logits are near 0, like the padded rows' (zero weights): padding
    # that kept probability would shift every log-probability by about log(128 / rows).
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _pairs(tokenizer_dir: str):
    from megatron_irl.data import load_tokenizer
    from megatron_irl.data.documents import tokenize_segments
    from megatron_irl.evaluation.inputs import ScoredPair

    tokenizer = load_tokenizer(tokenizer_dir)
    pairs = []
    for line, (prompt, response) in enumerate(TEXTS, start=1):
        tokens, lengths = tokenize_segments(((prompt, False), (response, True)), tokenizer)
        pairs.append(ScoredPair(line, tokens, lengths, None))
    return pairs


# ---------------------------------------------------------------- on the ranks


def _import(hf_dirs: dict, out_dirs: dict) -> None:
    from megatron_irl.convert import import_checkpoint, plan_import

    for family in hf_dirs:
        import_checkpoint(plan_import(hf_dirs[family], 2, world_size=1), out_dirs[family])


def _inference_model(load_dir: str):
    """The checkpoint's model at this layout, as ``megatron-irl rewards`` / ``eval`` load it
    (``evaluation.session``): its saved config, the real vocabulary resolved."""
    from megatron.core import parallel_state as ps

    from megatron_irl.core.vocabulary import real_vocab_size
    from megatron_irl.data import load_tokenizer
    from megatron_irl.evaluation.loading import (
        inference_config,
        load_inference_model,
        read_saved_run,
    )

    cfg = inference_config(read_saved_run(load_dir).config,
                           ps.get_tensor_model_parallel_world_size(), 1)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    cfg.model.vocab_size = real_vocab_size(cfg.model, tokenizer.vocab_size)
    return cfg, tokenizer, load_inference_model(cfg, load_dir, cfg.model.vocab_size)


def _score_and_generate(out_dirs: dict) -> dict:
    """Per family: the rewards' log-probabilities of every pair, and generations with the
    padded logits made huge (greedy and sampled, all prompts)."""
    from megatron.core import parallel_state as ps

    from megatron_irl.evaluation.reward_extraction import extract_rewards
    from megatron_irl.inference.generation import Generator, SamplingParams

    results = {}
    for family, load_dir in out_dirs.items():
        cfg, tokenizer, model = _inference_model(load_dir)
        pairs = _pairs(cfg.data.tokenizer_model)
        scored = extract_rewards(model, pairs, 1.0, micro_batch_size=2, pad_id=tokenizer.pad_id)
        vocab = cfg.model.vocab_size

        def huge_padding(module, args, output):  # the gathered [b, s, padded] logits
            output = output.clone()
            output[..., vocab:] = HUGE
            return output

        hook = model.register_forward_hook(huge_padding)
        generator = Generator(model, vocab, tokenizer.eos_id, 64,
                              ps.get_pipeline_model_parallel_group())
        prompts = [pair.tokens[:pair.segment_lengths[0]] for pair in pairs]
        generations = [
            (prompt, generation.tokens + ([tokenizer.eos_id] if generation.finished else []),
             generation.token_log_probs)
            for temperature in (0.0, 1.0)
            for prompt, generation in zip(prompts, generator.sample(
                prompts, SamplingParams(temperature=temperature, max_new_tokens=8), [7, 8, 9]))
        ]
        hook.remove()
        results[family] = dict(vocab_size=vocab, padded=model.vocab_size,
                               log_probs=[r.log_prob for r in scored], generations=generations)
    return results


# ---------------------------------------------------------------- transformers' side


def _hf_token_log_probs(model, tokens: list[int], first: int) -> list[float]:
    """log pi(tokens[t] | tokens[:t]) for t >= first, from transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    return [float(log_probs[t - 1, tokens[t]]) for t in range(first, len(tokens))]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> (transformers model, converted checkpoint directory); one import launch."""
    root = tmp_path_factory.mktemp("padded_vocab")
    models, hf_dirs, out_dirs = {}, {}, {}
    for seed, (family, rows) in enumerate(EMBEDDING_ROWS.items()):
        hf_dirs[family] = str(root / f"hf_{family}")
        out_dirs[family] = str(root / f"megatron_{family}")
        models[family] = _make_hf_model(hf_dirs[family], family, rows, seed)
    run_distributed(_import, 1, args=(hf_dirs, out_dirs), timeout=300)
    return models, out_dirs


@pytest.fixture(scope="module", params=[1, 2], ids=lambda tp: f"tp{tp}")
def scored(request, imported):
    models, out_dirs = imported
    tp = request.param
    (results, *_) = run_distributed(_score_and_generate, tp, tp=tp, args=(out_dirs,),
                                    timeout=300)
    return models, out_dirs, results


@pytest.mark.parametrize("family", list(EMBEDDING_ROWS))
def test_rewards_log_probs_equal_transformers_with_a_padded_vocabulary(scored, family):
    models, out_dirs, results = scored
    result = results[family]
    assert (result["vocab_size"], result["padded"]) == (EMBEDDING_ROWS[family], 128)
    expected = [sum(_hf_token_log_probs(models[family], pair.tokens, pair.segment_lengths[0]))
                for pair in _pairs(out_dirs[family])]
    assert result["log_probs"] == pytest.approx(expected, abs=ATOL)


@pytest.mark.parametrize("family", list(EMBEDDING_ROWS))
def test_generation_never_emits_a_padded_id_and_reports_transformers_log_probs(scored,
                                                                               family):
    models, _, results = scored
    vocab = results[family]["vocab_size"]
    for prompt, response, token_log_probs in results[family]["generations"]:
        assert response and all(0 <= token < vocab for token in response), response
        expected = _hf_token_log_probs(models[family], prompt + response, len(prompt))
        assert token_log_probs == pytest.approx(expected, abs=ATOL)


def test_rewards_command_at_tp2_gives_transformers_log_probs_for_qwen2(imported, tmp_path):
    models, out_dirs = imported
    pairs = _pairs(out_dirs["Qwen2"])
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in TEXTS))
    output = tmp_path / "rewards.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "megatron_irl", "rewards", "--load", out_dirs["Qwen2"], "--data", str(data),
         "--output", str(output), "--tensor-model-parallel-size", "2"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log_probs = [json.loads(line)["log_prob"] for line in output.read_text().splitlines()]
    expected = [sum(_hf_token_log_probs(models["Qwen2"], pair.tokens, pair.segment_lengths[0]))
                for pair in pairs]
    assert log_probs == pytest.approx(expected, abs=ATOL)
