"""THD metadata from packed rows against the block-causal mask, through reference attention.

Transformer Engine's THD attention cannot run here; it is stood in for by a float64 reference
of what it computes (causal softmax attention within each cu_seqlens segment, RoPE restarting
at each segment), and the block-mask path by dense masked attention with RoPE at the row's
positions (Megatron's rotary embedding over ``0..s-1``). Real tokens must get the same output.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_irl.data.packed_attention import segment_boundaries, thd_packed_seq_params
from megatron_irl.data.packing import block_causal_attention_mask

REPO = Path(__file__).resolve().parents[1]
HEADS, DIM = 2, 8


def _rope(x, positions):
    """x [t, heads, d] rotated by ``positions`` [t] (GPT-NeoX halves, base 10000), float64."""
    half = DIM // 2
    inv_freq = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions[:, None].double() * inv_freq[None, :]  # [t, d/2]
    cos = torch.cat([angles.cos()] * 2, -1)[:, None]  # [t, 1, d]
    sin = torch.cat([angles.sin()] * 2, -1)[:, None]
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _block_mask_attention(q, k, v, document_ids):
    """[b, s, heads, d]: dense attention with the block-causal mask, RoPE at row positions."""
    b, s = document_ids.shape
    masked = block_causal_attention_mask(document_ids)  # [b, 1, s, s], True = masked
    rows = []
    for row in range(b):
        positions = torch.arange(s)
        qr, kr = _rope(q[row], positions), _rope(k[row], positions)
        scores = torch.einsum("qhd,khd->hqk", qr, kr) / DIM ** 0.5
        scores = scores.masked_fill(masked[row], float("-inf"))
        rows.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[row]))
    return torch.stack(rows)


def _thd_attention(q, k, v, cu_seqlens):
    """[t, heads, d]: causal attention within each segment of flattened [t, heads, d] inputs,
    RoPE restarting at each segment (what TE's THD attention computes)."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        positions = torch.arange(end - start)
        qs, ks = _rope(q[start:end], positions), _rope(k[start:end], positions)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / DIM ** 0.5
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[start:end])
    return out


def _packed_rows(lengths_per_row, seq_length):
    """document_ids and position_ids [b, s] as packing.build_row lays documents out."""
    document_ids = np.full((len(lengths_per_row), seq_length), -1)
    position_ids = np.zeros_like(document_ids)
    next_id = 0
    for row, lengths in enumerate(lengths_per_row):
        offset = 0
        for length in lengths:
            document_ids[row, offset:offset + length] = next_id
            position_ids[row, offset:offset + length] = np.arange(length)
            next_id, offset = next_id + 1, offset + length
    return torch.from_numpy(document_ids), torch.from_numpy(position_ids)


ROWS = [[3, 5, 2], [12], [1, 4], [6, 6]]  # padding after rows 0 and 2; full rows 1 and 3
SEQ = 12


def test_thd_attention_equals_block_mask_attention_on_real_tokens():
    document_ids, _ = _packed_rows(ROWS, SEQ)
    b, s = document_ids.shape
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, HEADS, DIM, generator=generator, dtype=torch.float64)
               for _ in range(3))
    params = thd_packed_seq_params(document_ids)
    flat = [x.reshape(b * s, HEADS, DIM) for x in (q, k, v)]
    thd = _thd_attention(*flat, params.cu_seqlens_q).reshape(b, s, HEADS, DIM)
    reference = _block_mask_attention(q, k, v, document_ids)
    real = document_ids >= 0
    torch.testing.assert_close(thd[real], reference[real], rtol=1e-12, atol=1e-12)


def test_segments_are_the_documents_and_padding_runs_of_each_row():
    document_ids, _ = _packed_rows(ROWS, SEQ)
    boundaries = segment_boundaries(document_ids).tolist()
    # row 0: 3, 5, 2 + 2 padding; row 1: 12; row 2: 1, 4 + 7 padding; row 3: 6, 6
    assert boundaries == [0, 3, 8, 10, 12, 24, 25, 29, 36, 42, 48]
    params = thd_packed_seq_params(document_ids)
    assert (params.qkv_format, params.max_seqlen_q, params.max_seqlen_kv) == ("thd", 12, 12)
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_kv is params.cu_seqlens_q


