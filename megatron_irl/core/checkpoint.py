"""Save and resume training with Megatron-Core distributed checkpoints (torch_dist format).

Layout of a checkpoint directory (Megatron-LM's naming)::

    <dir>/latest_checkpointed_iteration.txt  the iteration of the newest *complete* checkpoint
    <dir>/iter_0000123/                      one checkpoint:
        __<rank>_<n>.distcp, .metadata,      dist_checkpointing's torch_dist files (tensors,
        common.pt, metadata.json               the tensor index, non-tensor state)
        training_state.json                  iteration, consumed samples, config, model
                                               architecture, parallel layout (rank 0 writes it)
        config.yaml                          the run's config, for people
        manifest.json                        every other file's size, checked before loading
                                               (``checkpoint_files.py``)
        policy_samples.pt, discriminator.pt  --irl-loss online / gail only: the samples in
                                               use and the GAIL discriminator (written by
                                               ``save_checkpoint``'s ``write_extra``; see
                                               ``megatron_irl.training.online``)
    <dir>/gail_reference/                    --irl-loss gail with --gail-kl-weight: the KL
                                               reference (the run's starting weights), a
                                               weights-only checkpoint (any layout loads it),
                                               written once (``training/reference.py``)

What one checkpoint holds (a single dist_checkpointing state dict):

* ``model`` (or ``model0``, ``model1``, ... with several virtual-pipeline chunks, as in
  Megatron-LM): each unwrapped chunk's ``sharded_state_dict()``. Tensors are stored by
  their global sharded keys, so a checkpoint loads into any TP / PP / DP layout.
* ``optimizer``: ``optimizer.sharded_state_dict(model state)`` (Adam moments keyed like
  their parameters, hence reshardable as well; param groups and step go to common.pt).
  Absent when saved before the first optimizer step (there are no moments yet); loading
  such a checkpoint leaves the optimizer as built. The distributed optimizer's format is
  Megatron-Core's ``fully_reshardable`` (the default) or, with
  ``--dist-ckpt-optim-fully-reshardable false``, ``dp_reshardable``: each data-parallel rank
  writes its own shards of the optimizer's buffers, which load only in the same TP / PP / DP
  layout; training_state.json records which (``optimizer_format``).
* ``opt_param_scheduler``: ``OptimizerParamScheduler.state_dict()`` (common.pt).
* ``rng_state.*``: every rank's random states (Python, NumPy, torch CPU, CUDA when
  present, Megatron's RNG tracker), each a 1-D tensor sharded over a [pp, tp, dp*cp, n]
  global tensor, so rank (p, t, d) gets back exactly its own. They are restored only
  when the layout is unchanged: in another layout the ranks do not correspond.

Crash safety: the marker file is replaced atomically (tmp file, fsync, ``os.replace``) by
rank 0 only after a barrier that every rank reaches once its shards are written (and
fsynced: dist_checkpointing's writers do that), and loading goes through the marker, so a
save killed at any point leaves the previous checkpoint in charge. With ``--async-save`` the
shards are written in the background and that end of the save runs in the finalisation
(``checkpoint_finalize.py``). The half-written ``iter_*`` directory such a save leaves
behind is ignored, and removed when a later save reaches the same iteration. Loading first
checks the chosen iteration's files against its manifest; ``keep_last`` deletes older
checkpoints only after the marker moved (``checkpoint_files.remove_old_checkpoints``).

Unpickling: this module's own files are JSON, and it stores the RNG states as tensors
rather than as ``ShardedObject`` (which torch_dist unpickles with
``torch.load(weights_only=False)``). torch_dist itself still unpickles: tensor data is raw
bytes, but common.pt is read with ``torch.load``'s default ``weights_only=True``
unpickler, the ``.metadata`` tensor index with plain ``pickle`` (PyTorch Distributed
Checkpoint's format), and the layers' ``_extra_state`` entries (None for the local spec,
FP8 metadata for Transformer Engine layers) are ShardedObjects, as are the distributed
optimizer's param groups and bucket sizes in the ``dp_reshardable`` format. Load
checkpoints only from directories you trust.

:func:`save_checkpoint` and :func:`load_checkpoint` are collective over the default
(world) process group: all ranks call them with the same arguments. The directory must be
on a file system that all ranks share.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.optimizer import DistributedOptimizer
from megatron.core.utils import unwrap_model

from megatron_irl.config import ModelConfig
from megatron_irl.core.checkpoint_files import (  # noqa: F401 (this module's interface)
    FORMAT_VERSION,
    STATE_FILENAME,
    TRACKER_FILENAME,
    CheckpointError,
    checkpoint_problem,
    choose_iteration,
    iteration_dir,
    latest_iteration,
    read_saved_state,
    read_training_state,
)
from megatron_irl.core.checkpoint_finalize import (
    CONFIG_FILENAME,
    BackgroundSaves,
    complete_checkpoint,
)
from megatron_irl.core.extra_state import load_across_specs
from megatron_irl.core.rng_state import restore_rng, rng_sharded_state_dict

log = logging.getLogger(__name__)

# The distributed optimizer's checkpoint formats (megatron-core's
# ``distrib_optim_sharding_type``; its default in 0.16 cannot be saved at all):
# "fully_reshardable" stores one canonical tensor per parameter and state, loadable at any
# TP / PP / DP (gathered on data-parallel rank 0 while saving), and no pickled objects;
# "dp_reshardable" stores each rank's buffer shard as it is, in the same TP / PP / DP
# layout only. Other optimizers ignore the format.
FULLY_RESHARDABLE, DP_RESHARDABLE = "fully_reshardable", "dp_reshardable"


@dataclass
class TrainingState:
    """What a checkpoint holds besides model, optimizer and scheduler state.

    Attributes:
        iteration: optimizer steps taken.
        consumed_samples: training samples consumed; the data pipeline resumes from it.
        config: the run's configuration as plain JSON-able data (``TrainConfig.to_dict()``).
    """

    iteration: int
    consumed_samples: int
    config: dict

    def __post_init__(self) -> None:
        for name in ("iteration", "consumed_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainingState.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.config, dict):
            raise ValueError(f"TrainingState.config must be a dict, got {type(self.config)}")


def save_checkpoint(save_dir: str, state: TrainingState, model_chunks: list, optimizer,
                    scheduler, write_extra: Callable[[str], None] | None = None,
                    keep_last: int | None = None, *, optimizer_fully_reshardable: bool = True,
                    fully_parallel: bool = False, background: BackgroundSaves | None = None) -> str:
    """Save model, optimizer, scheduler, RNG and ``state`` as ``<save_dir>/iter_<n>``.

    Args:
        save_dir: the run's ``--save`` directory (created if missing).
        state: iteration, consumed samples and config to store.
        model_chunks: this rank's model chunks, wrapped (DDP, Float16Module) or not.
        optimizer: the ``get_megatron_optimizer`` optimizer of ``model_chunks``, or None
            (weights only, e.g. a converted model).
        scheduler: the ``OptimizerParamScheduler`` of ``optimizer``, or None.
        write_extra: called on every rank with the iteration directory once the shards are
            handed to dist_checkpointing (written, or with ``background`` being written) and
            before the marker moves, to add files of its own (the online losses' samples and
            discriminator); it may run collectives.
        keep_last: once the marker names the new checkpoint, delete the checkpoints older
            than the ``keep_last`` newest usable ones (``--keep-last-checkpoints``); None
            keeps all.
        optimizer_fully_reshardable: the distributed optimizer's format,
            ``fully_reshardable`` or (False) ``dp_reshardable``
            (``--dist-ckpt-optim-fully-reshardable``).
        fully_parallel: spread the writing of tensors replicated over the data-parallel
            ranks across them (``--ckpt-fully-parallel-save``).
        background: ``--async-save``: hand the tensors to a background writer scheduled in
            ``background`` and return; the rest of the save (the training state, manifest,
            marker and ``keep_last`` deletions) runs when ``background.finalize`` completes
            it. None: write and complete the checkpoint before returning.

    Returns:
        The iteration directory. If the marker already names this iteration (a complete
        checkpoint of it exists) nothing is written and that directory is returned.

    Collective over the world group (broadcasts, a barrier and dist_checkpointing's own;
    with ``fully_parallel`` also gathers of the shards' metadata over the data-parallel
    group). Writes only under ``save_dir``; mutates nothing else. Rank 0 writes the JSON/YAML
    files and then the marker, after every rank's shards are on disk (with ``background``:
    in the finalisation, whose collectives are ``background.finalize``'s).
    """
    directory = iteration_dir(save_dir, state.iteration)
    has_optimizer_state = optimizer is not None and _has_optimizer_state(optimizer)
    optimizer_format = (DP_RESHARDABLE if has_optimizer_state and not optimizer_fully_reshardable
                        and _uses_distributed_optimizer(optimizer) else FULLY_RESHARDABLE)
    # Serialised up front so that a config that is not JSON-able fails on every rank
    # before anything is written. The YAML takes the JSON form (tuples become lists).
    state_json = json.dumps({
        "format_version": FORMAT_VERSION,
        **dataclasses.asdict(state),
        "model_architecture": model_architecture(unwrap_model(model_chunks[0])),
        "parallel_layout": _parallel_layout(),
        "model_chunks": len(model_chunks),
        "has_optimizer_state": has_optimizer_state,
        "optimizer_format": optimizer_format,
    }, indent=2)
    config_yaml = yaml.safe_dump(json.loads(state_json)["config"], sort_keys=False)

    if _on_rank0(lambda: _prepare_iteration_dir(save_dir, state.iteration), "prepare " + directory):
        log.warning("%s is already the latest complete checkpoint; not saving it again", directory)
        return directory

    model_state = _model_sharded_state_dict(model_chunks)
    sharded_state = {**model_state, **rng_sharded_state_dict(_rank_coordinates())}
    if scheduler is not None:
        sharded_state["opt_param_scheduler"] = scheduler.state_dict()
    if has_optimizer_state:
        sharded_state["optimizer"] = optimizer.sharded_state_dict(
            model_state, metadata=_optimizer_metadata(optimizer_format))
    strategy = None
    if fully_parallel:
        strategy = FullyParallelSaveStrategyWrapper(
            get_default_save_sharded_strategy(),
            parallel_state.get_data_parallel_group(with_context_parallel=True))
    request = dist_checkpointing.save(sharded_state, directory, sharded_strategy=strategy,
                                      async_sharded_save=background is not None)
    if write_extra is not None:  # not in a finalisation: training changes what it writes
        write_extra(directory)
    iteration = state.iteration  # now: the trainer counts on before a background save completes

    def finish() -> None:
        dist.barrier()  # every rank's files are written: only now may the marker move
        _on_rank0(lambda: complete_checkpoint(save_dir, iteration, state_json, config_yaml,
                                              keep_last),
                  "write the training state and the marker of " + directory)

    if background is None:
        finish()
    else:
        request.add_finalize_fn(finish)  # after dist_checkpointing's own finalisation
        background.schedule(request, iteration, directory)
    return directory


def load_checkpoint(load_dir: str, model_chunks: list, optimizer=None, scheduler=None, *,
                    load_optimizer: bool = True, load_rng: bool = True,
                    ckpt_step: int | None = None) -> TrainingState:
    """Load the latest complete checkpoint under ``load_dir`` into this run's objects.

    Args:
        load_dir: the ``--load`` directory.
        ckpt_step: load this iteration instead (``--ckpt-step``).
        model_chunks: this rank's model chunks (any TP / PP / DP layout of the same
            architecture); their parameters are overwritten in place.
        optimizer: loaded (Adam moments, step, param groups) when ``load_optimizer`` and
            the checkpoint has optimizer state; otherwise only told to re-read the model
            parameters (mixed precision keeps fp32 main copies of them).
        scheduler: loaded when ``load_optimizer`` (it belongs to the optimizer's state).
        load_optimizer: False for ``--no-load-optim`` / ``--finetune``.
        load_rng: False for ``--no-load-rng`` / ``--finetune``. RNG states are also
            skipped (with a warning) when the parallel layout differs from the saved one.

    Returns:
        The saved :class:`TrainingState` (iteration, consumed samples, config).

    Raises:
        CheckpointError: no checkpoint under ``load_dir``, an incomplete or damaged one
            (named with its file and the newest usable iteration), one whose
            model architecture differs from ``model_chunks[0]`` (names the fields), one
            that lacks a weight or other entry the run needs (extra state that the other
            layer spec does not save is initialised instead: ``extra_state.py``), or
            optimizer state that cannot load into ``optimizer``: saved ``dp_reshardable``
            in another TP / PP / DP layout, or the distributed optimizer on torch Adam.

    Collective over the world group. Mutates the model chunks, optimizer, scheduler and
    the process's RNG states.
    """
    iteration = _on_rank0(lambda: choose_iteration(load_dir, ckpt_step),
                          "choose and check a checkpoint in " + load_dir)
    directory = iteration_dir(load_dir, iteration)
    saved = read_training_state(directory)
    models = unwrap_model(model_chunks)
    _check_architecture(saved["model_architecture"], model_architecture(models[0]), directory)

    model_state = _model_sharded_state_dict(model_chunks)
    sharded_state = dict(model_state)
    load_optimizer_state = load_optimizer and optimizer is not None and saved["has_optimizer_state"]
    if load_optimizer_state:
        # Checkpoints that predate the choice were saved fully reshardable.
        optimizer_format = saved.get("optimizer_format", FULLY_RESHARDABLE)
        if optimizer_format == DP_RESHARDABLE:
            _check_same_layout_for_dp_reshardable(saved["parallel_layout"], directory)
        _check_optimizer_state_loadable(optimizer)
        sharded_state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=True, metadata=_optimizer_metadata(optimizer_format))
    rng_restored = load_rng and _same_layout_for_rng(saved["parallel_layout"])
    if rng_restored:
        sharded_state.update(rng_sharded_state_dict(_rank_coordinates()))

    try:
        result = load_across_specs(sharded_state, directory, dict(zip(model_state, models)))
    except Exception as exc:  # a damaged file the manifest check cannot see
        raise CheckpointError(
            f"checkpoint {directory} (iteration {iteration}) could not be read: "
            f"{type(exc).__name__}: {exc}; load an older iteration with --ckpt-step N "
            f"(directories iter_<N> under {load_dir})") from exc
    if result.missing:
        raise CheckpointError(
            f"checkpoint {directory} lacks {len(result.missing)} entries this run needs: "
            f"{', '.join(result.missing[:8])}{' ...' if len(result.missing) > 8 else ''}")
    if result.initialised_extra_state and dist.get_rank() == 0:
        log.info("%s was saved with another layer spec: %d extra-state entries (e.g. %s) keep "
                 "their initial values", directory, len(result.initialised_extra_state),
                 result.initialised_extra_state[0])
    loaded = result.state

    for key, model in zip(model_state, models):
        model.load_state_dict(loaded[key])
    if load_optimizer_state:
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        optimizer.reload_model_params()
    if load_optimizer and scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if rng_restored:
        restore_rng(loaded)
    return TrainingState(saved["iteration"], saved["consumed_samples"], saved["config"])


# ------------------------------------------------------------------- model architecture


def model_architecture(model) -> dict:
    """The settings of an (unwrapped) GPTModel that fix its parameters' shapes, named
    after the project's config fields (``--hidden-size`` -> ``hidden_size``)."""
    config = model.config
    learned_positions = model.position_embedding_type == "learned_absolute"
    return {
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.num_query_groups,
        "kv_channels": config.kv_channels,
        "normalization": config.normalization,
        "swiglu": config.gated_linear_unit,
        "add_bias_linear": config.add_bias_linear,
        "add_qkv_bias": config.add_qkv_bias,
        "position_embedding_type": model.position_embedding_type,
        # Only learned position embeddings have a table of this length.
        "max_position_embeddings": model.max_sequence_length if learned_positions else None,
        "untie_embeddings_and_output_weights": not model.share_embeddings_and_output_weights,
        "padded_vocab_size": model.vocab_size,
        # The real vocabulary below the padding (core.model.build_model_chunks).
        "vocab_size": model.real_vocab_size,
    }


def _check_architecture(saved: dict, current: dict, directory: str) -> None:
    """Raise a CheckpointError listing every field where ``saved`` and ``current`` differ."""
    differing = [name for name in current if saved.get(name) != current[name]
                 and not (name == "vocab_size" and name not in saved)]
    if "vocab_size" not in saved and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning("checkpoint %s does not record its real vocabulary (saved before padded "
                    "vocabulary rows were masked): taking %d (--vocab-size, else the tokenizer's "
                    "size). A model with more real rows than tokenizer tokens (e.g. imported "
                    "from Hugging Face) needs --vocab-size set to its vocab_size to train.",
                    directory, current["vocab_size"])
    if not differing:
        return
    flags = {f.name: f.metadata["flag"] for f in dataclasses.fields(ModelConfig)}
    flags["padded_vocab_size"] = (
        "the real vocabulary (--vocab-size, else the tokenizer's) padded to a multiple of "
        "lcm(--make-vocab-size-divisible-by, --tensor-model-parallel-size)")
    lines = [f"  {name}{f' ({flags[name]})' if name in flags else ''}: checkpoint "
             f"{saved.get(name)!r}, this run {current[name]!r}" for name in differing]
    raise CheckpointError(
        f"checkpoint {directory} holds a model of a different architecture than this run's "
        f"(see its {CONFIG_FILENAME}):\n" + "\n".join(lines) +
        "\nset these to the checkpoint's values, or point --load at a matching checkpoint")


# ----------------------------------------------------------------------- state dicts


def _model_sharded_state_dict(model_chunks: list) -> dict:
    """{"model": sd} for one chunk, {"model0": sd0, "model1": sd1, ...} for several
    (Megatron-LM's keys); sd is the unwrapped chunk's sharded_state_dict()."""
    models = unwrap_model(model_chunks)
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict()}
    return {f"model{i}": model.sharded_state_dict() for i, model in enumerate(models)}


