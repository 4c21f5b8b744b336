"""The GAIL discriminator: a small causal transformer over token ids, separate from the policy.

Why a separate model and not a head on the policy's hidden states: with pipeline parallelism
the policy's final hidden states exist only on the last stage and inside Megatron's schedule,
and a head would share (and perturb) the policy's trunk. This model needs only the batch's
token ids, so it runs wherever the loss runs (the last pipeline stage), replicated on every
tensor-parallel rank (same batch, no dropout, so the replicas stay identical); its gradients
are averaged over the data-parallel group by the caller and it has its own optimizer.

For a transition ``(s_t, a_t)`` (prefix ``tokens[..t]`` of one document, action
``labels[t]``) the logit is

    d_t = <h_t, action_embedding[a_t]> + action_bias[a_t],   h_t = encoder(tokens)[t]

a bilinear head evaluated only at the taken action: ``[b, s, h]`` activations, never
``[b, s, vocab]``. Attention is block-causal over ``document_ids`` (Megatron's packing
convention, ``megatron_irl.data.packing.block_causal_attention_mask``), so packed documents
and padding do not see one another, and positions come from ``position_ids``.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_irl.data.packing import block_causal_attention_mask


class TokenDiscriminator(nn.Module):
    """``forward(tokens, labels, position_ids, document_ids) -> d`` ``[b, s]`` fp32 logits of
    ``D(s_t, a_t)`` = probability that the transition comes from the dataset.

    Args:
        vocab_size: token ids lie in ``[0, vocab_size)`` (labels outside, e.g. -100 at
            untrained positions, are clamped; their logits are meaningless and masked by
            the loss).
        max_seq_length: largest position id + 1.
        hidden_size, num_layers, num_heads: the transformer's size (pre-norm layers, GELU MLP
            of 4 * hidden_size, no dropout).
    """

    def __init__(self, vocab_size: int, max_seq_length: int, *, hidden_size: int = 128,
                 num_layers: int = 2, num_heads: int = 4):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of "
                             f"num_heads ({num_heads})")
        self.vocab_size = vocab_size
        self.num_heads = num_heads
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_seq_length, hidden_size)
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, 4 * hidden_size, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(hidden_size)
        self.action_embedding = nn.Embedding(vocab_size, hidden_size)
        self.action_bias = nn.Embedding(vocab_size, 1)
        nn.init.normal_(self.action_embedding.weight, std=hidden_size**-0.5)
        nn.init.zeros_(self.action_bias.weight)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                document_ids: torch.Tensor) -> torch.Tensor:
        """All inputs ``[b, s]`` int64; returns the logits ``[b, s]`` fp32. Mutates nothing."""
        b, s = tokens.shape
        hidden = self.token_embedding(tokens) + self.position_embedding(position_ids)  # [b, s, h]
        masked = block_causal_attention_mask(document_ids)  # [b, 1, s, s], True = masked
        # nn.MultiheadAttention takes a per-sample mask as [b * heads, s, s].
        attn_mask = masked.expand(b, self.num_heads, s, s).reshape(b * self.num_heads, s, s)
        hidden = self.final_norm(self.encoder(hidden, mask=attn_mask))
        actions = labels.clamp(0, self.vocab_size - 1)
        logits = (hidden * self.action_embedding(actions)).sum(-1)  # [b, s]
        return (logits + self.action_bias(actions).squeeze(-1)).float()
