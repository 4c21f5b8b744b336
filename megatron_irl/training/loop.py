"""The training job: ``train() -> train_step() -> forward_step()`` on Megatron-Core.

One step: this rank's micro-batches of the global batch go through Megatron-Core's pipeline
schedule (``get_forward_backward_func``: no pipelining, 1F1B or interleaved), the objective
runs on the last pipeline stage, ``finalize_model_grads`` reduces gradients over data
parallelism and divides them by the global batch's trained-token count, and Megatron's
optimizer clips and steps. With ``--irl-loss online`` / ``gail`` (``training/online.py``) each
step first draws or reuses the policy's samples, which join every micro-batch as extra rows,
and the objective is the online one.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_irl.config import TrainConfig
from megatron_irl.config_online import SAMPLING_LOSSES
from megatron_irl.data import (
    EvalBatches,
    SFTDataset,
    TrainingBatches,
    block_causal_attention_mask,
    load_tokenizer,
)
from megatron_irl.planning import real_vocab_size
from megatron_irl.training.checkpoint import (
    TrainingState,
    iteration_dir,
    load_checkpoint,
    save_checkpoint,
)
from megatron_irl.training.distributed import (
    init_distributed,
    is_logging_rank,
    shutdown_distributed,
)
from megatron_irl.training.logger import TrainingLogger
from megatron_irl.training.model import build_model_chunks, wrap_data_parallel
from megatron_irl.training.objective import Objective, metric_means
from megatron_irl.training.online import OnlineTraining
from megatron_irl.training.optimizer import build_optimizer, build_scheduler
from megatron_irl.training.signals import install_stop_handlers, stop_signal_received


def forward_step(data_iterator, model, objective: Objective):
    """Megatron's forward-step contract: the stage's output and the loss function for it."""
    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {name: tensor.cuda(non_blocking=True) for name, tensor in batch.items()}
    attention_mask = block_causal_attention_mask(batch["document_ids"])  # [b, 1, s, s]
    output = model(batch["tokens"], batch["position_ids"], attention_mask)  # logits [b, s, v/tp]
    return output, partial(objective, batch=batch)


def _run_schedule(model, micro_batches, objective, cfg: TrainConfig, forward_only: bool):
    """Metric sums over this rank's micro-batches, all-reduced over data parallelism
    (a ``[len(METRICS)]`` tensor on the last pipeline stage, None elsewhere)."""
    per_micro_batch = get_forward_backward_func()(
        forward_step_func=partial(forward_step, objective=objective),
        # Interleaving gives each model chunk its own pass over the micro-batches.
        data_iterator=[iter(micro_batches) for _ in model] if len(model) > 1
        else iter(micro_batches),
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(micro_batches),
        seq_length=cfg.model.seq_length,
        # --micro-batch-size rows, plus the policy rows of --irl-loss online / gail.
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    metric_sums = torch.stack(per_micro_batch).sum(dim=0)
    dist.all_reduce(metric_sums, group=parallel_state.get_data_parallel_group())
    return metric_sums


def train_step(model, optimizer, scheduler, micro_batches, objective, cfg: TrainConfig):
    """One optimizer step on one global batch.

    Returns the metric sums (None off the last pipeline stage) and the step's learning rate
    and gradient norm (before clipping).
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metric_sums = _run_schedule(model, micro_batches, objective, cfg, forward_only=False)
    lr = optimizer.param_groups[0]["lr"]
    updated, grad_norm, _ = optimizer.step()
    scheduler.step(increment=cfg.training.global_batch_size)
    scalars = {"lr": lr, "grad_norm": float(grad_norm or 0.0)}
    if cfg.training.fp16:
        # Dynamic loss scaling skips the steps whose gradients overflow and lowers the scale.
        scalars.update(loss_scale=float(optimizer.get_loss_scale()), skipped=float(not updated))
    return metric_sums, scalars