def _has_optimizer_state(optimizer) -> bool:
    """Whether the optimizer holds per-parameter state (Adam moments): not before its
    first step, and Megatron's ``sharded_state_dict`` cannot load a checkpoint without."""
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(len(megatron_optimizer.optimizer.state) > 0 for megatron_optimizer in optimizers)


def _uses_distributed_optimizer(optimizer) -> bool:
    return any(isinstance(megatron_optimizer, DistributedOptimizer)
               for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_metadata(optimizer_format: str) -> dict:
    """The ``metadata`` of ``optimizer.sharded_state_dict`` (as Megatron-LM passes it)."""
    return {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}


def _check_same_layout_for_dp_reshardable(saved_layout: dict, directory: str) -> None:
    """Raise a CheckpointError when a ``dp_reshardable`` optimizer state was saved in
    another layout: it holds each rank's buffer shards as laid out at the save (megatron-core
    documents no TP / PP resharding of it, and this project tests none at another DP)."""
    current = _parallel_layout()
    if saved_layout == current:
        return
    differing = ", ".join(f"{name} {saved_layout.get(name)} (this run {value})"
                          for name, value in current.items() if saved_layout.get(name) != value)
    raise CheckpointError(
        f"checkpoint {directory} holds the distributed optimizer's state in the dp_reshardable "
        f"format (saved with --dist-ckpt-optim-fully-reshardable false), which loads only in "
        f"the layout it was saved in: saved with {differing}; resume in that layout, or load "
        f"the weights only with --no-load-optim (the Adam moments start afresh). Save with "
        f"--dist-ckpt-optim-fully-reshardable true to change layouts.")


def _check_optimizer_state_loadable(optimizer) -> None:
    """Raise a CheckpointError for a DistributedOptimizer on torch Adam (no Apex / Transformer
    Engine fused Adam): megatron-core 0.16 cannot load its state, failing on torch Adam's
    per-parameter ``step`` (an AssertionError in ``state_dict``; past that, a KeyError)."""
    torch_adam = (torch.optim.Adam, torch.optim.AdamW)
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        if (isinstance(megatron_optimizer, DistributedOptimizer)
                and isinstance(megatron_optimizer.optimizer, torch_adam)):
            raise CheckpointError(
                "cannot load the state of --use-distributed-optimizer into torch.optim.Adam: "
                "megatron-core's DistributedOptimizer loads it only into Transformer Engine's or "
                "Apex's fused Adam; resume with --no-load-optim, or where one is installed")


def _rank_coordinates() -> tuple[tuple[int, int], ...]:
    """((rank, size) for pp, tp, dp*cp): a rank's position in the layout."""
    return (
        (parallel_state.get_pipeline_model_parallel_rank(),
         parallel_state.get_pipeline_model_parallel_world_size()),
        (parallel_state.get_tensor_model_parallel_rank(),
         parallel_state.get_tensor_model_parallel_world_size()),
        (parallel_state.get_data_parallel_rank(with_context_parallel=True),
         parallel_state.get_data_parallel_world_size(with_context_parallel=True)),
    )


def _parallel_layout() -> dict:
    (_, pp), (_, tp), (_, dp) = _rank_coordinates()
    return {"pipeline_model_parallel_size": pp, "tensor_model_parallel_size": tp,
            "data_parallel_size": dp}


def _same_layout_for_rng(saved_layout: dict) -> bool:
    current = _parallel_layout()
    if saved_layout == current:
        return True
    if dist.get_rank() == 0:
        log.warning("parallel layout changed since the checkpoint (%s -> %s): not restoring "
                    "the RNG states, whose ranks do not correspond", saved_layout, current)
    return False


# ------------------------------------------------------------------------ files


def _prepare_iteration_dir(save_dir: str, iteration: int) -> int:
    """Rank 0: 1 if the marker already names ``iteration`` and its files check out; else 0
    after creating an empty iteration directory (removing what an interrupted save, or a
    damaged checkpoint, of it left)."""
    directory = iteration_dir(save_dir, iteration)
    if latest_iteration(save_dir) == iteration and checkpoint_problem(directory) is None:
        return 1
    if os.path.exists(directory):
        log.warning("removing %s: not a complete checkpoint (what an interrupted save left, "
                    "or damaged)", directory)
        shutil.rmtree(directory)
    os.makedirs(directory)
    return 0


def _on_rank0(action: Callable[[], int], what: str) -> int:
    """Run ``action`` on rank 0 and broadcast its int result to all ranks. An exception on
    rank 0 is re-raised there and reported as a CheckpointError on the others, so no rank
    is left waiting in a later collective. Collective: one broadcast (world group)."""
    result, error = 0, None
    if dist.get_rank() == 0:
        try:
            result = action()
        except Exception as exc:  # re-raised below, after the other ranks are told
            error = exc
    # NCCL only takes CUDA tensors; gloo takes CPU ones.
    device = torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
    outcome = torch.tensor([error is None, result], dtype=torch.int64, device=device)
    dist.broadcast(outcome, src=0)
    if error is not None:
        raise error
    if not outcome[0]:
        raise CheckpointError(f"rank 0 failed to {what}; see rank 0's error")
    return int(outcome[1])
