"""A tiny checkpoint for the inference tests: the bundled tiny configuration, random weights."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tp: int = 1, pp: int = 1):
    from megatron_irl.arguments import load_yaml_config
    from megatron_irl.config import TrainConfig
    from megatron_irl.evaluation.loading import inference_config

    data, _ = load_yaml_config(str(REPO / "examples" / "tiny.yaml"))
    return inference_config(TrainConfig.from_dict(data), tp, pp)


def save_random_model(directory: str) -> None:
    from megatron_irl.training.checkpoint import TrainingState, save_checkpoint
    from megatron_irl.training.model import build_model_chunks

    cfg = tiny_config()
    chunks = build_model_chunks(cfg, tiny_tokenizer().vocab_size)
    save_checkpoint(directory, TrainingState(0, 0, cfg.to_dict()), chunks, None, None)


def tiny_tokenizer():
    from megatron_irl.data import load_tokenizer

    return load_tokenizer(str(REPO / "examples" / "data" / "tokenizer.model"))
