"""Multi-turn chat records: the TD term at the last token of a non-final assistant turn
bootstraps from the state where the next assistant turn begins, not through the user's turn.

Packing gives each position its next-state position (``next_position``); the unfused and fused
soft-Q losses and the online loss read ``V`` there, as the float64 reference does, and a
single-turn row's ``next_position`` reproduces the ``t + 1`` default bit for bit.
"""

import pytest
import torch

from megatron_irl.data import SFTDataset
from megatron_irl.loss import vocab_parallel_soft_q_loss
from megatron_irl.loss.fused_output import fused_output_soft_q_loss_sum
from megatron_irl.loss.online import online_soft_q_loss
from megatron_irl.loss.reference import online_soft_q_loss_reference, soft_q_loss_reference
from helpers import CharTokenizer, write_jsonl

TWO_TURNS = {"messages": [
    {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
# BOS + "User: a\nAssistant:" (19 tokens), " b\n" (3), "User: c\nAssistant:" (18), " d" + EOS.
TURN_END = 20  # the position predicting "\n", the first turn's last token
NEXT_TURN = 39  # the position predicting " ", the second turn's first token
LAM, GAMMA = 0.7, 0.9


def _row(tmp_path, record, seq_length):
    path = write_jsonl(tmp_path / "chat.jsonl", [record])
    row = SFTDataset(path, CharTokenizer(), seq_length).micro_batch([0])
    return row  # dict of [1, s] tensors


def test_packing_points_a_turns_last_token_at_the_next_turns_start(tmp_path):
    row = _row(tmp_path, TWO_TURNS, seq_length=48)
    next_position = row["next_position"][0]
    assert row["loss_mask"][0, TURN_END] == 1 and row["loss_mask"][0, TURN_END + 1] == 0
    assert row["loss_mask"][0, NEXT_TURN] == 1 and row["loss_mask"][0, NEXT_TURN - 1] == 0
    assert next_position[TURN_END] == NEXT_TURN
    others = torch.arange(48) != TURN_END
    last = int(row["document_ids"][0].ne(-1).sum()) - 1
    expected = torch.arange(1, 49)
    expected[last] = 48  # the document's last position (terminal) has no next position
    assert torch.equal(next_position[others], expected[others])


def test_next_turn_cut_by_truncation_leaves_the_turns_last_token_without_td(tmp_path):
    row = _row(tmp_path, TWO_TURNS, seq_length=30)
    assert row["next_position"][0, TURN_END] == 30
    logits = torch.randn(1, 30, CharTokenizer().vocab_size)
    out = vocab_parallel_soft_q_loss(logits, row["labels"], row["loss_mask"], row["terminal"],
                                     lam=LAM, gamma=GAMMA, next_position=row["next_position"])
    assert out.delta[0, TURN_END] == 0 and out.nll[0, TURN_END] > 0


def _two_turn_inputs(tmp_path, seed=0):
    row = _row(tmp_path, TWO_TURNS, seq_length=48)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 48, CharTokenizer().vocab_size, generator=gen) * 2
    upstream = torch.randn(4, 1, 48, generator=gen)
    return row, logits, upstream


def _weighted(out, upstream):
    return sum((field * grad.to(field.dtype)).sum() for field, grad in zip(out, upstream))


def test_two_turn_record_matches_the_float64_reference_and_the_hand_computation(tmp_path):
    row, logits, upstream = _two_turn_inputs(tmp_path)
    args = (row["labels"], row["loss_mask"], row["terminal"])
    ours = logits.clone().requires_grad_()
    out = vocab_parallel_soft_q_loss(ours, *args, lam=LAM, gamma=GAMMA,
                                     next_position=row["next_position"], check_labels=True)
    _weighted(out, upstream).backward()
    ref_logits = logits.double().requires_grad_()
    ref = soft_q_loss_reference(ref_logits, row["labels"], row["loss_mask"].double(),
                                row["terminal"], lam=LAM, gamma=GAMMA,
                                next_position=row["next_position"])
    _weighted(ref, upstream.double()).backward()
    for name, a, e in zip(out._fields, out, ref):
        torch.testing.assert_close(a.double(), e.detach(), rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(ours.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)
    # By hand: Q of "\n" minus gamma times V where the second turn starts.
    z = logits.double()[0]
    label = int(row["labels"][0, TURN_END])
    by_hand = z[TURN_END, label] - GAMMA * torch.logsumexp(z[NEXT_TURN], dim=-1)
    torch.testing.assert_close(out.delta[0, TURN_END].double(), by_hand, rtol=1e-6, atol=1e-6)


def test_loss_sends_no_gradient_into_the_users_turn(tmp_path):
    row, logits, _ = _two_turn_inputs(tmp_path)
    ours = logits.clone().requires_grad_()
    out = vocab_parallel_soft_q_loss(ours, row["labels"], row["loss_mask"], row["terminal"],
                                     lam=LAM, gamma=GAMMA, next_position=row["next_position"])
    out.loss.sum().backward()
    # The user's turn is no one's next state (and trains nothing).
    user_turn = ours.grad[0, TURN_END + 1:NEXT_TURN]
    assert torch.equal(user_turn, torch.zeros_like(user_turn))
    assert ours.grad[0, NEXT_TURN].abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [7, 64])
def test_fused_loss_bootstraps_from_the_next_turn_as_the_unfused(tmp_path, chunk_size):
    row, _, _ = _two_turn_inputs(tmp_path)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 48, 16, generator=gen)
    weight = torch.randn(CharTokenizer().vocab_size, 16, generator=gen) * 0.5
    args = (row["labels"], row["loss_mask"], row["terminal"])
    options = dict(lam=LAM, gamma=GAMMA, next_position=row["next_position"])
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    unfused = vocab_parallel_soft_q_loss(h1 @ w1.t(), *args, **options)
    unfused.loss.sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = fused_output_soft_q_loss_sum(h2, w2, *args, chunk_size=chunk_size, **options)
    fused.loss_sum.backward()
    torch.testing.assert_close(fused.per_token.delta, unfused.delta.detach())
    # fp32 accumulation orders differ: tolerances relative to each gradient's largest entry,
    # as tests/test_fused_output_loss.py compares them.
    for fused_grad, unfused_grad in ((h2.grad, h1.grad), (w2.grad, w1.grad)):
        torch.testing.assert_close(fused_grad, unfused_grad, rtol=0,
                                   atol=2e-5 * unfused_grad.abs().max().item())


def test_online_loss_bootstraps_from_the_next_turn_as_the_reference(tmp_path):
    row, logits, _ = _two_turn_inputs(tmp_path)
    policy_mask = torch.zeros_like(row["loss_mask"])
    options = dict(lam=LAM, gamma=GAMMA, alpha_mix=0.3, next_position=row["next_position"])
    ours = logits.clone().requires_grad_()
    out = online_soft_q_loss(ours, row["labels"], row["loss_mask"], policy_mask,
                             row["terminal"], **options)
    out.expert_loss.sum().backward()
    ref_logits = logits.double().requires_grad_()
    ref = online_soft_q_loss_reference(ref_logits, row["labels"], row["loss_mask"].double(),
                                       policy_mask.double(), row["terminal"], **options)
    ref.expert_loss.sum().backward()
    torch.testing.assert_close(out.value_diff.double(), ref.value_diff.detach(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)


def test_single_turn_rows_give_the_default_next_state_bit_for_bit(tmp_path):
    records = [{"prompt": "ab", "response": "cd"}, {"prompt": "e", "response": "fgh"}]
    path = write_jsonl(tmp_path / "single.jsonl", records)
    row = SFTDataset(path, CharTokenizer(), 16).micro_batch([0])
    logits = torch.randn(1, 16, CharTokenizer().vocab_size, generator=torch.Generator()
                         .manual_seed(2))
    results = []
    for next_position in (None, row["next_position"]):
        z = logits.clone().requires_grad_()
        out = vocab_parallel_soft_q_loss(z, row["labels"], row["loss_mask"], row["terminal"],
                                         lam=LAM, gamma=GAMMA, next_position=next_position)
        out.loss.sum().backward()
        results.append((out, z.grad))
    (default, default_grad), (packed, packed_grad) = results
    assert all(torch.equal(a, b) for a, b in zip(default, packed))
    assert torch.equal(default_grad, packed_grad)


@pytest.mark.parametrize("next_position, message", [
    ([[1, 1, 3, 4]], "must be > t"),
    ([[2, 2, 3, 4]], "bootstrap from the same"),
])
def test_next_positions_the_fused_loss_cannot_follow_are_rejected_when_checked(next_position,
                                                                               message):
    labels, mask = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4)
    with pytest.raises(ValueError, match=message):
        vocab_parallel_soft_q_loss(torch.zeros(1, 4, 5), labels, mask,
                                   torch.zeros(1, 4, dtype=torch.bool), lam=1.0, gamma=1.0,
                                   next_position=torch.tensor(next_position), check_labels=True)
