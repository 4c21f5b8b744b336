"""enable_cpu_support runs real Megatron-Core code on this CPU machine; run_distributed's harness.

Megatron code runs in the gloo worker processes of ``run_distributed`` (one pool of two
ranks, shared by all tests). Models are tiny GPTs (local layer spec, hidden 64,
vocab 128, dropout off) built with ``use_cpu_initialization``, which draws every full
weight on the CPU and then splits it, so different layouts compute the same function.
Megatron is imported inside the worker-side helpers only: the pytest process never
needs it.
"""

import os
import sys

import pytest
import torch

from megatron_irl import cpu_support
from megatron_irl.cpu_support import enable_cpu_support
from megatron_irl.testing import RankTraceback, run_distributed

WORLD_SIZE = 2
VOCAB = 128
SEQ = 16
MICRO_BATCH = 2
NUM_MICROBATCHES = 4  # the interleaved schedule needs a multiple of pp
PIPELINE_LAYERS = 4  # pp=2 x vpp=2 chunks of one layer each


# ---------------------------------------------------------------- run on the workers


def _gpt_config(num_layers=2, **overrides):
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=(
            parallel_state.get_virtual_pipeline_model_parallel_world_size()
        ),
        pipeline_dtype=torch.float32,
        **overrides,
    )


def _build_gpt(config, vp_stage=None, share_embeddings=False):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=share_embeddings,
        vp_stage=vp_stage,
    )


def _microbatches(count, seed):
    """``count`` dicts of tokens, labels and position_ids, each int64 [b, s]."""
    generator = torch.Generator().manual_seed(seed)
    sequences = torch.randint(0, VOCAB, (count, MICRO_BATCH, SEQ + 1), generator=generator)
    position_ids = torch.arange(SEQ).expand(MICRO_BATCH, SEQ).contiguous()
    return [
        {
            "tokens": s[:, :-1].contiguous(),
            "labels": s[:, 1:].contiguous(),
            "position_ids": position_ids,
        }
        for s in sequences
    ]


def _gpt_forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, _mean_loss  # output: per-token loss [b, s] on the last stage


def _mean_loss(per_token_loss):
    loss = per_token_loss.float().mean()
    return loss, {"lm loss": loss.detach()}


def _run_schedule(chunks, batches):
    """Forward+backward over ``batches`` with the schedule for the current layout;
    returns the per-microbatch losses (an empty list off the last pipeline stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=_gpt_forward_step,
        data_iterator=[iter(batches) for _ in chunks],
        model=chunks,
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
    )
    return [entry["lm loss"].item() for entry in losses]


def _full_tensor(tensor, param):
    """``tensor`` (a param or its grad) gathered over TP along ``param.partition_dim``."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(tensor) for _ in range(group.size())]
    torch.distributed.all_gather(shards, tensor.detach().contiguous(), group=group)
    return torch.cat(shards, dim=param.partition_dim)


def _full_params(model):
    return {name: _full_tensor(param, param) for name, param in model.named_parameters()}


def _copy_reference_weights(chunk, reference_state):
    """Load an unpipelined model's state dict into one pipeline chunk: local layer i is
    global layer ``layer_number - 1``; a tied output layer takes the word embeddings."""
    renames = {
        f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
        for i, layer in enumerate(chunk.decoder.layers)
    }
    with torch.no_grad():
        for name, tensor in chunk.state_dict().items():
            if not isinstance(tensor, torch.Tensor):  # `_extra_state` placeholders
                continue
            prefix = next((p for p in renames if name.startswith(p)), None)
            global_name = renames[prefix] + name[len(prefix):] if prefix else name
            if global_name == "output_layer.weight" and global_name not in reference_state:
                global_name = "embedding.word_embeddings.weight"
            tensor.copy_(reference_state[global_name])


def _redirect_state():
    from megatron.core.pipeline_parallel import schedules

    with schedules.torch.autocast("cuda", dtype=torch.bfloat16):
        autocast_matmul_dtype = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    return {
        "enabled_again": enable_cpu_support(),
        "current_device": torch.cuda.current_device(),
        "megatron_cuda_zeros_device": schedules.torch.zeros((), device="cuda").device,
        "megatron_cuda_autocast_matmul_dtype": autocast_matmul_dtype,
    }


def _forked_and_default_draws():
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    return {"forked": forked, "default": torch.rand(4)}


