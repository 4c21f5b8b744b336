"""Losses over vocab-parallel logits."""

from megatron_irl.loss.entropy import vocab_parallel_entropy
from megatron_irl.loss.gail import (
    discriminator_loss,
    gail_policy_loss,
    gail_reward,
    reward_to_go,
)
from megatron_irl.loss.online import OnlineSoftQLossOutput, online_soft_q_loss
from megatron_irl.loss.reference import soft_q_loss_reference
from megatron_irl.loss.soft_q import SoftQLossOutput, vocab_parallel_soft_q_loss

__all__ = [
    "OnlineSoftQLossOutput",
    "SoftQLossOutput",
    "discriminator_loss",
    "gail_policy_loss",
    "gail_reward",
    "online_soft_q_loss",
    "reward_to_go",
    "soft_q_loss_reference",
    "vocab_parallel_entropy",
    "vocab_parallel_soft_q_loss",
]