def test_bundled_data_packs_into_segments_whose_positions_restart_and_attend_alike():
    """The packed rows the trainer reads (bundled data, seq 128): each segment's position ids
    run 0, 1, ... (learned embeddings and RoPE agree), and THD attention equals the block
    mask's on real tokens."""
    from megatron_irl.data import SFTDataset, load_tokenizer

    dataset = SFTDataset(str(REPO / "examples" / "data" / "train.jsonl"),
                         load_tokenizer(str(REPO / "examples" / "data" / "tokenizer.model")), 128)
    batch = dataset.micro_batch(np.arange(4))
    document_ids, position_ids = batch["document_ids"], batch["position_ids"]
    boundaries = segment_boundaries(document_ids).tolist()
    assert len(boundaries) - 1 > 4  # several documents per row
    flat_positions, flat_ids = position_ids.reshape(-1), document_ids.reshape(-1)
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        if flat_ids[start] >= 0:
            assert flat_positions[start:end].tolist() == list(range(end - start))
    b, s = document_ids.shape
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, s, HEADS, DIM, generator=generator, dtype=torch.float64)
               for _ in range(3))
    flat = [x.reshape(b * s, HEADS, DIM) for x in (q, k, v)]
    thd = _thd_attention(*flat, segment_boundaries(document_ids)).reshape(b, s, HEADS, DIM)
    real = document_ids >= 0
    torch.testing.assert_close(thd[real], _block_mask_attention(q, k, v, document_ids)[real],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transformer_impl, loss, thd", [
    ("transformer_engine", "soft_q", True),
    ("local", "soft_q", False),
    ("transformer_engine", "online", False),  # sampling passes masks to the same model
])
def test_planner_drops_the_attention_scores_where_training_packs_as_thd(transformer_impl, loss,
                                                                        thd):
    from megatron_irl.config import TrainConfig
    from megatron_irl.planning.memory_estimate import layer_activation_bytes, packs_as_thd

    cfg = TrainConfig.from_dict({
        "model": {"num_layers": 2, "hidden_size": 256, "num_attention_heads": 4,
                  "seq_length": 1024, "transformer_impl": transformer_impl},
        "training": {"bf16": True, "micro_batch_size": 1, "global_batch_size": 8},
        "irl": {"loss": loss}, **({"online": {}} if loss == "online" else {})})
    assert packs_as_thd(cfg) is thd
    scores = layer_activation_bytes(cfg).attention_scores
    dense = 1 * 4 * 1024 ** 2 * 2  # [b, heads, s, s] bf16
    assert scores < dense / 100 if thd else scores >= dense


def test_training_forward_step_feeds_a_thd_micro_batch_and_gives_the_loss_rows():
    """forward_step with thd=True against a stand-in for the TE model: it must get the rows
    flattened to one sequence with their cu_seqlens and no mask, and the loss function the
    output back in the batch's [b, s, ...] layout."""
    from megatron_irl.training.loop import forward_step

    document_ids, position_ids = _packed_rows(ROWS, SEQ)
    b, s = document_ids.shape
    tokens = torch.arange(b * s).reshape(b, s)
    batch = {"tokens": tokens, "position_ids": position_ids, "document_ids": document_ids}
    seen = {}

    def te_model(input_ids, positions, attention_mask, packed_seq_params):
        seen.update(input_ids=input_ids, positions=positions, mask=attention_mask,
                    packed=packed_seq_params)
        return input_ids.double()[..., None].expand(1, b * s, 3)  # "logits" [1, b*s, 3]

    def objective(output, batch):
        return output, batch

    output, loss_func = forward_step(iter([batch]), te_model, objective, thd=True)
    assert seen["input_ids"].shape == (1, b * s) and seen["mask"] is None
    assert torch.equal(seen["positions"], position_ids.reshape(1, b * s))
    assert seen["packed"].cu_seqlens_q.tolist() == segment_boundaries(document_ids).tolist()
    rows, _ = loss_func(output)
    assert rows.shape == (b, s, 3) and torch.equal(rows[..., 0], tokens.double())
