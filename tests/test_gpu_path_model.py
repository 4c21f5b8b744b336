"""The model on the GPU path, emulated on this CPU: checkpoints across layer specs, placement.

Transformer Engine cannot be installed here, so its modules are stood in for. For checkpoints
a TE layer spec differs from the local one only in modules that save ``_extra_state`` where the
local ones save none, such as TE's final norm (``TENorm``): the linear layers save it in both
specs, and the layers' norms are fused into TE's linear layers under the same keys.
``_as_te_module`` gives the local model's final norm
TE's behaviour (a tensor of FP8 metadata from ``get_extra_state``, taken back by
``set_extra_state``). A GPU is stood in for by the meta device: building onto it shows where
every parameter and buffer ends up.

All scenarios run in one spawned single-rank worker (real Megatron-Core, gloo).
"""

from __future__ import annotations

import pytest
import torch

from megatron_irl.testing import run_distributed

TE_MODULES = ("decoder.final_layernorm",)


# ---------------------------------------------------------------- run on the worker


def _as_te_module(module, tag: int) -> None:
    """Make ``module`` save and load extra state as a TE module does (a uint8 tensor)."""
    cls = type(module)
    module.__class__ = type(f"TEStandIn{cls.__name__}", (cls,), {
        "get_extra_state": lambda self: self.fp8_metadata,
        "set_extra_state": lambda self, state: setattr(self, "fp8_metadata", state),
    })
    module.fp8_metadata = torch.full((4,), tag, dtype=torch.uint8)


def _te_stand_in(chunk, tag: int):
    for name, module in chunk.named_modules():
        if name.endswith(TE_MODULES):
            _as_te_module(module, tag)
    return chunk


def _weights(chunk) -> dict:
    return {name: param.detach().clone() for name, param in chunk.named_parameters()}


def _same_weights(chunk, weights) -> bool:
    return all(torch.equal(param, weights[name]) for name, param in chunk.named_parameters())


def _extra_state_tags(chunk) -> set:
    return {int(module.fp8_metadata[0]) for name, module in chunk.named_modules()
            if name.endswith(TE_MODULES)}


def _misplaced(chunks, device: str, dtype: torch.dtype) -> list:
    """Parameters and buffers of ``chunks`` not on ``device`` or (floating) not in ``dtype``."""
    return [f"{name}: {tensor.device} {tensor.dtype}"
            for chunk in chunks
            for name, tensor in [*chunk.named_parameters(), *chunk.named_buffers()]
            if tensor.device.type != device
            or (tensor.is_floating_point() and tensor.dtype != dtype)]


def _scenarios(root: str) -> dict:
    from helpers import tiny_config, tiny_tokenizer

    from megatron_irl.core.checkpoint import (
        CheckpointError,
        TrainingState,
        load_checkpoint,
        save_checkpoint,
    )
    from megatron_irl.core.model import build_model_chunks
    from megatron_irl.evaluation.loading import load_inference_model
    from megatron_irl.training.loop import build_trainable

    cfg, vocab = tiny_config(), tiny_tokenizer().vocab_size
    state = TrainingState(0, 0, cfg.to_dict())
    results = {}

    def build(seed):
        torch.manual_seed(seed)
        (chunk,) = build_model_chunks(cfg, vocab)
        return chunk

    def load(chunk, directory):
        load_checkpoint(directory, [chunk], load_optimizer=False, load_rng=False)
        return chunk

    # Local spec (converter, CPU training) -> TE spec.
    local = build(1)
    save_checkpoint(f"{root}/local", state, [local], None, None)
    te_model = load(_te_stand_in(build(2), tag=7), f"{root}/local")
    results["local_to_te_weights"] = _same_weights(te_model, _weights(local))
    results["local_to_te_extra_state"] = _extra_state_tags(te_model)

    # TE spec (GPU training) -> local spec, and -> TE spec again.
    te_saved = _te_stand_in(build(3), tag=9)
    save_checkpoint(f"{root}/te", state, [te_saved], None, None)
    results["te_to_local_weights"] = _same_weights(load(build(4), f"{root}/te"), _weights(te_saved))
    results["te_to_te_extra_state"] = _extra_state_tags(
        load(_te_stand_in(build(5), tag=1), f"{root}/te"))

    # A weight the checkpoint lacks is still an error.
    extra_weight = build(6)
    extra_weight.decoder.final_layernorm.register_parameter(
        "bias_stand_in", torch.nn.Parameter(torch.zeros(cfg.model.hidden_size)))
    try:
        load(extra_weight, f"{root}/local")
        results["missing_weight_error"] = None
    except CheckpointError as error:
        results["missing_weight_error"] = str(error)

    # Placement: a device stand-in (meta), and bf16 for training and evaluation.
    cfg.training.bf16 = True
    results["misplaced_on_meta"] = _misplaced(
        build_model_chunks(cfg, vocab, device=torch.device("meta")), "meta", torch.bfloat16)
    results["misplaced_training"] = _misplaced(build_trainable(cfg, vocab).chunks, "cpu",
                                               torch.bfloat16)
    results["misplaced_evaluation"] = _misplaced(
        [load_inference_model(cfg, f"{root}/local", vocab)], "cpu", torch.bfloat16)
    return results


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("specs"))
    (result,) = run_distributed(_scenarios, 1, args=(root,), timeout=240)
    return result


def test_local_spec_checkpoint_loads_into_te_model_with_its_extra_state_initialised(results):
    assert results["local_to_te_weights"]
    assert results["local_to_te_extra_state"] == {7}  # the TE model's own initial metadata


def test_te_spec_checkpoint_loads_into_local_model(results):
    assert results["te_to_local_weights"]


def test_te_extra_state_is_restored_between_te_models(results):
    assert results["te_to_te_extra_state"] == {9}


def test_checkpoint_lacking_a_weight_still_fails_naming_it(results):
    assert results["missing_weight_error"] is not None
    assert "decoder.final_layernorm.bias_stand_in" in results["missing_weight_error"]


def test_every_parameter_and_buffer_is_on_the_target_device_in_the_precision_dtype(results):
    assert results["misplaced_on_meta"] == []


def test_training_and_evaluation_models_are_in_the_precision_dtype(results):
    assert results["misplaced_training"] == []
    assert results["misplaced_evaluation"] == []
