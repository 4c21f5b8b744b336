"""Vocab-parallel policy entropy ``H(pi(.|s_t))``, for the MLE + entropy-bonus baseline.

    H_t = -sum_v p_t[v] log p_t[v],   p_t = softmax(z_t)
    dH_t/dz_t = -(p_t log p_t + H_t p_t)

v runs over the real vocabulary: padded rows get -inf logits, p = 0 (and 0 log 0 = 0).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_irl.loss.parallel import all_reduce, default_tp_group, real_columns
from megatron_irl.loss.soft_q import mask_padded_columns_


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tp_group, vocab_size):
        # A new fp32 buffer even for fp32 logits: the caller's logits stay intact for the
        # soft-Q loss, which overwrites them afterwards.
        probs = logits.float() if logits.dtype != torch.float32 else logits.clone()  # [b, s, v/tp]
        mask_padded_columns_(probs, real_columns(probs.size(-1), vocab_size, tp_group))
        logits_max = probs.amax(dim=-1)  # [b, s]
        all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
        probs.sub_(logits_max.unsqueeze(-1)).exp_()
        sum_exp = probs.sum(dim=-1)
        all_reduce(sum_exp, dist.ReduceOp.SUM, tp_group)
        probs.div_(sum_exp.unsqueeze(-1))  # softmax, saved for backward
        entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)  # this shard's part
        all_reduce(entropy, dist.ReduceOp.SUM, tp_group)
        ctx.save_for_backward(probs, entropy)
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy):
        probs, entropy = ctx.saved_tensors
        grad = torch.special.xlogy(probs, probs)  # p log p  [b, s, v/tp]
        grad.add_(probs.mul_(entropy.unsqueeze(-1)))  # + H p (the saved softmax is reused)
        return grad.mul_(-grad_entropy.unsqueeze(-1)), None, None


def vocab_parallel_entropy(
    logits: torch.Tensor, tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Entropy ``[b, s]`` fp32 of the softmax over vocab-parallel logits ``[b, s, v/tp]``,
    over the real vocabulary ``[0, vocab_size)`` (None: all ``v`` columns are tokens).

    Collectives over ``tp_group`` (default: Megatron's tensor-parallel group when initialised)
    in forward: all-reduce MAX, then SUM of the sum of exponentials, then SUM of the entropy,
    each ``[b, s]``. Does not modify ``logits``; holds one fp32 ``[b, s, v/tp]`` softmax for
    backward.
    """
    if tp_group is None:
        tp_group = default_tp_group()
    return _VocabParallelEntropy.apply(logits, tp_group, vocab_size)
