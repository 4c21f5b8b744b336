"""The training job: ``train() -> train_step() -> forward_step()`` on Megatron-Core.

One step: this rank's micro-batches of the global batch go through Megatron-Core's pipeline
schedule (``get_forward_backward_func``: no pipelining, 1F1B or interleaved), the objective
runs on the last pipeline stage, ``finalize_model_grads`` reduces gradients over data
parallelism and divides them by the global batch's trained-token count, and Megatron's
optimizer clips and steps. The objective is the ``--irl-loss`` class of the registry
(``training/objectives/``), built afresh each step; one that samples the policy
(``Objective.samples_policy``: ``training/online.py``) first draws or reuses the policy's
samples, which join every micro-batch as extra rows.
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
from megatron_irl.core.checkpoint import (
    TrainingState,
    iteration_dir,
    load_checkpoint,
    save_checkpoint,
)
from megatron_irl.core.checkpoint_finalize import BackgroundSaves
from megatron_irl.core.distributed import (
    init_distributed,
    is_logging_rank,
    shutdown_distributed,
)
from megatron_irl.core.model import (
    HiddenStatesAndWeight,
    build_model_chunks,
    uses_thd,
    wrap_data_parallel,
)
from megatron_irl.core.vocabulary import check_vocab_padding, real_vocab_size
from megatron_irl.cpu_support import current_device
from megatron_irl.data import (
    EvalBatches,
    SFTDataset,
    TrainingBatches,
    block_causal_attention_mask,
    load_tokenizer,
)
from megatron_irl.data.packed_attention import thd_packed_seq_params
from megatron_irl.training.logger import TrainingLogger
from megatron_irl.training.nonfinite import (
    NonFiniteSteps,
    NonFiniteTrainingError,
    optimizer_step,
    weights_are_finite,
)
from megatron_irl.training.objectives import OBJECTIVES, Objective
from megatron_irl.training.online import OnlineTraining
from megatron_irl.training.optimizer import (
    SCHEDULE_FIELDS,
    apply_current_schedule,
    build_optimizer,
    build_scheduler,
    lr_bounds,
    schedule_changes,
)
from megatron_irl.training.signals import install_stop_handlers, stop_signal_received


def forward_step(data_iterator, model, objective: Objective, thd: bool = False):
    """Megatron's forward-step contract: the stage's output and the loss function for it.

    ``thd`` (``uses_thd``): the micro-batch's rows go in as one THD sequence of ``b * s``
    tokens with ``PackedSeqParams``, and the loss gets the output back as ``[b, s, ...]``;
    otherwise with the block-causal mask.
    """
    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {name: tensor.cuda(non_blocking=True) for name, tensor in batch.items()}
    if thd:
        b, s = batch["tokens"].shape
        output = model(batch["tokens"].reshape(1, b * s), batch["position_ids"].reshape(1, b * s),
                       None, packed_seq_params=thd_packed_seq_params(batch["document_ids"]))
        return output, partial(_loss_on_rows, objective=objective, batch=batch, rows=b)
    attention_mask = block_causal_attention_mask(batch["document_ids"])  # [b, 1, s, s]
    output = model(batch["tokens"], batch["position_ids"], attention_mask)  # logits [b, s, v/tp]
    return output, partial(objective, batch=batch)


def rows_of_flattened_output(output, rows: int):
    """The last stage's output for a THD micro-batch (``[1, b*s, ...]`` logits, or
    HiddenStatesAndWeight) as ``[b, s, ...]``, the layout of the batch's fields."""
    if isinstance(output, HiddenStatesAndWeight):
        return output._replace(hidden=output.hidden.reshape(rows, -1, output.hidden.shape[-1]))
    return output.reshape(rows, -1, output.shape[-1])


def _loss_on_rows(output, objective: Objective, batch: dict, rows: int):
    return objective(rows_of_flattened_output(output, rows), batch=batch)


