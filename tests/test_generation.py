"""Generation and reward extraction on real Megatron-Core models (CPU, gloo ranks).

Every scenario loads the ``tiny_checkpoint`` fixture (random weights, saved at TP=1) at its
own layout with the inference loader, as ``megatron-irl eval`` does, so all layouts run
the same weights.
"""

from __future__ import annotations

import math
import pytest
import torch


from megatron_irl.inference.generation import SamplingParams, filter_logits
from megatron_irl.testing import run_distributed
from helpers import tiny_config, tiny_tokenizer

PROMPTS = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13], [1, 4]]
SEEDS = [11, 12, 13]


def _generator(directory: str, eos_id: int | None = None):
    from megatron.core import parallel_state

    from megatron_irl.evaluation.loading import load_inference_model
    from megatron_irl.inference.generation import Generator

    tokenizer = tiny_tokenizer()
    cfg = tiny_config(parallel_state.get_tensor_model_parallel_world_size(),
                       parallel_state.get_pipeline_model_parallel_world_size())
    model = load_inference_model(cfg, directory, tokenizer.vocab_size)
    return Generator(model, tokenizer.vocab_size,
                     tokenizer.eos_id if eos_id is None else eos_id,
                     cfg.model.max_position_embeddings,
                     parallel_state.get_pipeline_model_parallel_group())


def _as_tuples(generations):
    return [(g.tokens, g.finished, round(g.log_prob, 3), round(g.entropy, 3))
            for g in generations]


def _decode_everything(directory: str):
    """Greedy, sampled (two settings) and beam-searched responses of PROMPTS."""
    generator = _generator(directory)
    greedy = generator.sample(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10), SEEDS)
    sampled = generator.sample(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10),
                               SEEDS)
    nucleus = generator.sample(PROMPTS, SamplingParams(temperature=0.8, top_k=20, top_p=0.9,
                                                       max_new_tokens=10), SEEDS)
    beams = [generator.beam_search(p, 3, 10) for p in PROMPTS]
    return {"greedy": _as_tuples(greedy), "sampled": _as_tuples(sampled),
            "nucleus": _as_tuples(nucleus), "beam": _as_tuples(beams)}


def _teacher_forced_checks(directory: str):
    """Greedy responses, the argmax of full-sequence (cache-free) logits after each prefix,
    and the teacher-forced log-prob of each beam-search response."""
    from megatron_irl.data import block_causal_attention_mask

    generator = _generator(directory)
    greedy = generator.sample(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10), SEEDS)
    beam = generator.beam_search(PROMPTS[0], 3, 10, length_penalty=0.0)
    model = generator.model

    def log_probs(sequence):
        tokens = torch.tensor([sequence])
        positions = torch.arange(len(sequence))[None]
        mask = block_causal_attention_mask(torch.zeros_like(tokens))
        with torch.no_grad():
            logits = model(tokens, positions, mask)[0, :, : generator.vocab_size]
        return torch.log_softmax(logits.float(), dim=-1)  # [s, v]

    argmaxes = []
    for prompt, generation in zip(PROMPTS, greedy):
        sequence = prompt + generation.tokens
        argmaxes.append(log_probs(sequence)[len(prompt) - 1:].argmax(-1).tolist())
    sequence = PROMPTS[0] + beam.tokens
    beam_lp = log_probs(sequence)[len(PROMPTS[0]) - 1:-1].gather(
        -1, torch.tensor(beam.tokens)[:, None]).sum()
    return [g.tokens for g in greedy], argmaxes, beam.log_prob, float(beam_lp)


def _sample_alone_and_in_a_batch(directory: str):
    generator = _generator(directory)
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    alone = generator.sample([PROMPTS[1]], params, [SEEDS[1]])
    batched = generator.sample(PROMPTS, params, SEEDS)
    return alone[0].tokens, batched[1].tokens


