"""megatron-irl: fine-tune language models by inverse soft-Q learning on Megatron-Core.

The loss is exported lazily so that ``import megatron_irl`` (the CLI's flag parsing, batch
scripts that validate a configuration) does not pay for importing torch.
"""

__version__ = "0.1.0"
__all__ = ["SoftQLossOutput", "soft_q_loss_reference", "vocab_parallel_soft_q_loss"]


def __getattr__(name: str):
    if name in __all__:
        from megatron_irl import loss

        return getattr(loss, name)
    raise AttributeError(f"module 'megatron_irl' has no attribute {name!r}")