def _torch_outside_megatron_still_rejects_cuda():
    rejected = []
    for attempt in (lambda: torch.zeros((), device="cuda"), lambda: torch.zeros(()).cuda()):
        try:
            attempt()
            rejected.append(False)
        except (RuntimeError, AssertionError):  # "Torch not compiled with CUDA enabled"
            rejected.append(True)
    return rejected


def _loss_and_grads_of_tiny_gpt():
    from megatron.core import parallel_state, tensor_parallel

    model = _build_gpt(_gpt_config())
    keys = ["tokens", "labels", "position_ids"]
    # Like Megatron's training loop: the batch exists on TP rank 0 and is broadcast.
    on_source_rank = parallel_state.get_tensor_model_parallel_rank() == 0
    batch = _microbatches(1, seed=7)[0] if on_source_rank else None
    batch = tensor_parallel.broadcast_data(keys, batch, torch.int64)
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
    loss.backward()
    params = dict(model.named_parameters())
    embeddings = params["embedding.word_embeddings.weight"]  # vocab-sharded [v/tp, h]
    final_norm = params["decoder.final_layernorm.weight"]  # replicated [h]
    return {
        "loss": loss.item(),
        "word_embeddings_grad": _full_tensor(embeddings.grad, embeddings),
        "final_layernorm_grad": final_norm.grad.clone(),
    }


def _unpipelined_weights_and_losses():
    model = _build_gpt(_gpt_config(PIPELINE_LAYERS), share_embeddings=True)
    losses = _run_schedule([model], _microbatches(NUM_MICROBATCHES, seed=11))
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return {"state": state, "losses": losses}


def _pipelined_losses(reference_state):
    from megatron.core import parallel_state

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    # Interleaving at pp=2 with batched p2p (the default) crosses the two tensors that
    # the stages exchange in one step: an upstream bug on GPUs as well
    # (NVIDIA/Megatron-LM#1450, #5271), not a CPU one.
    config = _gpt_config(PIPELINE_LAYERS, batch_p2p_comm=vpp is None)
    stages = [None] if vpp is None else list(range(vpp))
    chunks = [_build_gpt(config, vp_stage=stage, share_embeddings=True) for stage in stages]
    for chunk in chunks:
        _copy_reference_weights(chunk, reference_state)
    return _run_schedule(chunks, _microbatches(NUM_MICROBATCHES, seed=11))


def _ddp_adam_step(bf16, distributed_optimizer):
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    params_dtype = torch.bfloat16 if bf16 else torch.float32
    config = _gpt_config(bf16=bf16, params_dtype=params_dtype)
    module = Float16Module(config, _build_gpt(config)) if bf16 else _build_gpt(config)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=bf16
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=1e-2,
        clip_grad=1.0,
        bf16=bf16,
        params_dtype=params_dtype,
        use_distributed_optimizer=distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(optimizer_config, [model])
    before = _full_params(model.module)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    # Each data-parallel rank sees different tokens.
    _run_schedule([model], _microbatches(1, seed=100 + parallel_state.get_data_parallel_rank()))
    stepped, grad_norm, _ = optimizer.step()
    after = _full_params(model.module)
    return {"stepped": stepped, "grad_norm": grad_norm, "before": before, "after": after}


def _save_checkpoint(directory):
    from megatron.core import dist_checkpointing

    model = _build_gpt(_gpt_config())
    dist_checkpointing.save(model.sharded_state_dict(), directory)
    return _full_params(model)


def _load_checkpoint(directory):
    from megatron.core import dist_checkpointing

    model = _build_gpt(_gpt_config())
    fresh = _full_params(model)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))
    return {"fresh": fresh, "loaded": _full_params(model)}


def _raise_on_rank_1():
    if torch.distributed.get_rank() == 1:
        raise ValueError("rank 1 fails on purpose")
    return "rank 0 finished"


def _process_id():
    return os.getpid()


# ---------------------------------------------------------------------------- tests


