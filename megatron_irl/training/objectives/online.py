"""``--irl-loss online``: online IQ-Learn on a micro-batch of dataset and policy rows
(``online_soft_q_loss``; the sampling and normalisation are ``training/online.py``'s)."""

from __future__ import annotations

import torch

from megatron_irl.config import TrainConfig
from megatron_irl.loss import online_soft_q_loss
from megatron_irl.loss.soft_q import td_active_mask
from megatron_irl.training.objectives.base import Objective, SampledStep, masked_sum, per
from megatron_irl.training.objectives.soft_q import SoftQObjective


class OnlineObjective(Objective):
    """``sum(expert terms) + (N_E / N_P) * sum(policy terms)`` of ``online_soft_q_loss``."""

    name = "online"
    batch_fields = ("labels", "loss_mask", "policy_mask", "terminal", "next_position")
    samples_policy = True
    has_td_term = True

    def __init__(self, cfg: TrainConfig, lam: float, policy_weight: float):
        self.irl, self.online = cfg.irl, cfg.online
        self.vocab_size = cfg.model.vocab_size  # the real vocabulary, resolved by train()
        self.lam = lam
        self.policy_weight = policy_weight  # N_E / N_P of the global batch

    @classmethod
    def for_step(cls, cfg: TrainConfig, iteration: int, sampled: SampledStep | None):
        return cls(cfg, cls.lambda_at(cfg.irl, iteration),
                   sampled.expert_tokens / sampled.policy_tokens)

    @classmethod
    def for_evaluation(cls, cfg: TrainConfig, iteration: int):
        return SoftQObjective.for_evaluation(cfg, iteration)

    @classmethod
    def means(cls, sums: dict[str, float], cfg: TrainConfig) -> dict[str, float]:
        """The loss and nll per expert token; td_squared, reward (delta) and u (value
        difference) per TD-active expert / policy token; V per token."""
        means = {
            "loss": per(sums, "loss", "trained_tokens"), "nll": per(sums, "nll", "trained_tokens"),
            "td_squared": per(sums, "td_squared", "td_tokens"),
            "reward": per(sums, "reward", "td_tokens"),
            "u_expert": per(sums, "u_expert", "td_tokens"),
            "u_policy": per(sums, "u_policy", "policy_td_tokens"),
            "value_expert": per(sums, "value_expert", "trained_tokens"),
            "value_policy": per(sums, "value_policy", "policy_tokens"),
            "trained_tokens": sums["trained_tokens"], "policy_tokens": sums["policy_tokens"],
        }
        if cfg.online.td_over == "mixture":
            means["reward_policy"] = per(sums, "reward_policy", "policy_td_tokens")
        return means

    def __call__(self, output, batch: dict):
        loss_mask, policy_mask = batch["loss_mask"], batch["policy_mask"]
        terminal, next_position = batch["terminal"], batch["next_position"]
        out = online_soft_q_loss(
            output, batch["labels"], loss_mask, policy_mask, terminal, lam=self.lam,
            gamma=self.irl.irl_gamma, alpha_mix=self.online.alpha_mix,
            td_over=self.online.td_over, next_position=next_position,
            stop_value_grad=self.irl.irl_stop_value_grad,
            vocab_size=self.vocab_size,
        )
        loss_sum = out.expert_loss.sum() + self.policy_weight * out.policy_loss.sum()
        expert, policy = loss_mask > 0, policy_mask > 0
        td_expert = td_active_mask(loss_mask, terminal, next_position)
        td_policy = td_active_mask(policy_mask, terminal, next_position)
        metric_sums = {
            "loss": loss_sum.detach().float(), "nll": out.nll.detach().sum(),
            "td_squared": masked_sum(out.delta.square(), td_expert),
            "reward": masked_sum(out.delta, td_expert),
            "reward_policy": masked_sum(out.delta, td_policy),  # 0 unless --online-td-over mixture
            "u_expert": masked_sum(out.value_diff, td_expert),
            "u_policy": masked_sum(out.value_diff, td_policy),
            "value_expert": masked_sum(out.value, expert),
            "value_policy": masked_sum(out.value, policy),
            "trained_tokens": expert.sum().float(), "td_tokens": td_expert.sum().float(),
            "policy_tokens": policy.sum().float(), "policy_td_tokens": td_policy.sum().float(),
        }
        return loss_sum, expert.sum().to(torch.int), metric_sums
