"""Helpers shared by the tests: inputs, references, tolerances and launches.

Tests import from here, never from each other. Sections: the data pipeline's character
tokenizer; Hugging Face tokenizers; the tiny checkpoint for inference; the loss tests' batches,
tolerances and references; a tiny GPT trained on Megatron-Core (the checkpoint tests);
launches of the trainer on the tiny configuration.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from megatron_irl import SoftQLossOutput, soft_q_loss_reference, vocab_parallel_soft_q_loss

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
GOLDEN = REPO / "tests" / "golden"


# ------------------------------------------------------------------ the data pipeline

PAD, BOS, EOS = 0, 1, 2
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))  # newline and printable ASCII


class CharTokenizer:
    """One id per character: id = 3 + ALPHABET.index(c); 0/1/2 = pad/bos/eos."""

    def __init__(self, bos: bool = True):
        self.eos_id, self.pad_id = EOS, PAD
        self.bos_id = BOS if bos else None
        self.vocab_size = 3 + len(ALPHABET)
        self.chat_template = None  # chat records: the built-in rendering

    def encode(self, text: str) -> list[int]:
        return [3 + ALPHABET.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(ALPHABET[i - 3] for i in ids if i >= 3)


def ids(text: str) -> list[int]:
    """The CharTokenizer ids of `text`."""
    return CharTokenizer().encode(text)


def write_jsonl(path, records) -> str:
    """Write records (dicts, or raw strings written as-is) one per line; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ------------------------------------------------------------------ Hugging Face tokenizers

SPECIALS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(directory: str, vocab_size: int = 256, chat_template: str | None = None):
    """A character-level tokenizer of printable ASCII, the Llama 3 and ChatML special tokens
    and reserved special tokens up to ``vocab_size``, saved (with ``chat_template`` in its
    tokenizer_config.json when given); BOS <|begin_of_text|>, EOS <|end_of_text|>.
    Returns the transformers tokenizer."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, models

    characters = list(string.printable[:95])  # includes "\n"
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - len(SPECIALS) - 95)]
    vocab = {token: i for i, token in enumerate(SPECIALS + characters + reserved)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS + reserved])
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        unk_token="<unk>")
    if chat_template is not None:
        hf_tokenizer.chat_template = chat_template
    hf_tokenizer.save_pretrained(directory)
    return hf_tokenizer


def make_ascii_tokenizer(directory: str) -> int:
    """A character-level tokenizer of the printable ASCII characters plus <unk> <s> </s>,
    saved to ``directory``; returns its size (98)."""
    import transformers
    from tokenizers import Tokenizer, models

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + list(string.printable[:95]))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    ).save_pretrained(directory)
    return len(vocab)


# ------------------------------------------------------------------ the tiny checkpoint

def tiny_config(tp: int = 1, pp: int = 1):
    """The bundled tiny configuration, ready for inference at TP ``tp`` and PP ``pp``."""
    from megatron_irl.arguments import load_yaml_config
    from megatron_irl.config import TrainConfig
    from megatron_irl.evaluation.loading import inference_config

    data, _ = load_yaml_config(str(REPO / "examples" / "tiny.yaml"))
    return inference_config(TrainConfig.from_dict(data), tp, pp)


def save_random_model(directory: str) -> None:
    """Save the tiny configuration with random weights (TP 1) to ``directory``."""
    from megatron_irl.core.checkpoint import TrainingState, save_checkpoint
    from megatron_irl.core.model import build_model_chunks

    cfg = tiny_config()
    chunks = build_model_chunks(cfg, tiny_tokenizer().vocab_size)
    save_checkpoint(directory, TrainingState(0, 0, cfg.to_dict()), chunks, None, None)


def tiny_tokenizer():
    from megatron_irl.data import load_tokenizer

    return load_tokenizer(str(REPO / "examples" / "data" / "tokenizer.model"))


# ------------------------------------------------------------------ loss inputs and references

# The fused loss upcasts its input exactly and computes in fp32, so against a float64 reference
# on the same input values every output, for fp32 and bf16 logits alike, is off by fp32
# rounding only. That error scales with the magnitudes an element was computed from, not with
# the element: nll = V - z[a] and delta = z[a] - gamma * V' cancel (a confident token's nll
# of 5e-8 comes out as 0 in fp32, in Megatron's cross entropy too). So the absolute slack is
# relative to the largest |V| (which bounds |z[a]|) and the largest element of the tensor:
# |actual - expected| <= RTOL * (|expected| + max |expected| + max |V|), RTOL about 80 fp32 ulps.
# The logit gradient is a few products of softmax entries with per-token coefficients; its
# slack is relative to its own largest element.
FP32_RTOL = 1e-5


# The gradient of bf16 logits is returned in bf16: the fp32 gradient (error as above) is rounded
# to 8 significant bits, a relative error of at most 2^-9; 2^-8 also covers an fp32 error that
# moves a value across a rounding boundary. fp16 keeps 11 bits (2^-12), so 2^-10 likewise.
GRAD_RTOL = {torch.float32: FP32_RTOL, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


IGNORE = -100  # Megatron's / Hugging Face's label at untrained positions


LAM_GAMMA = [(0.0, 1.0), (0.1, 1.0), (1.0, 0.99), (2.0, 0.0), (0.5, 0.5)]


class Batch(NamedTuple):
    """Loss inputs; ``logits`` are fp32 ``[b, s, v]``, ``upstream`` fp32 ``[4, b, s]``."""

    logits: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    terminal: torch.Tensor
    upstream: torch.Tensor


def make_batch(b, s, v, *, seed, scale=3.0, p_trained=0.7, p_terminal=0.2) -> Batch:
    """Random inputs: IGNORE labels at untrained positions, terminals anywhere."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, v, generator=gen) * scale
    trained = torch.rand(b, s, generator=gen) < p_trained
    labels = torch.where(trained, torch.randint(0, v, (b, s), generator=gen), IGNORE)
    terminal = torch.rand(b, s, generator=gen) < p_terminal
    upstream = torch.randn(4, b, s, generator=gen)
    return Batch(logits, labels, trained.float(), terminal, upstream)