def _stop_rules(directory: str):
    """A budget-limited greedy response, and the same with its 3rd token declared EOS."""
    budget = _generator(directory).sample([PROMPTS[0]], SamplingParams(0, max_new_tokens=5), [0])
    eos = budget[0].tokens[2]
    stopped = _generator(directory, eos_id=eos).sample(
        [PROMPTS[0]], SamplingParams(0, max_new_tokens=5), [0])
    return budget[0], stopped[0]


@pytest.fixture(scope="module")
def decoded(tiny_checkpoint):
    """Every rank's results at TP=1, TP=2 and PP=2."""
    return {layout: run_distributed(_decode_everything, tp * pp, tp=tp, pp=pp,
                                    args=(tiny_checkpoint,))
            for layout, (tp, pp) in {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}.items()}


def test_greedy_generation_equals_the_argmax_of_teacher_forced_logits(tiny_checkpoint):
    [(greedy, argmaxes, _, _)] = run_distributed(_teacher_forced_checks, 1, args=(tiny_checkpoint,))
    for tokens, argmax in zip(greedy, argmaxes):
        assert len(tokens) > 0
        assert tokens == argmax[: len(tokens)]


def test_beam_search_reports_the_teacher_forced_log_prob_of_its_response(tiny_checkpoint):
    [(_, _, reported, recomputed)] = run_distributed(_teacher_forced_checks, 1,
                                                     args=(tiny_checkpoint,))
    assert reported == pytest.approx(recomputed, abs=1e-4)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_generation_at_another_layout_equals_tp1(decoded, layout):
    reference = decoded["tp1"][0]
    for rank_result in decoded[layout]:
        for setting in ("greedy", "sampled", "nucleus", "beam"):
            tokens = [t for t, *_ in rank_result[setting]]
            assert tokens == [t for t, *_ in reference[setting]], setting
            for (_, _, lp, ent), (_, _, ref_lp, ref_ent) in zip(rank_result[setting],
                                                                reference[setting]):
                assert lp == pytest.approx(ref_lp, abs=2e-3)
                assert ent == pytest.approx(ref_ent, abs=2e-3)


def test_beam_size_one_equals_greedy(tiny_checkpoint):
    def tokens(setting):
        return [t for t, *_ in decoded_tp1[setting]]

    [decoded_tp1] = run_distributed(_decode_one_beam, 1, args=(tiny_checkpoint,))
    assert tokens("beam1") == tokens("greedy")


def _decode_one_beam(directory: str):
    generator = _generator(directory)
    greedy = generator.sample(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10), SEEDS)
    return {"greedy": _as_tuples(greedy),
            "beam1": _as_tuples([generator.beam_search(p, 1, 10) for p in PROMPTS])}


def test_sampling_differs_between_rows_and_from_greedy(decoded):
    tp1 = decoded["tp1"][0]
    sampled = [t for t, *_ in tp1["sampled"]]
    assert sampled != [t for t, *_ in tp1["greedy"]]
    assert len({tuple(t) for t in sampled}) == len(sampled)


def test_a_sample_depends_on_its_seed_not_on_its_batch(tiny_checkpoint):
    [(alone, batched)] = run_distributed(_sample_alone_and_in_a_batch, 1, args=(tiny_checkpoint,))
    assert alone == batched


def test_generation_stops_at_the_token_budget_or_at_eos(tiny_checkpoint):
    [(budget, stopped)] = run_distributed(_stop_rules, 1, args=(tiny_checkpoint,))
    assert len(budget.tokens) == 5 and not budget.finished
    assert stopped.tokens == budget.tokens[:2] and stopped.finished
    # One log-prob per generated token (the EOS included), summing to the response's.
    assert len(budget.token_log_probs) == 5 and len(stopped.token_log_probs) == 3
    assert sum(stopped.token_log_probs) == pytest.approx(stopped.log_prob, abs=1e-5)


def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [[False, True, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_k=0, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(probs.log(), top_k=0, top_p=0.01)).sum() == 1


def test_sampling_params_name_the_flag_of_a_bad_value():
    with pytest.raises(ValueError, match="--top-p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="--temperature"):
        SamplingParams(temperature=-1)
    assert math.isfinite(SamplingParams().temperature)
