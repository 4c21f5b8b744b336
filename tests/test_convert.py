"""Hugging Face <-> megatron-irl conversion, checked against transformers' own model classes.

Tiny models (2 layers, hidden 64, 4 heads, 2 key/value heads, a 98-token vocabulary that
the Megatron side pads) are made with transformers and saved as safetensors; Megatron runs
on gloo ranks (megatron_irl.testing.run_distributed) at the layout under test.
"""

import os
import string
import subprocess
import sys

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from megatron_irl.config import ConfigError  # noqa: E402
from megatron_irl.convert import ConversionError, convert_to_hf, import_checkpoint, plan_import  # noqa: E402
from megatron_irl.testing import run_distributed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = torch.tensor([[1, 40, 41, 52, 60, 3, 77, 90, 12, 5, 33, 70],
                       [1, 9, 8, 7, 6, 50, 51, 52, 53, 20, 21, 97]])
ATOL = 1e-4


# ------------------------------------------------------------------ Hugging Face side


def make_tokenizer(directory: str) -> int:
    """A character-level tokenizer of the printable ASCII characters plus <unk> <s> </s>."""
    from tokenizers import Tokenizer, models

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + list(string.printable[:95]))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    ).save_pretrained(directory)
    return len(vocab)


def make_hf_model(directory: str, family: str, tie: bool, seed: int = 0):
    """A random tiny ``<family>ForCausalLM`` saved (safetensors) with its tokenizer."""
    vocab_size = make_tokenizer(directory)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
        rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        max_position_embeddings=256)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # random norms and q/k/v biases, so that a swapped tensor shows
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def read_safetensors(directory: str) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


# ------------------------------------------------------------------ Megatron side (ranks)


def rank_import(hf_dir: str, output_dir: str) -> None:
    from megatron.core import parallel_state as ps

    plan = plan_import(hf_dir, ps.get_tensor_model_parallel_world_size(),
                       ps.get_pipeline_model_parallel_world_size(), dtype="float32")
    import_checkpoint(plan, output_dir)


def rank_logits(load_dir: str, tokens: torch.Tensor):
    """Load ``load_dir`` as ``--finetune`` does into this layout's model; the full logits
    [b, s, v_padded] on the first rank of the last stage, None elsewhere. Causal mask."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_irl.config import TrainConfig
    from megatron_irl.training.checkpoint import load_checkpoint
    from megatron_irl.training.model import build_model_chunks
    from megatron_irl.data import load_tokenizer

    with open(os.path.join(load_dir, "model.yaml"), encoding="utf-8") as file:
        converted = yaml.safe_load(file)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    model = dict(converted["model"])
    vocab_multiple = model["make_vocab_size_divisible_by"] * \
        converted["parallel"]["tensor_model_parallel_size"]
    model["make_vocab_size_divisible_by"] = vocab_multiple // tp  # model.yaml's rule
    cfg = TrainConfig.from_dict({"model": model, "parallel": {
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}})
    (chunk,) = build_model_chunks(cfg, load_tokenizer(load_dir).vocab_size)
    load_checkpoint(load_dir, [chunk], load_optimizer=False, load_rng=False)
    chunk.eval()
    b, s = tokens.shape
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s)
    positions = torch.arange(s).expand(b, s)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(s, b, cfg.model.hidden_size)
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            chunk.set_input_tensor(hidden)
        output = chunk(tokens, positions, mask)
        if not ps.is_pipeline_last_stage():
            dist.send(output.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
        logits = gather_from_tensor_model_parallel_region(output)  # [b, s, v_padded]
    return logits if ps.get_tensor_model_parallel_rank() == 0 else None


def megatron_logits(load_dir: str, tp: int, pp: int) -> torch.Tensor:
    results = run_distributed(rank_logits, tp * pp, tp=tp, pp=pp, args=(load_dir, TOKENS))
    return next(result for result in results if result is not None)


def import_at(hf_dir: str, output_dir: str, tp: int, pp: int) -> None:
    run_distributed(rank_import, tp * pp, tp=tp, pp=pp, args=(hf_dir, output_dir))


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_imported_llama_logits_match_transformers_at_each_layout(tmp_path, tp, pp):
    hf = make_hf_model(str(tmp_path / "hf"), "Llama", tie=False)
    import_at(str(tmp_path / "hf"), str(tmp_path / "mg"), tp, pp)
    logits = megatron_logits(str(tmp_path / "mg"), tp, pp)
    expected = hf_logits(hf)
    torch.testing.assert_close(logits[..., :expected.shape[-1]], expected, atol=ATOL, rtol=0)
    assert torch.all(logits[..., expected.shape[-1]:] == 0)  # zero padded rows