def upstream_only_on(batch: Batch, *fields: str) -> Batch:
    """``batch`` with the upstream gradient of every output not named in ``fields`` zeroed."""
    keep = torch.tensor([float(name in fields) for name in SoftQLossOutput._fields])
    return batch._replace(upstream=batch.upstream * keep[:, None, None])


def weighted_sum(out: SoftQLossOutput, upstream: torch.Tensor) -> torch.Tensor:
    """A scalar whose backward sends ``upstream[i]`` into output field i."""
    return sum((field * grad.to(field.dtype)).sum() for field, grad in zip(out, upstream))


def run_fused(logits, batch, *, lam, gamma, stop_value_grad=False, tp_group=None):
    """The fused loss on a clone of ``logits`` (any dtype, possibly a vocab shard).

    Returns (outputs, gradient w.r.t. the logits) after backward with ``batch.upstream``.
    """
    logits = logits.clone().requires_grad_()
    out = vocab_parallel_soft_q_loss(
        logits, batch.labels, batch.loss_mask, batch.terminal,
        lam=lam, gamma=gamma, tp_group=tp_group, stop_value_grad=stop_value_grad,
    )
    weighted_sum(out, batch.upstream).backward()
    return SoftQLossOutput(*(field.detach() for field in out)), logits.grad.clone()


def run_reference(logits, batch, *, lam, gamma, stop_value_grad=False):
    """The reference in float64 on the same logit values; returns (outputs, gradient)."""
    logits = logits.double().requires_grad_()
    out = soft_q_loss_reference(
        logits, batch.labels, batch.loss_mask.double(), batch.terminal,
        lam=lam, gamma=gamma, stop_value_grad=stop_value_grad,
    )
    weighted_sum(out, batch.upstream.double()).backward()
    return SoftQLossOutput(*(field.detach() for field in out)), logits.grad


