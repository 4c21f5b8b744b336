"""Reward extraction (docs/method.md section 5) on a real Megatron-Core model, CPU gloo ranks."""

from __future__ import annotations

import pytest
import torch

from megatron_irl.evaluation.inputs import ScoredPair, read_scored_pairs
from megatron_irl.evaluation.reward_analysis import rank_correlations
from megatron_irl.testing import run_distributed
from helpers import tiny_config, tiny_tokenizer

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


def _extract(directory: str, gamma: float = GAMMA, pairs=None):
    """(rewards, V(s_0), log-prob) of every pair, from the last pipeline stage."""
    from megatron.core import parallel_state

    from megatron_irl.evaluation.loading import load_inference_model
    from megatron_irl.evaluation.reward_extraction import extract_rewards

    cfg = tiny_config(parallel_state.get_tensor_model_parallel_world_size(),
                      parallel_state.get_pipeline_model_parallel_world_size())
    tokenizer = tiny_tokenizer()
    model = load_inference_model(cfg, directory, tokenizer.vocab_size)
    results = extract_rewards(model, pairs or _pairs(), gamma, micro_batch_size=2,
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


# ------------------------------------------------------------------ responses cut by the budget


def test_unfinished_sample_is_read_without_eos(tmp_path):
    tokenizer = tiny_tokenizer()
    data = tmp_path / "samples.jsonl"
    data.write_text('{"prompt": "Q: 1+1?\\nA:", "response": " 2", "finished": true}\n'
                    '{"prompt": "Q: 1+1?\\nA:", "response": " 2", "finished": false}\n')
    (finished, unfinished), _ = read_scored_pairs(str(data), tokenizer, "score")
    assert finished.tokens[-1] == tokenizer.eos_id and finished.finished
    assert unfinished.tokens == finished.tokens[:-1] and not unfinished.finished
    assert unfinished.segment_lengths[-1] == finished.segment_lengths[-1] - 1


def test_unfinished_response_is_truncated_not_terminal(tiny_checkpoint):
    """Cut before its EOS, a response keeps the rewards of its tokens but the last (whose next
    state is unknown), and its log-probability loses only log pi(EOS)."""
    finished = _pairs()
    unfinished = [ScoredPair(p.line, p.tokens[:-1], p.segment_lengths[:-1]
                             + [p.segment_lengths[-1] - 1], p.score, finished=False)
                  for p in finished]
    [(whole, cut)] = run_distributed(
        _extract_both, 1, args=(tiny_checkpoint, finished, unfinished))
    for (rewards, _, log_prob, _), (cut_rewards, _, cut_log_prob, _), pair in zip(
            whole, cut, finished):
        response_tokens = pair.segment_lengths[-1] - 1  # EOS not counted
        assert len(rewards) == response_tokens + 1 and len(cut_rewards) == response_tokens - 1
        assert cut_rewards == pytest.approx(rewards[:-2], abs=1e-5)
        assert cut_log_prob > log_prob  # without the (negative) log pi(EOS)


def _extract_both(directory, finished, unfinished):
    return _extract(directory, GAMMA, finished), _extract(directory, GAMMA, unfinished)


# ------------------------------------------------------------------ rank correlations


def _sample(setting, prompt, score, ret, log_prob, value):
    return {"setting": setting, "prompt": prompt, "score": score, "return": ret,
            "log_prob": log_prob, "value_initial": value}


def test_correlations_are_per_setting_within_and_across_prompts():
    # Within each prompt the return ranks the samples perfectly; across prompts the easy
    # prompt (high scores) has the lower returns; log pi ranks them backwards within.
    samples = [_sample("T=1", "easy", score, ret, -ret, 0.5)
               for score, ret in ((1.0, -3.0), (0.8, -4.0), (0.6, -5.0))]
    samples += [_sample("T=1", "hard", score, ret, -ret, 2.0)
                for score, ret in ((0.4, 3.0), (0.2, 2.0), (0.0, 1.0))]
    samples += [_sample("greedy", p, s, r, r, v) for p, s, r, v in (
        ("easy", 1.0, 2.0, 0.5), ("hard", 0.0, 1.0, 2.0), ("mid", 0.5, 1.5, 1.0))]
    report = rank_correlations(samples)
    sampled, greedy = report["T=1"], report["greedy"]
    assert (sampled["num_samples"], sampled["num_prompts"]) == (6, 2)
    assert sampled["within_prompt"]["return"] == pytest.approx(1.0)
    assert sampled["within_prompt"]["return_num_prompts"] == 2
    assert sampled["within_prompt"]["log_prob"] == pytest.approx(-1.0)
    assert sampled["within_prompt"]["value_initial"] is None  # one V(s_0) per prompt
    assert sampled["across_prompts"]["return"] == pytest.approx(-1.0)
    assert greedy["within_prompt"]["return"] is None  # one sample per prompt
    assert greedy["across_prompts"]["return"] == pytest.approx(1.0)
    assert greedy["across_prompts"]["value_initial"] == pytest.approx(-1.0)
