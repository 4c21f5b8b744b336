"""``--irl-loss mle_entropy``: nll - ``--irl-entropy-coef`` * entropy (the baseline)."""

from __future__ import annotations

from megatron_irl.training.objectives.soft_q import SoftQObjective


class MleEntropyObjective(SoftQObjective):
    """The soft-Q objective's code with no TD term (lambda 0) and the entropy bonus."""

    name = "mle_entropy"
    has_td_term = False
    with_entropy = True