@torch.no_grad()
def evaluate(model, eval_batches: EvalBatches, objective, cfg: TrainConfig):
    """Forward-only pass over the first ``--eval-iters`` global batches of the validation set."""
    for chunk in model:
        chunk.eval()
    limit = cfg.training.eval_iters * _num_microbatches(cfg)
    micro_batches = list(itertools.islice(eval_batches, limit))
    metric_sums = _run_schedule(model, micro_batches, objective, cfg, forward_only=True)
    for chunk in model:
        chunk.train()
    return metric_sums


def _is_multiple(iteration: int, interval: int | None) -> bool:
    return interval is not None and iteration % interval == 0


def _stop_requested() -> bool:
    """Whether any rank got a stop signal: every rank must agree when to stop (MAX)."""
    flag = torch.tensor([int(stop_signal_received())],
                        device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _num_microbatches(cfg: TrainConfig) -> int:
    dp_size = parallel_state.get_data_parallel_world_size()
    return cfg.training.global_batch_size // (cfg.training.micro_batch_size * dp_size)


def _setup_data(cfg: TrainConfig, log: TrainingLogger):
    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    train_set = SFTDataset(cfg.data.train_data_path, tokenizer, cfg.model.seq_length,
                           strict=cfg.data.strict)
    log.info(train_set.report.format())
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    train_batches = TrainingBatches(train_set, cfg.training.micro_batch_size,
                                    _num_microbatches(cfg), dp_rank, dp_size,
                                    seed=cfg.data.data_seed)
    eval_batches = None
    if cfg.data.valid_data_path:
        valid_set = SFTDataset(cfg.data.valid_data_path, tokenizer, cfg.model.seq_length,
                               strict=cfg.data.strict)
        eval_batches = EvalBatches(valid_set, cfg.training.micro_batch_size, dp_rank, dp_size)
    return tokenizer, train_batches, eval_batches


@dataclass
class Trainable:
    """This rank's model chunks (unwrapped and DDP-wrapped), optimizer and scheduler."""

    chunks: list
    model: list
    optimizer: object
    scheduler: object


def build_trainable(cfg: TrainConfig, vocab_size: int) -> Trainable:
    """The model, Megatron-Core's optimizer and scheduler, and the schedule's hooks."""
    chunks = build_model_chunks(cfg, vocab_size)
    model = wrap_data_parallel(cfg, chunks)
    optimizer = build_optimizer(cfg, model)
    config = chunks[0].config
    # After backward: reduce gradients over data parallelism (and the tied embedding across
    # pipeline stages) and divide them by the global batch's trained-token count.
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [chunk.no_sync for chunk in model] if len(model) > 1 else model[0].no_sync
    return Trainable(chunks, model, optimizer, build_scheduler(cfg, optimizer))


def _restore(cfg: TrainConfig, trainable: Trainable, log: TrainingLogger) -> TrainingState:
    """The starting state: fresh, resumed from ``--load``, or weights only (``--finetune``)."""
    fresh = TrainingState(iteration=0, consumed_samples=0, config=cfg.to_dict())
    if not cfg.checkpoint.load:
        return fresh
    ckpt = cfg.checkpoint
    state = load_checkpoint(
        ckpt.load, trainable.chunks, trainable.optimizer, trainable.scheduler,
        load_optimizer=not (ckpt.no_load_optim or ckpt.finetune),
        load_rng=not (ckpt.no_load_rng or ckpt.finetune),
    )
    log.info(f"loaded checkpoint {ckpt.load} at iteration {state.iteration}"
             + (" (weights only: --finetune)" if ckpt.finetune else ""))
    if ckpt.finetune:
        return fresh
    state.config = cfg.to_dict()
    return state


def train(cfg: TrainConfig) -> TrainingState:
    """Run (or resume) the training job described by ``cfg``; returns the final state."""
    install_stop_handlers()  # idempotent; ``megatron_irl.train`` installs them earlier still
    init_distributed(cfg.parallel, cfg.training.seed)
    try:
        with TrainingLogger(cfg.logging, cfg.training.train_iters, is_logging_rank()) as log:
            tokenizer, train_batches, eval_batches = _setup_data(cfg, log)
            # Concrete from here on (and in the checkpoints' config): every loss masks the
            # padding above it, and eval / rewards / export read it back.
            cfg.model.vocab_size = real_vocab_size(cfg.model, tokenizer.vocab_size)
            trainable = build_trainable(cfg, cfg.model.vocab_size)
            state = _restore(cfg, trainable, log)
            online = _setup_online(cfg, trainable, tokenizer, train_batches, state, log)
            return _train_loop(cfg, trainable, state, train_batches, eval_batches, log, online)
    finally:
        shutdown_distributed()


def _setup_online(cfg: TrainConfig, trainable: Trainable, tokenizer,
                  train_batches: TrainingBatches, state: TrainingState,
                  log: TrainingLogger) -> OnlineTraining | None:
    """The sampler (and GAIL discriminator) of ``--irl-loss online`` / ``gail``, resumed from
    the ``--load`` checkpoint; None for the offline losses."""
    if cfg.irl.loss not in SAMPLING_LOSSES:
        return None
    online = OnlineTraining(cfg, trainable.model, trainable.chunks[0], tokenizer,
                            train_batches.dataset, _num_microbatches(cfg))
    if cfg.checkpoint.load and not cfg.checkpoint.finetune:
        for message in online.load(iteration_dir(cfg.checkpoint.load, state.iteration)):
            log.info(message)
    return online


def _train_loop(cfg: TrainConfig, trainable: Trainable, state: TrainingState,
                train_batches: TrainingBatches, eval_batches, log: TrainingLogger,
                online: OnlineTraining | None):
    """Steps until ``--train-iters``, ``--exit-interval`` or a termination signal."""
    model = trainable.model
    tokens_per_step = cfg.training.global_batch_size * cfg.model.seq_length
    last_saved = state.iteration if cfg.checkpoint.load else None
    log.begin(state.iteration)
    while state.iteration < cfg.training.train_iters:
        start = time.monotonic()
        # Also evaluates online / gail runs.
        objective = Objective(cfg.irl, state.iteration, cfg.model.vocab_size)
        micro_batches = train_batches.batches_for_iteration(state.iteration)
        step_objective, means = objective, metric_means
        if online is not None:
            step_objective, micro_batches = online.prepare_step(state.iteration, micro_batches,
                                                                objective.lam)
            means = online.metric_means
        metric_sums, step_scalars = train_step(model, trainable.optimizer, trainable.scheduler,
                                               micro_batches, step_objective, cfg)
        if online is not None:
            step_scalars.update(online.finish_step())
        state.iteration += 1
        state.consumed_samples += cfg.training.global_batch_size
        if metric_sums is not None:
            scalars = {**means(metric_sums), **step_scalars, "lambda": objective.lam}
            log.log_step(state.iteration, scalars, tokens_per_step / (time.monotonic() - start))
        if eval_batches is not None and state.iteration % cfg.training.eval_interval == 0:
            eval_sums = evaluate(model, eval_batches, objective, cfg)
            if eval_sums is not None:
                log.log_eval(state.iteration, metric_means(eval_sums))

        signalled = _stop_requested()
        exiting = signalled or _is_multiple(state.iteration, cfg.training.exit_interval)
        if exiting or _is_multiple(state.iteration, cfg.checkpoint.save_interval):
            last_saved = _save(cfg, trainable, state, log, online)
        if exiting:
            reason = "a termination signal" if signalled else "--exit-interval"
            log.info(f"stopping at iteration {state.iteration} on {reason}")
            return state
    if last_saved != state.iteration:
        _save(cfg, trainable, state, log, online)
    return state


def _save(cfg: TrainConfig, trainable: Trainable, state: TrainingState, log,
          online: OnlineTraining | None) -> int | None:
    """Save a checkpoint when ``--save`` is set; returns the iteration saved (or None)."""
    if not cfg.checkpoint.save:
        return None
    save_checkpoint(cfg.checkpoint.save, state, trainable.chunks, trainable.optimizer,
                    trainable.scheduler, write_extra=online.save if online else None)
    log.info(f"saved checkpoint at iteration {state.iteration} to {cfg.checkpoint.save}")
    return state.iteration
