"""The process side of the inference commands: launch, model, data split, gathering.

Launch like training (one process, ``torchrun`` or ``srun``): the world is split into
model replicas of TP x PP ranks; each data-parallel replica handles every ``dp``-th item
and the results come together on global rank 0, which writes the outputs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_irl.arguments import world_size_from_env
from megatron_irl.config import ConfigError
from megatron_irl.core.distributed import init_distributed, shutdown_distributed
from megatron_irl.core.vocabulary import real_vocab_size
from megatron_irl.data import Tokenizer, load_tokenizer
from megatron_irl.evaluation.loading import inference_config, load_inference_model, read_saved_run
from megatron_irl.evaluation.options import InferenceOptions


@dataclass
class InferenceSession:
    """This rank's model replica and its place among the replicas."""

    options: InferenceOptions
    iteration: int  # the checkpoint's
    config: Any  # the checkpoint's TrainConfig at the inference layout, real vocab_size set
    tokenizer: Tokenizer
    inputs: Any  # what ``read_inputs`` returned
    model: Any  # this rank's GPTModel, eval mode
    dp_rank: int
    dp_size: int

    @property
    def is_writer(self) -> bool:
        """Global rank 0 gathers the results and writes the outputs."""
        return dist.get_rank() == 0

    @property
    def pipeline_group(self):
        return parallel_state.get_pipeline_model_parallel_group()

    def shard(self, items: Sequence) -> list[tuple[int, Any]]:
        """(index, item) pairs of this replica's share: every ``dp_size``-th item."""
        return [(i, items[i]) for i in range(self.dp_rank, len(items), self.dp_size)]

    def gather(self, local: list) -> list | None:
        """The replicas' results concatenated on the writer (None elsewhere).

        Every rank of a replica holds the same results; one rank per replica (TP rank 0 of
        the last pipeline stage) sends them. Collective over the world group.
        """
        sends = (parallel_state.get_tensor_model_parallel_rank() == 0
                 and parallel_state.is_pipeline_last_stage(ignore_virtual=True))
        gathered = [None] * dist.get_world_size() if self.is_writer else None
        dist.gather_object(local if sends else [], gathered, dst=0)
        if not self.is_writer:
            return None
        return [item for part in gathered for item in part]


@contextmanager
def inference_session(options: InferenceOptions, read_inputs: Callable[[Tokenizer], Any],
                      env=os.environ) -> Iterator[InferenceSession]:
    """Read the inputs, set up the process groups, load the checkpoint; tear down after.

    ``read_inputs(tokenizer)`` runs first, before any process group or model exists, so
    that bad data fails fast. Raises ConfigError (naming the flag) when the world does
    not divide into replicas, CheckpointError / DataError for an unusable checkpoint,
    tokenizer or input file.
    """
    saved = read_saved_run(options.load, options.ckpt_step)
    cfg = inference_config(saved.config, options.tensor_model_parallel_size,
                           options.pipeline_model_parallel_size)
    world_size = world_size_from_env(env)
    replica = options.tensor_model_parallel_size * options.pipeline_model_parallel_size
    if world_size % replica:
        raise ConfigError(
            f"world size {world_size} must be divisible by --tensor-model-parallel-size "
            f"{options.tensor_model_parallel_size} x --pipeline-model-parallel-size "
            f"{options.pipeline_model_parallel_size} (= {replica})")
    tokenizer = load_tokenizer(options.tokenizer_model or cfg.data.tokenizer_model,
                               options.chat_template or cfg.data.chat_template)
    # The checkpoint's real vocabulary; one saved before it was recorded: the tokenizer's
    # (load_checkpoint says so).
    cfg.model.vocab_size = real_vocab_size(cfg.model, tokenizer.vocab_size)
    inputs = read_inputs(tokenizer)
    init_distributed(cfg.parallel, options.seed)
    try:
        model = load_inference_model(cfg, options.load, cfg.model.vocab_size, saved.iteration)
        yield InferenceSession(options, saved.iteration, cfg, tokenizer, inputs, model,
                               parallel_state.get_data_parallel_rank(),
                               parallel_state.get_data_parallel_world_size())
    finally:
        shutdown_distributed()
