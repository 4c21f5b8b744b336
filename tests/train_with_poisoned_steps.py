"""``megatron-irl train`` with the loss of chosen steps made NaN, for the fault-injection tests.

``POISONED_STEPS=2,3`` (1-based step numbers) multiplies the last stage's logits by NaN in
those steps, as a diverging model or a bad batch would: the loss, the metrics and (through
backward, on every pipeline stage) the gradients become NaN. Everything else is the real
trainer with the ``soft_q`` objective (registered in place of the real one); the arguments are
its flags.
"""

import os
import sys

from megatron_irl.commands import train
from megatron_irl.training.objectives import OBJECTIVES, SoftQObjective


class _PoisonedObjective(SoftQObjective):
    steps = frozenset(int(step) for step in os.environ.get("POISONED_STEPS", "").split(",")
                      if step)

    def __init__(self, irl, iteration, *args):
        super().__init__(irl, iteration, *args)
        self.poisoned = iteration + 1 in self.steps

    def __call__(self, output, batch):
        return super().__call__(output * float("nan") if self.poisoned else output, batch)


if __name__ == "__main__":
    OBJECTIVES["soft_q"] = _PoisonedObjective
    sys.exit(train.main())