def assert_close_scaled(actual, expected, rtol, what, scale=0.0):
    """|actual - expected| <= rtol * (|expected| + max |expected| + scale), element-wise."""
    expected = expected.double()
    atol = rtol * (expected.abs().max().item() + scale) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def assert_outputs_close(actual: SoftQLossOutput, expected: SoftQLossOutput, what=""):
    value_scale = expected.value.abs().max().item() if expected.value.numel() else 0.0
    for name, a, e in zip(SoftQLossOutput._fields, actual, expected):
        assert a.dtype == torch.float32, f"{what} {name} is {a.dtype}, documented fp32"
        assert_close_scaled(a, e, FP32_RTOL, f"{what} {name}", scale=value_scale)


class OnlineBatch(NamedTuple):
    logits: torch.Tensor  # fp32 [b, s, v]
    labels: torch.Tensor
    loss_mask: torch.Tensor  # expert tokens
    policy_mask: torch.Tensor
    terminal: torch.Tensor
    upstream: torch.Tensor  # [6, b, s]


def make_online_batch(b, s, v, *, seed, p_policy=0.5, **kwargs) -> OnlineBatch:
    base = make_batch(b, s, v, seed=seed, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    is_policy = torch.rand(b, s, generator=gen) < p_policy
    upstream = torch.randn(6, b, s, generator=gen)
    return OnlineBatch(base.logits, base.labels, base.loss_mask * ~is_policy,
                       base.loss_mask * is_policy, base.terminal, upstream)


# ------------------------------------------------------------------ a tiny GPT on Megatron-Core

# What the checkpoint tests train: a GPTModel (local spec, 4 heads, seq 16, vocab 128) in
# Megatron's DistributedDataParallel with fp32 Adam and a cosine scheduler, on random tokens.
VOCAB = 128
SEQ = 16
MICRO_BATCH = 2
MICROBATCHES_PER_STEP = 2  # in the whole data-parallel world
GLOBAL_BATCH = MICRO_BATCH * MICROBATCHES_PER_STEP
CONFIG = {"model": {"num_layers": 2, "hidden_size": 64}, "training": {"train_iters": 4}}


def build_training(hidden_size=64, dropout=0.1, num_layers=2, distributed_optimizer=False):
    """([DDP(GPTModel)] per virtual stage, fp32 Adam, scheduler) for the current layout."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer import TransformerConfig

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=4,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        use_cpu_initialization=True,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=torch.float32,
        # Interleaving at pp=2 with batched p2p swaps the exchanged tensors (upstream bug
        # NVIDIA/Megatron-LM#1450).
        batch_p2p_comm=vpp is None,
    )
    chunks = []
    for stage in [None] if vpp is None else range(vpp):
        position = {"ignore_virtual": False, "vp_stage": stage}
        module = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(),
            vocab_size=VOCAB,
            max_sequence_length=SEQ,
            pre_process=parallel_state.is_pipeline_first_stage(**position),
            post_process=parallel_state.is_pipeline_last_stage(**position),
            vp_stage=stage,
        )
        module.real_vocab_size = VOCAB  # unpadded, as build_model_chunks records it
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer)
        chunks.append(DistributedDataParallel(config, ddp_config, module))
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=1e-3, weight_decay=0.01, clip_grad=1.0,
                        use_distributed_optimizer=distributed_optimizer),
        chunks,
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-3,
        lr_warmup_steps=2 * GLOBAL_BATCH, lr_decay_steps=8 * GLOBAL_BATCH,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
        wd_incr_steps=8 * GLOBAL_BATCH, wd_incr_style="constant",
    )
    return chunks, optimizer, scheduler


def microbatches(iteration, count):
    """The ``count`` microbatches of one step: dicts of int64 [b, s] tokens, labels and
    position_ids, the same for every layout (a function of ``iteration`` only)."""
    generator = torch.Generator().manual_seed(iteration)
    sequences = torch.randint(0, VOCAB, (count, MICRO_BATCH, SEQ + 1), generator=generator)
    position_ids = torch.arange(SEQ).expand(MICRO_BATCH, SEQ).contiguous()
    return [
        {"tokens": s[:, :-1].contiguous(), "labels": s[:, 1:].contiguous(),
         "position_ids": position_ids}
        for s in sequences
    ]


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token_loss, _mean_loss


def _mean_loss(per_token_loss):
    loss = per_token_loss.float().mean()
    return loss, {"lm loss": loss.detach()}


def train_step(chunks, optimizer, scheduler, iteration):
    """One optimizer step on iteration ``iteration``'s global batch, split over the
    data-parallel ranks; returns this rank's microbatch losses ([] off the last stage)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    local = microbatches(iteration, MICROBATCHES_PER_STEP)[dp_rank::dp_size]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    per_microbatch = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=[iter(local) for _ in chunks],
        model=chunks, num_microbatches=len(local), seq_length=SEQ, micro_batch_size=MICRO_BATCH,
    )
    optimizer.step()
    scheduler.step(increment=GLOBAL_BATCH)
    return [entry["lm loss"].item() for entry in per_microbatch]


