"""Rewards recovered from a trained model (docs/method.md section 5).

    r(s_t, a_t) = Q(s_t, a_t) - gamma * (1 - done_t) * V(s_{t+1})   (= delta_t of the loss)

Each (prompt, response) document is teacher-forced through the model in its own row (no
packing, so a row's positions are one document's). The per-token rewards are the
``delta`` output of ``vocab_parallel_soft_q_loss`` at the response positions, exactly as
training computes it; the sequence return is their sum. With gamma = 1 the return
telescopes to ``log pi(response | prompt) + V(s_0)``, which the output also carries.

A response cut by the token budget (``finished`` false) has no EOS and is truncated, not
terminal, as a document cut by ``--seq-length`` in training: its last token's next state is
unknown, so that token has no TD term and no reward (the return then telescopes to
``log pi`` of the other tokens ``+ V(s_0) - V`` of the state before the last token).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_irl.cpu_support import current_device
from megatron_irl.data import block_causal_attention_mask
from megatron_irl.data.packing import PackPlan, build_row
from megatron_irl.evaluation.inputs import ScoredPair
from megatron_irl.loss import vocab_parallel_soft_q_loss
from megatron_irl.loss.soft_q import td_active_mask


class _PairDocuments:
    """The packing module's document-store interface over a list of ScoredPairs."""

    def __init__(self, pairs: list[ScoredPair]):
        self.pairs = pairs

    def tokens(self, index: int) -> np.ndarray:
        return np.asarray(self.pairs[index].tokens, dtype=np.int64)

    def segment_lengths(self, index: int) -> np.ndarray:
        return np.asarray(self.pairs[index].segment_lengths, dtype=np.int64)


def document_rows(pairs: list[ScoredPair], seq_length: int, pad_id: int) -> dict:
    """One row per document, padded to ``seq_length`` positions: the training batch fields
    (tokens, labels, loss_mask, terminal, position_ids, document_ids) as [b, s] tensors."""
    too_long = [p.line for p in pairs if len(p.tokens) - 1 > seq_length]
    if too_long:
        raise ValueError(f"record on line {too_long[0]} has more than {seq_length} positions")
    plan = PackPlan(seq_length, np.arange(len(pairs) + 1), np.arange(len(pairs)),
                    np.array([len(p.tokens) - 1 for p in pairs], dtype=np.int64))
    documents = _PairDocuments(pairs)
    rows = [build_row(documents, plan, row, pad_id) for row in range(len(pairs))]
    for pair, row in zip(pairs, rows):
        # build_row reads a whole document as complete; an unfinished one did not end.
        row["terminal"][:] &= pair.finished
    return {name: torch.from_numpy(np.stack([row[name] for row in rows])) for name in rows[0]}


@dataclass
class ExtractedRewards:
    """One document's rewards, over its response tokens in order."""

    rewards: list[float]  # delta_t at each response position with a TD term (all but an
    #                       unfinished response's last)
    value_initial: float  # V(s_0): the soft value before the first response token
    log_prob: float  # log pi(response | prompt), EOS included when finished

    @property
    def sequence_return(self) -> float:
        return float(sum(self.rewards))


def _rewards_of_batch(logits: torch.Tensor, batch: dict, gamma: float, vocab_size: int):
    """The schedule's loss function: no loss, the per-token delta / value / nll instead."""
    out = vocab_parallel_soft_q_loss(logits, batch["labels"], batch["loss_mask"],
                                     batch["terminal"], lam=0.0, gamma=gamma,
                                     next_position=batch["next_position"],
                                     vocab_size=vocab_size)
    per_token = {"delta": out.delta.detach(), "value": out.value.detach(),
                 "nll": out.nll.detach()}
    return torch.zeros((), device=logits.device), torch.tensor(0, dtype=torch.int), per_token


def _forward_step(data_iterator, model, gamma: float):
    batch = next(data_iterator)
    mask = block_causal_attention_mask(batch["document_ids"])  # [b, 1, s, s]
    logits = model(batch["tokens"], batch["position_ids"], mask)  # [b, s, v/tp]
    return logits, partial(_rewards_of_batch, batch=batch, gamma=gamma,
                           vocab_size=model.real_vocab_size)


@torch.no_grad()
def extract_rewards(model, pairs: list[ScoredPair], gamma: float, micro_batch_size: int,
                    pad_id: int) -> list[ExtractedRewards] | None:
    """Rewards of every pair, on the last pipeline stage (None on the others).

    Runs Megatron-Core's forward-only pipeline schedule over micro-batches of
    ``micro_batch_size`` documents; collective over the model replica's TP and PP groups.
    """
    if not pairs:
        return [] if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None
    seq_length = max(len(p.tokens) for p in pairs) - 1
    rows = document_rows(pairs, seq_length, pad_id)
    device = current_device()
    # The schedule needs equal micro-batches: the last one is topped up with copies.
    padded = -len(pairs) % micro_batch_size
    indices = torch.cat([torch.arange(len(pairs)), torch.zeros(padded, dtype=torch.long)])
    micro_batches = [{name: rows[name][chunk].to(device) for name in rows}
                     for chunk in indices.split(micro_batch_size)]
    per_micro_batch = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, gamma=gamma),
        data_iterator=iter(micro_batches), model=model, num_microbatches=len(micro_batches),
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    delta, value, nll = (torch.cat([m[name] for m in per_micro_batch]).cpu()
                         for name in ("delta", "value", "nll"))
    td_active = td_active_mask(rows["loss_mask"], rows["terminal"], rows["next_position"])
    results = []
    for row in range(len(pairs)):
        trained = rows["loss_mask"][row] > 0  # [s] the positions predicting response tokens
        results.append(ExtractedRewards(
            rewards=delta[row][td_active[row]].tolist(),
            value_initial=float(value[row][trained][0]),
            log_prob=-float(nll[row][trained].sum()),
        ))
    return results
