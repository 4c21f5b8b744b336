"""The ``gpu-path`` part of bench/gpu_check.py: the GPU path's correctness on one GPU.

Each check runs on its own (an error is recorded and the next one runs) on a small Llama-style
model (RoPE, RMSNorm, SwiGLU, grouped-query attention, bf16):

- ``placement``: the local spec without TE, trained and evaluated: every parameter and buffer
  on the GPU in bf16, and a forward pass runs (no device mismatch);
- ``fusions``: the fusion flags the trainer sets for the local and the TE spec;
- ``checkpoints``: a local-spec checkpoint loaded into the TE model and a TE checkpoint into
  the local model, with the logits of both models on the same input compared;
- ``thd``: the TE model fed packed rows as THD sequences against the same weights fed the
  block-causal mask: logits on real tokens compared;
- ``fp8_recipes``: each ``--fp8-recipe`` refused with the reason, or a forward pass run.

Without CUDA or Transformer Engine (the CPU smoke run) the TE checks report why they were
skipped; the others run on the CPU.
"""

from __future__ import annotations

import tempfile
import traceback

import torch

VOCAB = 1000
SIZES = {False: {"hidden_size": 512, "num_layers": 2, "seq_length": 512},
         True: {"hidden_size": 64, "num_layers": 2, "seq_length": 32}}
DOCUMENT_LENGTHS = (5, 9, 3)  # per row, then padding: the THD check's packed rows


def _config(smoke: bool, **model):
    from megatron_irl.config import TrainConfig

    sizes = SIZES[smoke]
    return TrainConfig.from_dict({
        "model": {**sizes, "num_attention_heads": 8, "num_query_groups": 2, "swiglu": True,
                  "normalization": "RMSNorm", "position_embedding_type": "rope",
                  "add_bias_linear": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "untie_embeddings_and_output_weights": True, **model},
        "training": {"bf16": True, "micro_batch_size": 2, "global_batch_size": 2}})


def _packed_batch(seq_length: int, rows: int = 2):
    """tokens, position_ids, document_ids [rows, s] on the target device."""
    from megatron_irl.cpu_support import current_device

    document_ids = torch.full((rows, seq_length), -1, dtype=torch.long)
    position_ids = torch.zeros_like(document_ids)
    offset = 0
    for length in DOCUMENT_LENGTHS:
        length = min(length * seq_length // 32, seq_length - offset)
        document_ids[:, offset:offset + length] = offset
        position_ids[:, offset:offset + length] = torch.arange(length)
        offset += length
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (rows, seq_length), generator=generator)
    device = current_device()
    return tokens.to(device), position_ids.to(device), document_ids.to(device)


@torch.no_grad()
def _logits(chunk, batch, thd: bool = False):
    from megatron_irl.data import block_causal_attention_mask
    from megatron_irl.data.packed_attention import thd_packed_seq_params

    tokens, position_ids, document_ids = batch
    if thd:
        b, s = tokens.shape
        out = chunk(tokens.reshape(1, b * s), position_ids.reshape(1, b * s), None,
                    packed_seq_params=thd_packed_seq_params(document_ids))
        return out.reshape(b, s, -1).float()
    return chunk(tokens, position_ids, block_causal_attention_mask(document_ids)).float()


def _relative_difference(a, b, where) -> float:
    return float((a[where] - b[where]).abs().max() / b[where].abs().max())


def _misplaced(chunks) -> list[str]:
    from megatron_irl.cpu_support import current_device

    device = current_device()
    return [f"{name}: {tensor.device} {tensor.dtype}" for chunk in chunks
            for name, tensor in [*chunk.named_parameters(), *chunk.named_buffers()]
            if tensor.device != device
            or (tensor.is_floating_point() and tensor.dtype != torch.bfloat16)]


def check_placement(smoke: bool, directory: str) -> dict:
    from megatron_irl.core.checkpoint import TrainingState, save_checkpoint
    from megatron_irl.evaluation.loading import load_inference_model
    from megatron_irl.training.loop import build_trainable

    cfg = _config(smoke, transformer_impl="local")
    trainable = build_trainable(cfg, VOCAB)
    batch = _packed_batch(cfg.model.seq_length)
    train_logits = _logits(trainable.chunks[0], batch)
    save_checkpoint(directory, TrainingState(0, 0, cfg.to_dict()), trainable.chunks, None, None)
    evaluated = load_inference_model(cfg, directory, VOCAB)
    eval_logits = _logits(evaluated, batch)
    return {"misplaced_training": _misplaced(trainable.chunks),
            "misplaced_evaluation": _misplaced([evaluated]),
            "forward_finite": bool(train_logits.isfinite().all() and eval_logits.isfinite().all()),
            "passed": not _misplaced(trainable.chunks) and not _misplaced([evaluated])}


def check_fusions(smoke: bool) -> dict:
    from megatron_irl.core.model import transformer_config

    names = ("masked_softmax_fusion", "bias_activation_fusion", "gradient_accumulation_fusion")
    return {impl: {name: getattr(transformer_config(_config(smoke, transformer_impl=impl)), name)
                   for name in names}
            for impl in ("local", "transformer_engine")}


