"""A trained checkpoint as one model replica for inference, at the layout asked for.

The checkpoint's own configuration (stored with it) gives the architecture; only the
parallel layout is the caller's: Megatron's distributed checkpoints load into any TP / PP
split of the same model, so a model trained with PP=4 x VPP=2 can be evaluated at TP=1.
"""

from __future__ import annotations

import dataclasses

from megatron_irl.config import ParallelConfig, TrainConfig
from megatron_irl.core.checkpoint import load_checkpoint, read_saved_state
from megatron_irl.core.model import build_model_chunks


@dataclasses.dataclass
class SavedRun:
    """What a checkpoint says about itself: its iteration and training configuration."""

    iteration: int
    config: TrainConfig


def read_saved_run(load_dir: str, ckpt_step: int | None = None) -> SavedRun:
    """The latest complete checkpoint's (or iteration ``ckpt_step``'s) iteration and
    configuration, once its files pass the manifest check (no collectives)."""
    saved = read_saved_state(load_dir, ckpt_step)
    return SavedRun(saved["iteration"],
                    TrainConfig.from_dict(saved["config"], source=f"{load_dir} (saved config)"))


def inference_config(saved: TrainConfig, tensor_parallel: int, pipeline_parallel: int) -> TrainConfig:
    """``saved`` with its parallel layout replaced (no virtual stages, no sequence
    parallelism) and the unfused output layer, whose logits generation needs."""
    data = saved.to_dict()
    data["parallel"] = dataclasses.asdict(ParallelConfig(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
    ))
    data["irl"]["fused_output_loss"] = False
    return TrainConfig.from_dict(data)


def load_inference_model(cfg: TrainConfig, load_dir: str, vocab_size: int,
                         iteration: int | None = None):
    """This rank's GPTModel with the weights of the checkpoint of ``iteration`` (None: the
    latest complete one), in eval mode; ``vocab_size`` is the real vocabulary
    (``core.vocabulary.real_vocab_size``).

    Collective over the world group (the checkpoint load). Megatron's parallel state must
    be initialised with ``cfg.parallel``'s layout.
    """
    chunks = build_model_chunks(cfg, vocab_size)
    load_checkpoint(load_dir, chunks, load_optimizer=False, load_rng=False, ckpt_step=iteration)
    return chunks[0].eval()
