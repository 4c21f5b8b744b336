"""The training step of ``--irl-loss online`` (online IQ-Learn) and ``gail`` (the GAIL baseline).

``OnlineTraining`` brackets each step of the loop:

* ``prepare_step`` draws (or reuses) the policy's samples (``PolicySampler``), appends them to
  every micro-batch as ``--online-policy-rows-per-micro-batch`` rows after the dataset rows
  (``[b_E + b_P, s]``: pipeline stages exchange activations of that fixed shape), counts the
  global batch's expert and policy tokens N_E, N_P (one all-reduce over data parallelism) and
  returns the step's objective;
* the schedule runs the objective on the last pipeline stage, as the offline one;
* ``finish_step`` steps the GAIL discriminator and returns the step's scalars.

Normalisation, with Megatron's per-token contract (``objective.py``): a micro-batch returns
``sum(expert terms) + (N_E / N_P) * sum(policy terms)`` and its own expert token count; the
schedule divides the gradients by the global N_E, so the step minimises
``sum(expert terms) / N_E + sum(policy terms) / N_P`` over the global batch exactly
(``loss/online.py``, ``loss/gail.py``).

The GAIL discriminator lives on the last pipeline stage, replicated over tensor parallelism (it
sees the same batch there): the objective computes its logits on each micro-batch, backpropagates
its loss at once (a graph of its own) and uses the logits, detached, as rewards; ``finish_step``
sums its gradients over data parallelism and steps its Adam. Its weights and Adam state are
saved with each checkpoint as ``discriminator.pt`` (written by tensor- and data-parallel rank
0 of the last stage, read by every last-stage rank).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_irl.config import TrainConfig
from megatron_irl.cpu_support import current_device
from megatron_irl.loss import discriminator_loss, gail_policy_loss, gail_reward, online_soft_q_loss
from megatron_irl.loss.soft_q import td_active_mask
from megatron_irl.training.discriminator import TokenDiscriminator
from megatron_irl.training.reference import ReferencePolicy
from megatron_irl.training.sampling import PolicySampler, all_reduce_dp, mix_in, save_synced

# Sums per micro-batch, all-reduced over data parallelism by the loop (see the *_means below).
ONLINE_METRICS = ("loss", "nll", "td_squared", "reward", "reward_policy", "u_expert", "u_policy",
                  "value_expert", "value_policy", "trained_tokens", "td_tokens", "policy_tokens",
                  "policy_td_tokens")
GAIL_METRICS = ("loss", "nll", "entropy", "reward", "reward_expert", "return", "kl",
                "disc_loss_expert", "disc_loss_policy", "disc_correct_expert",
                "disc_correct_policy", "trained_tokens", "policy_tokens", "responses")


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values.detach().float(), 0.0).sum()


def _per(sums: dict, name: str, count: str) -> float:
    return sums[name] / max(sums[count], 1.0)


class OnlineObjective:
    """Online IQ-Learn on a micro-batch of dataset and policy rows (``online_soft_q_loss``)."""

    def __init__(self, cfg: TrainConfig, lam: float, policy_weight: float):
        self.irl, self.online = cfg.irl, cfg.online
        self.vocab_size = cfg.model.vocab_size  # the real vocabulary, resolved by train()
        self.lam = lam
        self.policy_weight = policy_weight  # N_E / N_P of the global batch

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
        metric_sums = torch.stack([
            loss_sum.detach().float(), out.nll.detach().sum(),
            _masked_sum(out.delta.square(), td_expert), _masked_sum(out.delta, td_expert),
            _masked_sum(out.delta, td_policy),  # 0 unless --online-td-over mixture
            _masked_sum(out.value_diff, td_expert), _masked_sum(out.value_diff, td_policy),
            _masked_sum(out.value, expert), _masked_sum(out.value, policy),
            *(mask.sum().float() for mask in (expert, td_expert, policy, td_policy)),
        ])
        return loss_sum, expert.sum().to(torch.int), metric_sums


def online_metric_means(metric_sums: torch.Tensor, td_over: str) -> dict[str, float]:
    """Means of ``ONLINE_METRICS`` sums: the loss and nll per expert token; td_squared, reward
    (delta) and u (value difference) per TD-active expert / policy token; V per token."""
    sums = dict(zip(ONLINE_METRICS, metric_sums.tolist()))
    means = {
        "loss": _per(sums, "loss", "trained_tokens"), "nll": _per(sums, "nll", "trained_tokens"),
        "td_squared": _per(sums, "td_squared", "td_tokens"),
        "reward": _per(sums, "reward", "td_tokens"),
        "u_expert": _per(sums, "u_expert", "td_tokens"),
        "u_policy": _per(sums, "u_policy", "policy_td_tokens"),
        "value_expert": _per(sums, "value_expert", "trained_tokens"),
        "value_policy": _per(sums, "value_policy", "policy_tokens"),
        "trained_tokens": sums["trained_tokens"], "policy_tokens": sums["policy_tokens"],
    }
    if td_over == "mixture":
        means["reward_policy"] = _per(sums, "reward_policy", "policy_td_tokens")
    return means


class DiscriminatorTrainer:
    """The GAIL discriminator of a last-stage rank: model, Adam, checkpoint file.

    Built identically on every rank that has one (seeded by ``--seed`` in a forked RNG, so the
    run's own random streams are untouched).
    """

    FILENAME = "discriminator.pt"

    def __init__(self, cfg: TrainConfig, vocab_size: int):
        gail = cfg.gail
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.training.seed)
            model = TokenDiscriminator(vocab_size, cfg.model.seq_length,
                                       hidden_size=gail.disc_hidden_size,
                                       num_layers=gail.disc_num_layers,
                                       num_heads=gail.disc_num_heads)
        self.model = model.to(current_device())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=gail.disc_lr)

    def step(self) -> None:
        """Sum the gradients over data parallelism (each rank's are already divided by the
        global token counts), step Adam and clear them. Collective over the DP group."""
        params = list(self.model.parameters())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in params])
        dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
        for param, grad in zip(params, flat.split([p.numel() for p in params])):
            param.grad = grad.view_as(param)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: str) -> None:
        if parallel_state.get_tensor_model_parallel_rank() == 0 \
                and parallel_state.get_data_parallel_rank() == 0:
            save_synced({"model": self.model.state_dict(),
                         "optimizer": self.optimizer.state_dict()},
                        os.path.join(directory, self.FILENAME))

    def load(self, directory: str) -> str:
        path = os.path.join(directory, self.FILENAME)
        if not os.path.exists(path):
            return f"no {self.FILENAME} in {directory}: the discriminator starts afresh"
        device = next(self.model.parameters()).device
        state = torch.load(path, weights_only=True, map_location=device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return f"loaded the discriminator from {path}"


class GailObjective:
    """GAIL on a micro-batch of dataset and policy rows: trains the discriminator on it and the
    policy by REINFORCE on its rewards plus MLE, entropy and KL terms (``gail_policy_loss``)."""

    def __init__(self, cfg: TrainConfig, discriminator: DiscriminatorTrainer,
                 expert_tokens: float, policy_tokens: float):
        self.irl, self.gail = cfg.irl, cfg.gail
        self.vocab_size = cfg.model.vocab_size  # the real vocabulary, resolved by train()
        self.discriminator = discriminator
        self.expert_tokens, self.policy_tokens = expert_tokens, policy_tokens

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
        metric_sums = torch.stack([
            loss_sum.detach().float(), -_masked_sum(out.log_prob, expert),
            _masked_sum(entropy, policy), _masked_sum(d, policy), _masked_sum(d, expert),
            _masked_sum(out.returns, starts),
            _masked_sum(out.log_prob - batch["ref_log_prob"], policy),
            disc_expert.detach(), disc_policy.detach(),
            ((d > 0) & expert).sum().float(), ((d < 0) & policy).sum().float(),
            *(mask.sum().float() for mask in (expert, policy, starts)),
        ])
        return loss_sum, expert.sum().to(torch.int), metric_sums


def gail_metric_means(metric_sums: torch.Tensor, with_entropy: bool,
                      with_kl: bool) -> dict[str, float]:
    """Means of ``GAIL_METRICS`` sums: loss and nll per expert token, reward (discriminator
    logit) per policy / expert token, return per response, the KL estimate ``log pi -
    log pi_ref`` per policy token (with ``--gail-kl-weight``), the discriminator's loss and
    its accuracy (balanced over the two classes)."""
    sums = dict(zip(GAIL_METRICS, metric_sums.tolist()))
    means = {
        "loss": _per(sums, "loss", "trained_tokens"), "nll": _per(sums, "nll", "trained_tokens"),
        "reward": _per(sums, "reward", "policy_tokens"),
        "reward_expert": _per(sums, "reward_expert", "trained_tokens"),
        "return": _per(sums, "return", "responses"),
        "disc_loss": (_per(sums, "disc_loss_expert", "trained_tokens")
                      + _per(sums, "disc_loss_policy", "policy_tokens")),
        "disc_accuracy": (_per(sums, "disc_correct_expert", "trained_tokens")
                          + _per(sums, "disc_correct_policy", "policy_tokens")) / 2,
        "trained_tokens": sums["trained_tokens"], "policy_tokens": sums["policy_tokens"],
    }
    if with_entropy:
        means["entropy"] = _per(sums, "entropy", "policy_tokens")
    if with_kl:
        means["kl"] = _per(sums, "kl", "policy_tokens")
    return means


class OnlineTraining:
    """Sampling, the step's objective and the discriminator of a sampling loss (module doc).

    Args:
        cfg: the run's configuration (``--irl-loss online`` or ``gail``).
        model, chunk: this rank's DDP-wrapped model chunks and the unwrapped one (exactly one:
            virtual pipeline stages are rejected by the configuration).
        tokenizer, dataset, num_microbatches: the training data's.
    """

    def __init__(self, cfg: TrainConfig, model: list, chunk, tokenizer, dataset,
                 num_microbatches: int):
        self.cfg = cfg
        self.chunk = chunk
        self.reference = None
        if cfg.irl.loss == "gail" and cfg.gail.kl_weight > 0:
            self.reference = ReferencePolicy(cfg, cfg.model.vocab_size)
        self.sampler = PolicySampler(cfg, model, chunk, tokenizer, dataset, num_microbatches,
                                     self.reference)
        self.discriminator = None
        if cfg.irl.loss == "gail" and parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            self.discriminator = DiscriminatorTrainer(cfg, cfg.model.vocab_size)
        self._scalars: dict[str, float] = {}
        self._update_start = 0.0

    def prepare_step(self, iteration: int, expert_batches: list[dict], lam: float):
        """(objective, micro-batches ``[b_E + b_P, s]``) for step ``iteration``.

        Collective: sampling (model replica, when due) and one all-reduce over data parallelism.
        """
        policy_batches, sample_seconds = self.sampler.policy_rows_for(iteration, expert_batches)
        micro_batches = [mix_in(e, p) for e, p in zip(expert_batches, policy_batches)]
        expert_tokens, policy_tokens = all_reduce_dp([
            sum(float((b["loss_mask"] > 0).sum()) for b in micro_batches),
            sum(float((b["policy_mask"] > 0).sum()) for b in micro_batches)])
        expert_tokens, policy_tokens = max(expert_tokens, 1.0), max(policy_tokens, 1.0)
        if self.cfg.irl.loss == "gail":
            objective = GailObjective(self.cfg, self.discriminator, expert_tokens, policy_tokens)
        else:
            objective = OnlineObjective(self.cfg, lam, expert_tokens / policy_tokens)
        self._scalars = {"sample_seconds": sample_seconds,
                         "sample_step": float(self.sampler.samples.iteration),
                         **self.sampler.stats}
        self._update_start = time.monotonic()
        return objective, micro_batches

    def finish_step(self) -> dict[str, float]:
        """Step the discriminator (GAIL, last stage); the step's sampling and update seconds
        and sample statistics (response length, EOS fraction)."""
        if self.discriminator is not None:
            self.discriminator.step()
        return {**self._scalars, "update_seconds": time.monotonic() - self._update_start}

    def metric_means(self, metric_sums: torch.Tensor) -> dict[str, float]:
        if self.cfg.irl.loss == "gail":
            return gail_metric_means(metric_sums, self.cfg.gail.entropy_weight > 0,
                                     self.reference is not None)
        return online_metric_means(metric_sums, self.cfg.online.td_over)

    def save(self, directory: str) -> None:
        """Write the samples and the discriminator into checkpoint ``directory``, and GAIL's
        KL reference next to it (once per save directory). Collective over the world group;
        every rank calls it."""
        self.sampler.save(directory)
        if self.discriminator is not None:
            self.discriminator.save(directory)
        if self.reference is not None:
            self.reference.save(os.path.dirname(os.path.normpath(directory)))

    def start_reference(self, load_dir: str | None) -> list[str]:
        """Set GAIL's KL reference to the run's starting weights: the model's weights now
        (a new run, after ``--load ... --finetune``), or those a resumed run (``load_dir``)
        started from (``training/reference.py``). Messages for the log."""
        if self.reference is None:
            return []
        if load_dir is None:
            self.reference.copy_from(self.chunk)
            return ["the KL reference is the model's starting weights"]
        return [self.reference.restore(load_dir, self.chunk)]

    def load(self, directory: str) -> list[str]:
        """Restore what ``save`` wrote; returns messages for the log."""
        messages = [self.sampler.load(directory)]
        if self.discriminator is not None:
            messages.append(self.discriminator.load(directory))
        return messages
