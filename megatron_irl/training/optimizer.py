"""Megatron-Core's optimizer and learning-rate scheduler from the run's configuration."""

from __future__ import annotations

from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_irl.config import TrainConfig
from megatron_irl.training.model import half_precision_dtype


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


def build_scheduler(cfg: TrainConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Linear warm-up from 0 to ``--lr``, then cosine/linear/constant decay to ``--min-lr``.

    Megatron's scheduler counts samples; ``step(increment=global_batch_size)`` once per step.
    On resume the step count comes from the checkpoint and the schedule's shape from the
    current configuration (so ``--train-iters`` can be extended).
    """
    opt = cfg.optimizer
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
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
