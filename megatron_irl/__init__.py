"""megatron-irl: fine-tune language models by inverse soft-Q learning on Megatron-Core."""

from megatron_irl.loss import SoftQLossOutput, soft_q_loss_reference, vocab_parallel_soft_q_loss

__all__ = ["SoftQLossOutput", "soft_q_loss_reference", "vocab_parallel_soft_q_loss"]
__version__ = "0.1.0"