def _run_schedule(model, micro_batches, objective, cfg: TrainConfig, forward_only: bool):
    """The objective's named metric sums over this rank's micro-batches, all-reduced over data
    parallelism (on the last pipeline stage; None elsewhere)."""
    thd = uses_thd(cfg)
    rows = micro_batches[0]["tokens"].shape[0]  # --micro-batch-size, plus online policy rows
    per_micro_batch = get_forward_backward_func()(
        forward_step_func=partial(forward_step, objective=objective, thd=thd),
        # Interleaving gives each model chunk its own pass over the micro-batches.
        data_iterator=[iter(micro_batches) for _ in model] if len(model) > 1
        else iter(micro_batches),
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(micro_batches),
        # The activations between pipeline stages: [s, rows, h], or one THD sequence.
        seq_length=cfg.model.seq_length * (rows if thd else 1),
        micro_batch_size=1 if thd else rows,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    names = list(per_micro_batch[0])
    metric_sums = torch.stack([torch.stack([sums[name] for name in names])
                               for sums in per_micro_batch]).sum(dim=0)  # [len(names)]
    dist.all_reduce(metric_sums, group=parallel_state.get_data_parallel_group())
    return dict(zip(names, metric_sums.unbind()))


def train_step(model, optimizer, scheduler, micro_batches, objective, cfg: TrainConfig):
    """One optimizer step on one global batch; skipped (no update) when its loss or gradient
    norm is not finite (``training/nonfinite.py``) or the fp16 loss scaler overflows.

    Returns the metric sums (None off the last pipeline stage), the step's scalars (learning
    rate, gradient norm before clipping, whether the step was skipped) and whether the step
    counts as non-finite. As in Megatron-LM the scheduler advances only on updates.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metric_sums = _run_schedule(model, micro_batches, objective, cfg, forward_only=False)
    lr = optimizer.param_groups[0]["lr"]
    updated, grad_norm, nonfinite = optimizer_step(optimizer, metric_sums, cfg.training.fp16)
    if updated:
        scheduler.step(increment=cfg.training.global_batch_size)
    scalars = {"lr": lr, "grad_norm": grad_norm, "skipped": float(not updated)}
    if cfg.training.fp16:
        # Dynamic loss scaling skips the steps whose gradients overflow and lowers the scale.
        scalars["loss_scale"] = float(optimizer.get_loss_scale())
    return metric_sums, scalars, nonfinite


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
                        device=current_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _num_microbatches(cfg: TrainConfig) -> int:
    dp_size = parallel_state.get_data_parallel_world_size()
    return cfg.training.global_batch_size // (cfg.training.micro_batch_size * dp_size)


def _setup_data(cfg: TrainConfig, log: TrainingLogger):
    tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.chat_template)
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
    chunks = build_model_chunks(cfg, vocab_size, thd=uses_thd(cfg))
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
    current_bounds = lr_bounds(trainable.optimizer)
    load_optimizer = not (ckpt.no_load_optim or ckpt.finetune)
    state = load_checkpoint(
        ckpt.load, trainable.chunks, trainable.optimizer, trainable.scheduler,
        load_optimizer=load_optimizer,
        load_rng=not (ckpt.no_load_rng or ckpt.finetune),
        ckpt_step=ckpt.ckpt_step,
    )
    log.info(f"loaded checkpoint {ckpt.load} at iteration {state.iteration}"
             + (" (weights only: --finetune)" if ckpt.finetune else ""))
    if ckpt.finetune:
        return fresh
    changes = schedule_changes(state.config, cfg)
    keep_checkpoint = cfg.optimizer.use_checkpoint_opt_param_scheduler
    if not keep_checkpoint:
        apply_current_schedule(trainable.optimizer, trainable.scheduler, current_bounds)
    if changes and load_optimizer:
        log.info("learning-rate schedule differs from the checkpoint's: " + ", ".join(changes)
                 + ("; keeping the checkpoint's (--use-checkpoint-opt_param-scheduler)"
                    if keep_checkpoint else "; this run's values apply"))
    saved_optimizer = state.config.get("optimizer", {})
    state.config = cfg.to_dict()
    if keep_checkpoint and load_optimizer:  # the saved config.yaml tells what applies
        state.config["optimizer"].update({name: saved_optimizer[name] for name in SCHEDULE_FIELDS
                                          if name in saved_optimizer})
    return state


def train(cfg: TrainConfig) -> TrainingState:
    """Run (or resume) the training job described by ``cfg``; returns the final state."""
    install_stop_handlers()  # idempotent; ``megatron-irl train`` installs them earlier still
    init_distributed(cfg.parallel, cfg.training.seed, cfg.training.device)
    try:
        with TrainingLogger(cfg.logging, cfg.training.train_iters, is_logging_rank()) as log:
            tokenizer, train_batches, eval_batches = _setup_data(cfg, log)
            # Concrete from here on (and in the checkpoints' config): every loss masks the
            # padding above it, and eval / rewards / export read it back.
            cfg.model.vocab_size = real_vocab_size(cfg.model, tokenizer.vocab_size)
            check_vocab_padding(cfg, cfg.model.vocab_size)  # as ``megatron-irl plan`` does
            trainable = build_trainable(cfg, cfg.model.vocab_size)
            state = _restore(cfg, trainable, log)
            online = _setup_online(cfg, trainable, tokenizer, train_batches, state, log)
            return _train_loop(cfg, trainable, state, train_batches, eval_batches, log, online)
    finally:
        shutdown_distributed()


def _setup_online(cfg: TrainConfig, trainable: Trainable, tokenizer,
                  train_batches: TrainingBatches, state: TrainingState,
                  log: TrainingLogger) -> OnlineTraining | None:
    """The sampler (and GAIL discriminator) of an objective that samples the policy, resumed
    from the ``--load`` checkpoint; None for the others."""
    if not OBJECTIVES[cfg.irl.loss].samples_policy:
        return None
    online = OnlineTraining(cfg, trainable.model, trainable.chunks[0], tokenizer,
                            train_batches.dataset, _num_microbatches(cfg))
    resumed = bool(cfg.checkpoint.load) and not cfg.checkpoint.finetune
    for message in online.start_reference(cfg.checkpoint.load if resumed else None):
        log.info(message)
    if resumed:
        for message in online.load(iteration_dir(cfg.checkpoint.load, state.iteration)):
            log.info(message)
    return online


def _train_loop(cfg: TrainConfig, trainable: Trainable, state: TrainingState,
                train_batches: TrainingBatches, eval_batches, log: TrainingLogger,
                online: OnlineTraining | None):
    """Steps until ``--train-iters``, ``--exit-interval`` or a termination signal.

    With ``--async-save`` a save's background write is polled after every step, and waited
    for before the next save and before returning or stopping on non-finite steps.
    """
    model = trainable.model
    background = BackgroundSaves() if cfg.checkpoint.async_save else None
    objective_class = OBJECTIVES[cfg.irl.loss]
    tokens_per_step = cfg.training.global_batch_size * cfg.model.seq_length
    last_saved = state.iteration if cfg.checkpoint.load else None
    nonfinite_steps = NonFiniteSteps(cfg.training.max_nonfinite_steps)
    if state.iteration >= cfg.training.train_iters:
        log.info(f"nothing to train: the checkpoint is at iteration {state.iteration} and "
                 f"--train-iters is {cfg.training.train_iters}; raise --train-iters to train on")
        return state
    log.begin(state.iteration)
    while state.iteration < cfg.training.train_iters:
        start = time.monotonic()
        lam = objective_class.lambda_at(cfg.irl, state.iteration)
        micro_batches = train_batches.batches_for_iteration(state.iteration)
        sampled = None
        if online is not None:
            sampled, micro_batches = online.prepare_step(state.iteration, micro_batches)
        objective = objective_class.for_step(cfg, state.iteration, sampled)
        metric_sums, step_scalars, nonfinite = train_step(
            model, trainable.optimizer, trainable.scheduler, micro_batches, objective, cfg)
        if online is not None:
            step_scalars.update(online.finish_step())
        _finalize_saves(background, log, blocking=False)
        state.iteration += 1
        state.consumed_samples += cfg.training.global_batch_size
        nonfinite_steps.record(nonfinite)
        if metric_sums is not None:
            scalars = {**objective_class.means(_floats(metric_sums), cfg), **step_scalars,
                       "lambda": lam,
                       "nonfinite_steps": nonfinite_steps.total}
            log.log_step(state.iteration, scalars, tokens_per_step / (time.monotonic() - start))
        if nonfinite:
            log.info(f"iteration {state.iteration}: non-finite loss or gradient norm, step "
                     "skipped (no update)")
            try:
                nonfinite_steps.stop_at_the_limit(state.iteration, last_saved)
            except NonFiniteTrainingError:  # the pending save's weights were finite
                _finalize_saves(background, log, blocking=True)
                raise
        if eval_batches is not None and state.iteration % cfg.training.eval_interval == 0:
            # Of the step just trained (lambda and all), on the dataset rows only.
            eval_objective = objective_class.for_evaluation(cfg, state.iteration - 1)
            eval_sums = evaluate(model, eval_batches, eval_objective, cfg)
            if eval_sums is not None:
                log.log_eval(state.iteration, type(eval_objective).means(_floats(eval_sums), cfg))

        signalled = _stop_requested()
        exiting = signalled or _is_multiple(state.iteration, cfg.training.exit_interval)
        if exiting or _is_multiple(state.iteration, cfg.checkpoint.save_interval):
            last_saved = _save(cfg, trainable, state, log, online, background)
        if exiting:
            _finalize_saves(background, log, blocking=True)
            reason = "a termination signal" if signalled else "--exit-interval"
            log.info(f"stopping at iteration {state.iteration} on {reason}")
            return state
    if last_saved != state.iteration:
        _save(cfg, trainable, state, log, online, background)
    _finalize_saves(background, log, blocking=True)
    return state


def _floats(metric_sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The metric sums as Python numbers (one device synchronisation)."""
    return dict(zip(metric_sums, torch.stack(list(metric_sums.values())).tolist()))


def _save(cfg: TrainConfig, trainable: Trainable, state: TrainingState, log,
          online: OnlineTraining | None, background: BackgroundSaves | None) -> int | None:
    """Save a checkpoint when ``--save`` is set; returns the iteration saved (or None). With
    ``background`` (``--async-save``) the previous save is completed first and this one is
    scheduled: it completes in a later ``_finalize_saves``."""
    if not cfg.checkpoint.save:
        return None
    _finalize_saves(background, log, blocking=True)
    if not weights_are_finite(trainable.chunks):
        raise NonFiniteTrainingError(
            f"the weights at iteration {state.iteration} hold non-finite values: not saving "
            f"them (the latest checkpoint stays as it was); resume from it with a lower --lr")
    save_checkpoint(cfg.checkpoint.save, state, trainable.chunks, trainable.optimizer,
                    trainable.scheduler, write_extra=online.save if online else None,
                    keep_last=cfg.checkpoint.keep_last_checkpoints,
                    optimizer_fully_reshardable=cfg.checkpoint.dist_ckpt_optim_fully_reshardable,
                    fully_parallel=cfg.checkpoint.ckpt_fully_parallel_save, background=background)
    if background is None or not background.pending_iterations:
        log.info(f"saved checkpoint at iteration {state.iteration} to {cfg.checkpoint.save}")
    else:
        log.info(f"scheduled the save of iteration {state.iteration} to {cfg.checkpoint.save}: "
                 "its tensors are written in the background (--async-save)")
    return state.iteration


def _finalize_saves(background: BackgroundSaves | None, log, blocking: bool) -> None:
    """Complete the background saves whose writes have ended (``blocking``: wait for them)."""
    if background is None:
        return
    for iteration, directory in background.finalize(blocking):
        log.info(f"saved checkpoint at iteration {iteration} to {directory} (its background "
                 "write finished)")
