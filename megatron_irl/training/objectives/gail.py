"""``--irl-loss gail``: the GAIL baseline on a micro-batch of dataset and policy rows (its
discriminator and the sampling are ``training/online.py``'s)."""

from __future__ import annotations

import torch

from megatron_irl.config import TrainConfig
from megatron_irl.loss import discriminator_loss, gail_policy_loss, gail_reward
from megatron_irl.training.objectives.base import Objective, SampledStep, masked_sum, per
from megatron_irl.training.objectives.soft_q import SoftQObjective


class _NllObjective(SoftQObjective):
    """GAIL's validation score: the soft-Q objective's code with no TD term (plain nll)."""

    has_td_term = False


class GailObjective(Objective):
    """Trains the discriminator on the micro-batch and the policy by REINFORCE on its rewards
    plus MLE, entropy and KL terms (``gail_policy_loss``)."""

    name = "gail"
    batch_fields = ("tokens", "labels", "position_ids", "document_ids", "loss_mask",
                    "policy_mask", "terminal", "ref_log_prob")
    samples_policy = True
    needs_discriminator = True

    def __init__(self, cfg: TrainConfig, discriminator, expert_tokens: float,
                 policy_tokens: float):
        self.irl, self.gail = cfg.irl, cfg.gail
        self.vocab_size = cfg.model.vocab_size  # the real vocabulary, resolved by train()
        self.discriminator = discriminator  # training/online.py's DiscriminatorTrainer
        self.expert_tokens, self.policy_tokens = expert_tokens, policy_tokens

    @classmethod
    def needs_reference(cls, cfg: TrainConfig) -> bool:
        return cfg.gail.kl_weight > 0

    @classmethod
    def for_step(cls, cfg: TrainConfig, iteration: int, sampled: SampledStep | None):
        return cls(cfg, sampled.discriminator, sampled.expert_tokens, sampled.policy_tokens)

    @classmethod
    def for_evaluation(cls, cfg: TrainConfig, iteration: int):
        return _NllObjective.for_evaluation(cfg, iteration)

    @classmethod
    def means(cls, sums: dict[str, float], cfg: TrainConfig) -> dict[str, float]:
        """Loss and nll per expert token, reward (discriminator logit) per policy / expert
        token, return per response, the KL estimate ``log pi - log pi_ref`` per policy token
        (with ``--gail-kl-weight``), the discriminator's loss and its accuracy (balanced over
        the two classes)."""
        means = {
            "loss": per(sums, "loss", "trained_tokens"), "nll": per(sums, "nll", "trained_tokens"),
            "reward": per(sums, "reward", "policy_tokens"),
            "reward_expert": per(sums, "reward_expert", "trained_tokens"),
            "return": per(sums, "return", "responses"),
            "disc_loss": (per(sums, "disc_loss_expert", "trained_tokens")
                          + per(sums, "disc_loss_policy", "policy_tokens")),
            "disc_accuracy": (per(sums, "disc_correct_expert", "trained_tokens")
                              + per(sums, "disc_correct_policy", "policy_tokens")) / 2,
            "trained_tokens": sums["trained_tokens"], "policy_tokens": sums["policy_tokens"],
        }
        if cfg.gail.entropy_weight > 0:
            means["entropy"] = per(sums, "entropy", "policy_tokens")
        if cls.needs_reference(cfg):
            means["kl"] = per(sums, "kl", "policy_tokens")
        return means

    def __call__(self, output, batch: dict):
        labels, terminal = batch["labels"], batch["terminal"]
        loss_mask, policy_mask = batch["loss_mask"], batch["policy_mask"]
        d = self.discriminator.model(batch["tokens"], labels, batch["position_ids"],
                                     batch["document_ids"])  # [b, s]
        bce = discriminator_loss(d, loss_mask, policy_mask)
        disc_expert, disc_policy = bce.expert_loss.sum(), bce.policy_loss.sum()
        # Accumulates the discriminator's gradients now: its graph shares nothing with the policy's.
        (disc_expert / self.expert_tokens + disc_policy / self.policy_tokens).backward()
        gail = self.gail
        out = gail_policy_loss(
            output, labels, loss_mask, policy_mask, terminal, gail_reward(d, policy_mask),
            gamma=self.irl.irl_gamma, mle_weight=gail.mle_weight,
            entropy_weight=gail.entropy_weight, kl_weight=gail.kl_weight,
            ref_log_prob=batch["ref_log_prob"] if gail.kl_weight > 0 else None,
            vocab_size=self.vocab_size,
        )
        policy_weight = self.expert_tokens / self.policy_tokens
        loss_sum = out.expert_loss.sum() + policy_weight * out.policy_loss.sum()
        expert, policy = loss_mask > 0, policy_mask > 0
        starts = policy.clone()
        starts[:, 1:] &= ~policy[:, :-1]  # a response's first policy position
        entropy = out.entropy if out.entropy is not None else torch.zeros_like(d)
        metric_sums = {
            "loss": loss_sum.detach().float(), "nll": -masked_sum(out.log_prob, expert),
            "entropy": masked_sum(entropy, policy), "reward": masked_sum(d, policy),
            "reward_expert": masked_sum(d, expert), "return": masked_sum(out.returns, starts),
            "kl": masked_sum(out.log_prob - batch["ref_log_prob"], policy),
            "disc_loss_expert": disc_expert.detach(), "disc_loss_policy": disc_policy.detach(),
            "disc_correct_expert": ((d > 0) & expert).sum().float(),
            "disc_correct_policy": ((d < 0) & policy).sum().float(),
            "trained_tokens": expert.sum().float(), "policy_tokens": policy.sum().float(),
            "responses": starts.sum().float(),
        }
        return loss_sum, expert.sum().to(torch.int), metric_sums
