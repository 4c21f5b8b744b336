"""Packed rows as THD sequences: the cu_seqlens form of the block-causal mask.

Transformer Engine's flash and cuDNN attention take packed documents as one "THD" sequence
(tokens x heads x dim) with cumulative sequence lengths instead of a dense ``[b, 1, s, s]``
mask, which keeps them off those kernels. :func:`thd_packed_seq_params` flattens a
micro-batch's ``b`` rows into one sequence of ``b * s`` tokens and cuts it into segments:

* each document of a row is one segment (causal attention within it, as the block mask's
  ``same document and j <= i``);
* each run of padding at the end of a row is one segment. The block mask lets a padding
  position attend only itself; here it attends the padding before it in the same run. Real
  tokens never attend padding in either form, so their outputs agree; padding outputs are
  never trained (loss mask 0).

RoPE then restarts at each segment (TE's THD rotary embedding), i.e. per document; rotary
scores depend only on the offset between query and key, so this equals the row-position RoPE
of the block-mask path. Learned absolute position embeddings take the rows' ``position_ids``,
which restart per document already (``packing.build_row``).
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def segment_boundaries(document_ids: torch.Tensor) -> torch.Tensor:
    """int32 [num_segments + 1]: cumulative lengths of the segments of the flattened rows.

    ``document_ids`` int64 [b, s] (-1 = padding). A segment ends where the document id
    changes or a row ends.
    """
    b, s = document_ids.shape
    flat = document_ids.reshape(-1)  # [b*s]
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # every row starts a segment
    begin = torch.nonzero(starts).flatten()
    end = torch.tensor([b * s], device=flat.device)
    return torch.cat([begin, end]).to(torch.int32)


def thd_packed_seq_params(document_ids: torch.Tensor) -> PackedSeqParams:
    """Megatron-Core's PackedSeqParams (qkv_format "thd") for a micro-batch flattened to one
    sequence of ``b * s`` tokens (``[1, b*s]`` tokens and position ids go with it)."""
    cu_seqlens = segment_boundaries(document_ids)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
