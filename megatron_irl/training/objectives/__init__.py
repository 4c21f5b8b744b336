"""The training objectives, one module each, and their registry.

``OBJECTIVES`` maps each ``--irl-loss`` name to its ``Objective`` class (``base.py``: what it
needs from the batch, whether it samples the policy or needs a reference model, and
``(output, batch) -> (loss sum, token count, named metric sums)``). The configuration layer
validates ``--irl-loss`` against ``config.OBJECTIVE_NAMES`` and ``config_online.SAMPLING_LOSSES``,
plain names because configuration does not import training; tests/test_objective.py checks that
they agree with this registry. Adding an objective: docs/training.md.
"""

from __future__ import annotations

from megatron_irl.config import IRLConfig
from megatron_irl.training.objectives.base import Objective, SampledStep
from megatron_irl.training.objectives.gail import GailObjective
from megatron_irl.training.objectives.mle_entropy import MleEntropyObjective
from megatron_irl.training.objectives.online import OnlineObjective
from megatron_irl.training.objectives.soft_q import SoftQObjective

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (SoftQObjective, MleEntropyObjective, OnlineObjective, GailObjective)
}


def lambda_at(irl: IRLConfig, iteration: int) -> float:
    """The TD weight of ``irl.loss`` at step ``iteration`` (``Objective.lambda_at``)."""
    return OBJECTIVES[irl.loss].lambda_at(irl, iteration)


__all__ = ["OBJECTIVES", "GailObjective", "MleEntropyObjective", "Objective", "OnlineObjective",
           "SampledStep", "SoftQObjective", "lambda_at"]
