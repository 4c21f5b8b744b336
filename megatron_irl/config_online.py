"""Configuration of the losses that sample the policy during training (sections ``online:``
and ``gail:``): ``--irl-loss online`` (online IQ-Learn, docs/method.md section 3) and
``--irl-loss gail`` (the GAIL baseline, section 4). Both draw responses from the model being
trained (``online`` section); the mixture weights are online IQ-Learn's, the ``gail`` section
holds the baseline's weights and its discriminator.

The checks that relate these sections to the rest of the run are in
``check_sampling_config``, which ``TrainConfig`` calls on construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from megatron_irl.config_schema import ConfigError, _opt, _Section

SAMPLING_LOSSES = ("online", "gail")


@dataclass
class OnlineConfig(_Section):
    """Policy sampling during training (--irl-loss online and gail) and the online mixture."""

    policy_rows: int = _opt(
        1, "--online-policy-rows-per-micro-batch",
        "Sampled responses per micro-batch, one a row after its --micro-batch-size dataset "
        "rows; their prompts are the micro-batch's own documents' (online, gail).")
    sample_interval: int = _opt(
        1, "--online-sample-interval",
        "Draw new responses every this many steps; the steps in between reuse them.")
    temperature: float = _opt(
        1.0, "--online-temperature", "Sampling temperature of the responses (0: greedy).")
    max_new_tokens: int = _opt(
        32, "--online-max-new-tokens",
        "Token budget of a sampled response (EOS included); every prompt plus this must fit "
        "--seq-length.")
    alpha_mix: float = _opt(
        0.1, "--online-alpha-mix",
        "Policy share of the state mixture of the value term (online); 0 gives the offline loss.")
    td_over: Literal["expert", "mixture"] = _opt(
        "mixture", "--online-td-over",
        "Transitions of the TD^2 term (online): the mixture's (IQ-Learn's online recipe), or "
        "the dataset's only (needs --irl-gamma < 1: at gamma 1 the value term over the "
        "policy's states telescopes to V(s_0) and the sampled tokens get no gradient).")

    def _validate(self) -> None:
        self._require_at_least(1, "policy_rows", "sample_interval", "max_new_tokens")
        self._require(self.temperature >= 0, "temperature", "be >= 0 (0: greedy)")
        self._require(0 <= self.alpha_mix <= 1, "alpha_mix", "be in [0, 1]")


@dataclass
class GailConfig(_Section):
    """The GAIL baseline (--irl-loss gail): loss weights and the discriminator."""

    mle_weight: float = _opt(
        1.0, "--gail-mle-weight", "Weight of the MLE term on the dataset responses.")
    entropy_weight: float = _opt(
        0.0, "--gail-entropy-weight", "Weight of the entropy bonus on the sampled responses.")
    kl_weight: float = _opt(
        0.0, "--gail-kl-weight",
        "KL penalty in the reward towards the starting model: a frozen copy of the weights the "
        "run started from scores the samples when drawn (one more copy of the weights in "
        "memory; saved once in <save>/gail_reference for resuming).")
    disc_hidden_size: int = _opt(
        128, "--gail-disc-hidden-size", "Hidden size of the discriminator transformer.")
    disc_num_layers: int = _opt(2, "--gail-disc-num-layers", "Discriminator layers.")
    disc_num_heads: int = _opt(4, "--gail-disc-num-heads", "Discriminator attention heads.")
    disc_lr: float = _opt(1e-4, "--gail-disc-lr", "Adam learning rate of the discriminator.")

    def _validate(self) -> None:
        self._require_at_least(0, "mle_weight", "entropy_weight", "kl_weight")
        self._require_at_least(1, "disc_hidden_size", "disc_num_layers", "disc_num_heads")
        self._require(self.disc_hidden_size % self.disc_num_heads == 0, "disc_hidden_size",
                      f"be a multiple of {self.flag('disc_num_heads')} {self.disc_num_heads}")
        self._require(self.disc_lr > 0, "disc_lr", "be > 0")


def _changed_fields(section: _Section, names) -> list[str]:
    defaults = {f.name: f.default for f in dataclasses.fields(section)}
    return [section.flag(name) for name in names if getattr(section, name) != defaults[name]]


def check_sampling_config(cfg: Any) -> None:
    """Checks between the ``online`` / ``gail`` sections and the rest of a ``TrainConfig``.

    With a sampling loss: generation runs the one model chunk of each rank, one token at a
    time, in rows of ``--seq-length``. Without one: no online or GAIL flag may be set (it would
    be ignored silently). Raises ConfigError naming the flags.
    """
    loss, online, gail = cfg.irl.loss, cfg.online, cfg.gail
    loss_flag = f"{cfg.irl.flag('loss')} {loss}"
    unused = []
    if loss not in SAMPLING_LOSSES:
        unused += _changed_fields(online, [f.name for f in dataclasses.fields(online)])
    elif loss != "online":
        unused += _changed_fields(online, ["alpha_mix", "td_over"])
    if loss != "gail":
        unused += _changed_fields(gail, [f.name for f in dataclasses.fields(gail)])
    if unused:
        raise ConfigError(f"{', '.join(unused)}: not used by {loss_flag}; unset them or choose "
                          "the loss they belong to (--irl-loss online or gail)")
    if loss not in SAMPLING_LOSSES:
        return
    if loss == "online" and online.td_over == "expert" and online.alpha_mix > 0 \
            and cfg.irl.irl_gamma == 1:
        raise ConfigError(
            f"{online.flag('td_over')} expert with {cfg.irl.flag('irl_gamma')} 1 trains nothing "
            "on the sampled responses: the value term over the policy's states telescopes to "
            "V(s_0), so every sampled token after the first gets zero gradient; use "
            f"{online.flag('td_over')} mixture (the default) or {cfg.irl.flag('irl_gamma')} < 1")
    parallel, seq_length = cfg.parallel, cfg.model.seq_length
    if parallel.virtual_pipeline_model_parallel_size is not None:
        raise ConfigError(
            f"{parallel.flag('virtual_pipeline_model_parallel_size')} must be unset with "
            f"{loss_flag}: sampling runs one model chunk per pipeline stage")
    if parallel.sequence_parallel:
        raise ConfigError(f"{parallel.flag('sequence_parallel')} must be off with {loss_flag}: "
                          "generation feeds one token per step, which cannot be split over TP")
    if online.max_new_tokens >= seq_length:
        raise ConfigError(
            f"{online.flag('max_new_tokens')} {online.max_new_tokens} must be < "
            f"{cfg.model.flag('seq_length')} {seq_length}: a prompt and its sampled response "
            "share one row")
