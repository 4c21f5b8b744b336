"""Megatron-Core's optimizer and learning-rate scheduler from the run's configuration."""

from __future__ import annotations

from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_irl.config import TrainConfig
from megatron_irl.core.model import half_precision_dtype


def build_optimizer(cfg: TrainConfig, model_chunks: list) -> MegatronOptimizer:
    opt, training = cfg.optimizer, cfg.training
    config = OptimizerConfig(
        optimizer=opt.optimizer,
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=training.bf16,
        # fp16: Megatron's dynamic loss scaling (initial scale 2**32, halved on overflow).
        fp16=training.fp16,
        params_dtype=half_precision_dtype(training),
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, model_chunks)


# The schedule's settings, compared between a checkpoint's config and this run's on resume.
SCHEDULE_FIELDS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style")


def build_scheduler(cfg: TrainConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Linear warm-up from 0 to ``--lr``, then cosine/linear/constant decay to ``--min-lr``.

    Megatron's scheduler counts samples; ``step(increment=global_batch_size)`` once per step.
    On resume the step count comes from the checkpoint and, by default, the schedule's
    settings from the current configuration (Megatron-LM's ``--override-opt_param-scheduler``,
    so ``--train-iters`` can be extended and ``--lr`` changed; see
    :func:`apply_current_schedule`); ``--use-checkpoint-opt_param-scheduler`` keeps the
    checkpoint's.
    """
    opt = cfg.optimizer
    keep_checkpoint = opt.use_checkpoint_opt_param_scheduler
    samples_per_step = cfg.training.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_iters * samples_per_step,
        lr_decay_steps=opt.lr_decay_iters * samples_per_step,
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=cfg.training.train_iters * samples_per_step,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=keep_checkpoint,
        override_opt_param_scheduler=not keep_checkpoint,
    )


def lr_bounds(optimizer: MegatronOptimizer) -> list[tuple[float, float]]:
    """Each param group's (max_lr, min_lr): Megatron's scheduler reads these before its own."""
    return [(group["max_lr"], group["min_lr"]) for group in optimizer.param_groups]


def apply_current_schedule(optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler,
                           bounds: list[tuple[float, float]]) -> None:
    """After loading a checkpoint: give the param groups back this run's (max_lr, min_lr)
    (``bounds``, from :func:`lr_bounds` before loading) and recompute their learning rates.

    The optimizer's saved param groups carry the checkpoint's ``max_lr`` / ``min_lr``, which
    Megatron's scheduler prefers to its own, so overriding the scheduler alone would leave
    the checkpoint's learning rate in force. Mutates the param groups.
    """
    for group, (max_lr, min_lr) in zip(optimizer.param_groups, bounds, strict=True):
        group["max_lr"], group["min_lr"] = max_lr, min_lr
    scheduler.step(increment=0)


def schedule_changes(saved_config: dict, cfg: TrainConfig) -> list[str]:
    """``--flag old -> new`` for each schedule setting that differs from the checkpoint's."""
    saved = saved_config.get("optimizer", {})
    return [f"{cfg.optimizer.flag(name)} {saved.get(name)} -> {getattr(cfg.optimizer, name)}"
            for name in SCHEDULE_FIELDS if saved.get(name) != getattr(cfg.optimizer, name)]
