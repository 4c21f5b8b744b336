"""SFT data pipeline: JSONL records -> tokenized documents -> packed rows -> micro-batches.

Typical use by a trainer:

    tokenizer = load_tokenizer(path)
    train = SFTDataset("train.jsonl" or preprocessed_prefix, tokenizer, seq_length)
    log(train.report.format())
    batches = TrainingBatches(train, micro_batch_size, num_microbatches, dp_rank, dp_size, seed)
    micro_batches = batches.batches_for_iteration(iteration)   # list of dicts of [b, s] tensors
    attention_mask = block_causal_attention_mask(micro_batch["document_ids"])  # [b, 1, s, s]
"""

from megatron_irl.data.dataset import EvalBatches, SFTDataset, TrainingBatches
from megatron_irl.data.indexed import preprocess_jsonl
from megatron_irl.data.packing import block_causal_attention_mask
from megatron_irl.data.records import render_chat
from megatron_irl.data.report import DataError, DataReport
from megatron_irl.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DataError",
    "DataReport",
    "EvalBatches",
    "SFTDataset",
    "Tokenizer",
    "TrainingBatches",
    "block_causal_attention_mask",
    "load_tokenizer",
    "preprocess_jsonl",
    "render_chat",
]