def test_enable_cpu_support_is_a_no_op_when_cuda_is_available(monkeypatch):
    # As in a fresh process, even if a test before this one enabled it in pytest's.
    monkeypatch.setattr(cpu_support, "_active", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current_device = torch.cuda.current_device
    modules_before = set(sys.modules)

    assert enable_cpu_support() is False
    assert torch.cuda.current_device is current_device
    assert not [m for m in set(sys.modules) - modules_before if m.startswith("megatron")]


def test_enable_cpu_support_is_active_on_this_cpu_machine():
    for state in run_distributed(_redirect_state, WORLD_SIZE):
        assert state == {
            "enabled_again": True,
            "current_device": torch.device("cpu"),
            "megatron_cuda_zeros_device": torch.device("cpu"),
            "megatron_cuda_autocast_matmul_dtype": torch.bfloat16,
        }


def test_cpu_redirects_do_not_reach_torch_outside_megatron():
    assert run_distributed(_torch_outside_megatron_still_rejects_cuda, WORLD_SIZE) == [
        [True, True],
        [True, True],
    ]


def test_model_parallel_rng_fork_draws_per_tp_rank_and_keeps_the_default_stream():
    seed = 5
    draws = run_distributed(_forked_and_default_draws, WORLD_SIZE, tp=2, seed=seed)

    default_stream = torch.rand(4, generator=torch.Generator().manual_seed(seed))
    for tp_rank, rank_draws in enumerate(draws):
        # model_parallel_cuda_manual_seed: TP stream seed = seed + 2718 + tp_rank.
        tp_stream = torch.Generator().manual_seed(seed + 2718 + tp_rank)
        torch.testing.assert_close(rank_draws["forked"], torch.rand(4, generator=tp_stream))
        torch.testing.assert_close(rank_draws["default"], default_stream)


def test_tensor_parallel_gpt_matches_single_partition_loss_and_grads():
    reference = run_distributed(_loss_and_grads_of_tiny_gpt, WORLD_SIZE, tp=1)[0]
    assert reference["word_embeddings_grad"].abs().sum() > 0

    for rank_result in run_distributed(_loss_and_grads_of_tiny_gpt, WORLD_SIZE, tp=2):
        assert rank_result["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        for grad in ("word_embeddings_grad", "final_layernorm_grad"):
            torch.testing.assert_close(rank_result[grad], reference[grad], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def unpipelined_reference():
    return run_distributed(_unpipelined_weights_and_losses, WORLD_SIZE)[0]


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_pipeline_schedule_matches_unpipelined_losses(unpipelined_reference, vpp):
    first_stage, last_stage = run_distributed(
        _pipelined_losses, WORLD_SIZE, pp=2, vpp=vpp, args=(unpipelined_reference["state"],)
    )
    assert first_stage == []
    assert last_stage == pytest.approx(unpipelined_reference["losses"], rel=1e-6)


@pytest.mark.parametrize(
    "bf16, distributed_optimizer",
    [(False, False), (True, True)],
    ids=["fp32-adam", "bf16-distributed-adam"],
)
def test_data_parallel_adam_step_updates_replicas_identically(bf16, distributed_optimizer):
    rank0, rank1 = run_distributed(
        _ddp_adam_step, WORLD_SIZE, args=(bf16, distributed_optimizer)
    )

    assert rank0["stepped"] and rank1["stepped"]
    assert 0 < rank0["grad_norm"] < float("inf")
    assert rank0["grad_norm"] == pytest.approx(rank1["grad_norm"], rel=1e-6)
    for name, after in rank0["after"].items():
        torch.testing.assert_close(rank1["after"][name], after, rtol=0, atol=0)
    assert any(not torch.equal(rank0["before"][n], rank0["after"][n]) for n in rank0["after"])


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_identical_weights(tmp_path):
    saved = run_distributed(_save_checkpoint, WORLD_SIZE, tp=2, seed=1, args=(str(tmp_path),))[0]
    loaded = run_distributed(_load_checkpoint, WORLD_SIZE, tp=1, seed=2, args=(str(tmp_path),))

    for rank_result in loaded:
        assert rank_result["loaded"].keys() == saved.keys()
        assert any(not torch.equal(rank_result["fresh"][n], saved[n]) for n in saved)
        for name, weight in saved.items():
            torch.testing.assert_close(rank_result["loaded"][name], weight, rtol=0, atol=0)


def test_exception_on_rank_1_is_raised_with_its_traceback():
    with pytest.raises(ValueError, match="rank 1 fails on purpose") as raised:
        run_distributed(_raise_on_rank_1, WORLD_SIZE)

    cause = raised.value.__cause__
    assert isinstance(cause, RankTraceback)
    assert cause.rank == 1
    assert "in _raise_on_rank_1" in cause.formatted
    assert "ValueError: rank 1 fails on purpose" in cause.formatted


def test_worker_pool_is_reused_after_a_rank_raised():
    process_ids = run_distributed(_process_id, WORLD_SIZE)
    with pytest.raises(ValueError):
        run_distributed(_raise_on_rank_1, WORLD_SIZE)

    assert run_distributed(_process_id, WORLD_SIZE) == process_ids
