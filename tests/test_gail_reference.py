"""GAIL's frozen KL reference scores sampled responses as the model itself does, by hand:
``log_softmax`` of its logits at each sampled token, one response at a time, at one rank;
the reference computes them at PP = 2 (last stage, then broadcast to the first) and TP = 2.
The training runs that check the KL itself (zero before the policy moves, positive after,
the same after resuming) are in tests/test_training_online.py."""

from __future__ import annotations

import pytest
import torch

from megatron_irl.testing import run_distributed
from helpers import tiny_config, tiny_tokenizer

ROWS_PER_MICRO_BATCH = 2


def _samples():
    from megatron_irl.training.sampling import SampleSet

    gen = torch.Generator().manual_seed(0)
    vocab, width = tiny_tokenizer().vocab_size, 24
    prompt_lengths = torch.tensor([5, 3, 8, 4])
    lengths = torch.tensor([12, 24, 9, 16])
    tokens = torch.randint(3, vocab, (4, width), generator=gen)
    tokens[torch.arange(width)[None] >= lengths[:, None]] = tiny_tokenizer().pad_id
    finished = torch.tensor([True, False, True, False])
    tokens[finished, lengths[finished] - 1] = tiny_tokenizer().eos_id
    return SampleSet(0, tokens, prompt_lengths, lengths, finished, torch.zeros(4, width))


def _reference_log_probs(directory: str):
    from megatron.core import parallel_state

    from megatron_irl.core.checkpoint import load_checkpoint
    from megatron_irl.training.reference import ReferencePolicy
    from megatron_irl.training.sampling import policy_rows

    cfg = tiny_config(parallel_state.get_tensor_model_parallel_world_size(),
                      parallel_state.get_pipeline_model_parallel_world_size())
    tokenizer = tiny_tokenizer()
    reference = ReferencePolicy(cfg, tokenizer.vocab_size)
    load_checkpoint(directory, [reference.chunk], load_optimizer=False, load_rng=False)
    rows = policy_rows(_samples(), tokenizer.pad_id)
    return reference.log_probs(rows, ROWS_PER_MICRO_BATCH), rows["policy_mask"]


def _by_hand(directory: str):
    """log pi(label) at the policy positions, each response alone through the model."""
    from megatron_irl.data import block_causal_attention_mask
    from megatron_irl.evaluation.loading import load_inference_model
    from megatron_irl.training.sampling import policy_rows

    tokenizer = tiny_tokenizer()
    model = load_inference_model(tiny_config(), directory, tokenizer.vocab_size)
    rows = policy_rows(_samples(), tokenizer.pad_id)
    expected = torch.zeros(rows["tokens"].shape)
    for r in range(rows["tokens"].shape[0]):
        n = int((rows["document_ids"][r] >= 0).sum())  # input positions
        tokens = rows["tokens"][r:r + 1, :n]
        with torch.no_grad():
            logits = model(tokens, torch.arange(n)[None],
                           block_causal_attention_mask(torch.zeros_like(tokens)))
        log_probs = torch.log_softmax(logits[0].double(), dim=-1)  # [n, v]
        policy = rows["policy_mask"][r, :n] > 0
        picked = log_probs.gather(-1, rows["labels"][r, :n, None])[:, 0]
        expected[r, :n] = torch.where(policy, picked, 0.0).float()
    return expected


@pytest.fixture(scope="module")
def by_hand(tiny_checkpoint):
    [expected] = run_distributed(_by_hand, 1, args=(tiny_checkpoint,))
    return expected


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 1)], ids=["pp2", "tp2"])
def test_reference_log_probs_of_sampled_tokens_equal_the_models_by_hand(tiny_checkpoint,
                                                                        by_hand, tp, pp):
    for log_probs, policy_mask in run_distributed(_reference_log_probs, tp * pp, tp=tp, pp=pp,
                                                  args=(tiny_checkpoint,)):
        assert (by_hand[policy_mask == 0] == 0).all()
        assert (log_probs[policy_mask == 0] == 0).all()
        assert (by_hand[policy_mask > 0] < 0).all()
        torch.testing.assert_close(log_probs, by_hand, rtol=0, atol=2e-5)
