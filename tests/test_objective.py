"""The objective registry, the lambda schedule and the Megatron loss-function contract."""

import pytest
import torch

from megatron_irl.config import OBJECTIVE_NAMES, IRLConfig
from megatron_irl.config_online import SAMPLING_LOSSES
from megatron_irl.training.objectives import OBJECTIVES, SoftQObjective, lambda_at


def test_the_registry_has_one_objective_per_irl_loss_choice():
    assert tuple(OBJECTIVES) == OBJECTIVE_NAMES
    assert all(cls.name == name for name, cls in OBJECTIVES.items())


def test_the_sampling_objectives_are_the_configuration_s_sampling_losses():
    sampling = tuple(name for name, cls in OBJECTIVES.items() if cls.samples_policy)
    assert sampling == SAMPLING_LOSSES
    assert all(("policy_mask" in cls.batch_fields) == cls.samples_policy
               for cls in OBJECTIVES.values())


def test_lambda_ramps_linearly_over_the_warmup_then_stays():
    irl = IRLConfig(irl_lambda=0.2, irl_lambda_warmup_iters=4)
    assert [lambda_at(irl, i) for i in range(6)] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2, 0.2])


def test_lambda_is_full_from_the_start_without_warmup():
    assert lambda_at(IRLConfig(irl_lambda=0.3), 0) == 0.3


def test_mle_entropy_baseline_has_no_td_weight():
    irl = IRLConfig(loss="mle_entropy", entropy_coef=0.01)
    assert lambda_at(irl, 100) == 0.0


def _batch(b=2, s=5, v=7):
    generator = torch.Generator().manual_seed(0)
    loss_mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 1, 1]], dtype=torch.float32)
    return torch.randn(b, s, v, generator=generator), {
        "labels": torch.randint(0, v, (b, s), generator=generator),
        "loss_mask": loss_mask,
        "terminal": torch.tensor([[0, 0, 0, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool),
        "next_position": torch.arange(1, s + 1).expand(b, s),
    }


def test_objective_returns_the_loss_sum_and_the_trained_token_count():
    logits, batch = _batch()
    loss_sum, num_tokens, metric_sums = SoftQObjective(IRLConfig(irl_lambda=0.5), 0)(logits, batch)
    assert num_tokens.dtype == torch.int and int(num_tokens) == 7
    means = SoftQObjective.means({name: float(value) for name, value in metric_sums.items()})
    assert means["trained_tokens"] == 7
    assert float(loss_sum) == pytest.approx(means["loss"] * 7, rel=1e-6)
    assert means["loss"] == pytest.approx(means["nll"] + 0.5 * means["td_squared"]
                                          * metric_sums["td_tokens"].item() / 7, rel=1e-5)
