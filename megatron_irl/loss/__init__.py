"""Losses over vocab-parallel logits."""

from megatron_irl.loss.entropy import vocab_parallel_entropy
from megatron_irl.loss.reference import soft_q_loss_reference
from megatron_irl.loss.soft_q import SoftQLossOutput, vocab_parallel_soft_q_loss

__all__ = [
    "SoftQLossOutput",
    "soft_q_loss_reference",
    "vocab_parallel_entropy",
    "vocab_parallel_soft_q_loss",
]