def check_checkpoints(smoke: bool, directory: str) -> dict:
    from megatron_irl.core.checkpoint import TrainingState, load_checkpoint, save_checkpoint
    from megatron_irl.core.model import build_model_chunks

    results = {}
    for source, target in (("local", "transformer_engine"), ("transformer_engine", "local")):
        saved_cfg, loaded_cfg = (_config(smoke, transformer_impl=impl) for impl in (source, target))
        torch.manual_seed(1)
        (saved,) = build_model_chunks(saved_cfg, VOCAB)
        path = f"{directory}/{source}"
        save_checkpoint(path, TrainingState(0, 0, saved_cfg.to_dict()), [saved], None, None)
        torch.manual_seed(2)
        (loaded,) = build_model_chunks(loaded_cfg, VOCAB)
        load_checkpoint(path, [loaded], load_optimizer=False, load_rng=False)
        batch = _packed_batch(saved_cfg.model.seq_length)
        real = batch[2] >= 0
        difference = _relative_difference(_logits(loaded.eval(), batch),
                                          _logits(saved.eval(), batch), real)
        results[f"{source}_to_{target}"] = {"logits_max_relative_difference": difference,
                                            "passed": difference < 2e-2}  # bf16 kernels differ
    return results


def check_thd(smoke: bool) -> dict:
    from megatron_irl.core.model import build_model_chunks, uses_thd

    cfg = _config(smoke, transformer_impl="transformer_engine")
    torch.manual_seed(3)
    (masked,) = build_model_chunks(cfg, VOCAB, thd=False)
    (packed,) = build_model_chunks(cfg, VOCAB, thd=True)
    packed.load_state_dict(masked.state_dict())
    batch = _packed_batch(cfg.model.seq_length)
    real = batch[2] >= 0
    difference = _relative_difference(_logits(packed.eval(), batch, thd=True),
                                      _logits(masked.eval(), batch), real)
    return {"training_uses_thd": uses_thd(cfg), "logits_max_relative_difference": difference,
            "passed": uses_thd(cfg) and difference < 2e-2}


def check_fp8_recipes(smoke: bool) -> dict:
    from megatron_irl.core.model import build_model_chunks
    from megatron_irl.cpu_support import transformer_engine_problem

    results = {}
    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        problem = transformer_engine_problem(fp8_recipe=recipe)
        if problem:
            results[recipe] = {"refused": problem}
            continue
        cfg = _config(smoke, transformer_impl="transformer_engine")
        cfg.training.fp8_format, cfg.training.fp8_recipe = "hybrid", recipe
        (chunk,) = build_model_chunks(cfg, VOCAB)
        logits = _logits(chunk.eval(), _packed_batch(cfg.model.seq_length))
        results[recipe] = {"forward_finite": bool(logits.isfinite().all())}
    return results


def part_gpu_path(args) -> dict:
    from megatron_irl.config import ParallelConfig
    from megatron_irl.core.distributed import init_distributed, shutdown_distributed
    from megatron_irl.cpu_support import transformer_engine_problem

    te_problem = transformer_engine_problem()
    init_distributed(ParallelConfig(), seed=1234)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as directory:
            checks = {
                "placement": lambda: check_placement(args.smoke, f"{directory}/placement"),
                "fusions": lambda: check_fusions(args.smoke),
                "checkpoints": lambda: check_checkpoints(args.smoke, f"{directory}/specs"),
                "thd": lambda: check_thd(args.smoke),
                "fp8_recipes": lambda: check_fp8_recipes(args.smoke),
            }
            for name, check in checks.items():
                if te_problem and name in ("checkpoints", "thd"):
                    results[name] = {"skipped": te_problem}
                    continue
                try:
                    results[name] = check()
                except Exception:  # noqa: BLE001 - recorded; the next check still runs
                    results[name] = {"error": traceback.format_exc()}
    finally:
        shutdown_distributed()
    return results


def table_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """Rows of the GPU check's table: (measurement, value, target, status)."""
    rows = []
    for name, value in result.items():
        if "skipped" in value or "error" in value:
            status = "skipped" if "skipped" in value else "error"
            rows.append((f"gpu path: {name}", _short(value.get("skipped") or value["error"]),
                         "-", status))
        elif name == "fp8_recipes":
            for recipe, outcome in value.items():
                rows.append((f"gpu path: FP8 {recipe}", _short(str(outcome)), "runs or refused "
                             "with the reason", "ok" if outcome.get("forward_finite", True)
                             else "FAIL"))
        elif name == "fusions":
            rows.append(("gpu path: fusions", _short(str(value)), "on where kernels exist", "-"))
        elif name == "checkpoints":
            for direction, outcome in value.items():
                rows.append((f"gpu path: checkpoint {direction}",
                             f"{outcome['logits_max_relative_difference']:.2e}", "< 2e-2",
                             "ok" if outcome["passed"] else "FAIL"))
        else:
            rows.append((f"gpu path: {name}", _short(str({k: v for k, v in value.items()
                                                        if k != "passed"})),
                         "-", "ok" if value.get("passed") else "FAIL"))
    return rows


def _short(text: str) -> str:
    return text.strip().splitlines()[-1][:160].replace("|", "/")
