"""Checkpoints move between the local and the Transformer Engine layer specs.

Both specs store their weights under the same sharded keys (the local spec maps its norms to
TE's fused names), but they differ in the modules that keep *extra state*: TE's modules
(linear layers, norms) save FP8 scaling metadata as ``<module>._extra_state`` objects,
whereas the local spec's norms save none (the linear layers save it in both specs). So a
checkpoint written by the converter or a CPU run (local spec) lacks ``_extra_state`` entries
that a TE model asks for, and one written by a TE run holds entries that a local model does
not ask for.

:func:`load_across_specs` loads such checkpoints:

* an ``_extra_state`` the model asks for and the checkpoint lacks keeps the module's own,
  freshly initialised value (TE re-derives FP8 scales within its amax history), also where a
  module's ``load_state_dict`` expects one that its ``sharded_state_dict`` does not save;
* entries the checkpoint holds and the model does not ask for are not read (dist_checkpointing's
  default);
* anything else the model asks for and the checkpoint lacks (a weight, optimizer state) is
  returned as missing, for the caller to report: nothing but extra state is relaxed.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

EXTRA_STATE_SUFFIX = "_extra_state"


@dataclass
class LoadedState:
    """What :func:`load_across_specs` read.

    Attributes:
        state: the loaded state dict, shaped like the requested sharded state dict; each
            model entry is complete for ``module.load_state_dict`` (strict).
        initialised_extra_state: sharded keys of extra state the checkpoint lacked, which
            keep the model's initial values.
        missing: other sharded keys the checkpoint lacks (the caller raises).
    """

    state: dict
    initialised_extra_state: list[str]
    missing: list[str]


def load_across_specs(sharded_state: dict, directory: str, models: dict) -> LoadedState:
    """``dist_checkpointing.load`` that fills extra state a checkpoint lacks from the model.

    Args:
        sharded_state: the sharded state dict to load (model entries, optimizer, RNG, ...).
        directory: the checkpoint's iteration directory.
        models: {key in ``sharded_state``: the unwrapped module whose
            ``sharded_state_dict()`` that entry is}; their current ``state_dict()`` supplies
            the extra state the checkpoint lacks (and any a module's ``sharded_state_dict``
            leaves out but its ``load_state_dict`` expects).

    Collective over the world group (dist_checkpointing's load). Reads the checkpoint's
    metadata once more than a plain load (to find the keys it lacks). Mutates nothing but
    the returned state.
    """
    # RETURN_UNEXPECTED: keys asked for but absent from the checkpoint are dropped from the
    # load and returned (dist_checkpointing calls them "unexpected").
    loaded, _, absent = dist_checkpointing.load(
        sharded_state, directory, strict=StrictHandling.RETURN_UNEXPECTED)
    absent_extra = {key for key in absent if key.endswith(EXTRA_STATE_SUFFIX)}
    for entry, module in models.items():
        for local_key, value in module.state_dict().items():
            if local_key.endswith(EXTRA_STATE_SUFFIX) and local_key not in loaded[entry]:
                loaded[entry][local_key] = value
    return LoadedState(loaded, sorted(absent_extra), sorted(set(absent) - absent_extra))
