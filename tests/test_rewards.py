"""Reward extraction (PAPER.md section 5) on a real Megatron-Core model, CPU gloo ranks."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import tiny_config, tiny_tokenizer

from megatron_irl.evaluation.inputs import ScoredPair
from megatron_irl.testing import run_distributed

GAMMA = 0.9


def _pairs() -> list[ScoredPair]:
    from megatron_irl.data.documents import tokenize_segments

    tokenizer = tiny_tokenizer()
    texts = [("Q: What is 2 plus 2?\nA:", " 4"), ("Q: Is 7 odd?\nA:", " 7 is odd."),
             ("Q: Add 3 and 5.\nA:", " 3 plus 5 is 8.")]
    pairs = []
    for line, (prompt, response) in enumerate(texts, start=1):
        tokens, lengths = tokenize_segments(((prompt, False), (response, True)), tokenizer)
        pairs.append(ScoredPair(line, tokens, lengths, float(line)))
    return pairs


def _extract(directory: str, gamma: float = GAMMA):
    """(rewards, V(s_0), log-prob) of every pair, from the last pipeline stage."""
    from megatron.core import parallel_state

    from megatron_irl.evaluation.loading import load_inference_model
    from megatron_irl.evaluation.reward_extraction import extract_rewards

    cfg = tiny_config(parallel_state.get_tensor_model_parallel_world_size(),
                      parallel_state.get_pipeline_model_parallel_world_size())
    tokenizer = tiny_tokenizer()
    model = load_inference_model(cfg, directory, tokenizer.vocab_size)
    results = extract_rewards(model, _pairs(), gamma, micro_batch_size=2,
                              pad_id=tokenizer.pad_id)
    if results is None:
        return None
    return [(r.rewards, r.value_initial, r.log_prob, r.sequence_return) for r in results]


def _delta_of_the_loss_one_document_at_a_time(directory: str):
    """``delta`` of vocab_parallel_soft_q_loss on each document alone, at its response
    positions: what training computes for the same tokens."""
    from megatron_irl.data import block_causal_attention_mask
    from megatron_irl.data.documents import response_mask
    from megatron_irl.evaluation.loading import load_inference_model
    from megatron_irl.loss import vocab_parallel_soft_q_loss

    tokenizer = tiny_tokenizer()
    model = load_inference_model(tiny_config(), directory, tokenizer.vocab_size)
    deltas = []
    for pair in _pairs():
        tokens = torch.tensor(pair.tokens)
        inputs, labels = tokens[None, :-1], tokens[None, 1:]
        trained = torch.from_numpy(response_mask(pair.segment_lengths)[1:])[None]
        terminal = torch.zeros_like(trained)
        terminal[0, -1] = True
        with torch.no_grad():
            logits = model(inputs, torch.arange(inputs.shape[1])[None],
                           block_causal_attention_mask(torch.zeros_like(inputs)))
            out = vocab_parallel_soft_q_loss(logits, labels, trained.float(), terminal,
                                             lam=0.0, gamma=GAMMA)
        deltas.append(out.delta[trained].tolist())
    return deltas


@pytest.fixture(scope="module")
def extracted(tiny_checkpoint):
    return {layout: [r for r in run_distributed(_extract, tp * pp, tp=tp, pp=pp,
                                                args=(tiny_checkpoint,)) if r is not None]
            for layout, (tp, pp) in {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}.items()}


def test_rewards_equal_the_loss_delta_on_the_same_documents(tiny_checkpoint, extracted):
    [expected] = run_distributed(_delta_of_the_loss_one_document_at_a_time, 1,
                                 args=(tiny_checkpoint,))
    [results] = extracted["tp1"]
    for (rewards, *_), delta in zip(results, expected):
        assert len(rewards) == len(delta) > 0
        assert rewards == pytest.approx(delta, abs=1e-5)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_rewards_at_another_layout_equal_tp1(extracted, layout):
    [reference] = extracted["tp1"]
    for results in extracted[layout]:
        for (rewards, value, log_prob, _), (ref_rewards, ref_value, ref_lp, _) in zip(
                results, reference):
            assert rewards == pytest.approx(ref_rewards, abs=1e-4)
            assert value == pytest.approx(ref_value, abs=1e-4)
            assert log_prob == pytest.approx(ref_lp, abs=1e-4)


def test_with_gamma_one_the_return_is_log_prob_plus_initial_value(tiny_checkpoint):
    [results] = run_distributed(_extract, 1, args=(tiny_checkpoint,), kwargs={"gamma": 1.0})
    for _, value_initial, log_prob, sequence_return in results:
        assert sequence_return == pytest.approx(log_prob + value_initial, abs=1e-4)


def test_sequence_return_is_the_sum_of_the_rewards(extracted):
    [results] = extracted["tp1"]
    for rewards, _, _, sequence_return in results:
        assert sequence_return == pytest.approx(sum(rewards))