# ------------------------------------------------------------------ trainer launches

SHORT_RUN = [
    "--train-iters", "4", "--lr-warmup-iters", "1", "--log-interval", "1",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--progress-bar", "off",
    "--tensorboard-dir", "", "--valid-data-path", "", "--save", "", "--save-interval", "",
]


def train_command(nproc: int, flags: list[str]) -> list[str]:
    """The command line of ``megatron-irl train`` on the tiny configuration, ``nproc`` ranks."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    return launcher + ["-m", "megatron_irl", "train", "--config", str(TINY), *flags]


def train_env() -> dict:
    """The environment of a launched training run: one thread, no inherited rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def run_train(tmp_path: Path, nproc: int, *flags: str, name: str = "run",
              save: bool = False) -> list[dict]:
    """Run the trainer; return the training steps' scalars from its metrics file.

    With ``save`` the final checkpoint goes to ``tmp_path / f"{name}_ckpt"``.
    """
    metrics = tmp_path / f"{name}.metrics.jsonl"
    save_flags = ["--save", str(tmp_path / f"{name}_ckpt")] if save else []
    result = subprocess.run(
        train_command(nproc, [*SHORT_RUN, *save_flags, "--metrics-file", str(metrics), *flags]),
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [step for step in steps if step["split"] == "train"]


def losses(steps: list[dict]) -> dict[int, float]:
    return {step["iteration"]: step["loss"] for step in steps}


def assert_same_losses(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for iteration in actual:
        assert actual[iteration] == pytest.approx(expected[iteration], rel=rel), iteration


def assert_golden_losses(name: str, steps: list[dict]) -> None:
    """The run's losses are those pinned in ``tests/golden/<name>.json`` (rel 1e-4, for other
    CPUs' float rounding): catches silent numerical changes of an objective.

    After a deliberate numerical change, ``MEGATRON_IRL_WRITE_GOLDEN=1 pytest -k golden``
    rewrites the files from the runs (review the diff before committing it).
    """
    path = GOLDEN / f"{name}.json"
    if os.environ.get("MEGATRON_IRL_WRITE_GOLDEN") == "1":
        path.write_text(json.dumps({str(k): v for k, v in losses(steps).items()}, indent=1)
                        + "\n")
    expected = {int(k): v for k, v in json.loads(path.read_text()).items()}
    assert_same_losses(losses(steps), expected, rel=1e-4)


def read_safetensors(directory: str) -> dict:
    """Every tensor of the ``*.safetensors`` files in ``directory`` (a Hugging Face export)."""
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors
