"""Plain-PyTorch soft-Q loss over the full vocabulary, differentiated by autograd.

The readable definition that ``vocab_parallel_soft_q_loss`` must match: for tests, and for
readers who want the maths without the collectives and in-place buffers. It allocates several
``[b, s, v]`` tensors, so it is not for training.
"""

from __future__ import annotations

import torch

from megatron_irl.loss.soft_q import SoftQLossOutput


def soft_q_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal: torch.Tensor,
    *,
    lam: float,
    gamma: float,
    stop_value_grad: bool = False,
) -> SoftQLossOutput:
    """Same contract as ``vocab_parallel_soft_q_loss`` with the whole vocabulary ``[b, s, v]``.

    Computes in the dtype of ``logits`` (pass float64 for a tight reference).
    """
    b, s, v = logits.shape
    trained = loss_mask > 0
    value = torch.logsumexp(logits, dim=-1)  # V(s_t)             [b, s]
    safe_labels = torch.where(trained, labels, 0).clamp(0, v - 1)
    target_logit = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # z_t[a_t]

    next_value = torch.cat([value[:, 1:], value.new_zeros(b, 1)], dim=1)  # V(s_{t+1})
    if stop_value_grad:
        next_value = next_value.detach()
    next_state_known = torch.cat(
        [torch.ones(b, s - 1, dtype=torch.bool, device=logits.device), terminal[:, -1:]], dim=1
    )
    td_active = trained & next_state_known

    delta = target_logit - gamma * (~terminal).to(logits.dtype) * next_value
    delta = torch.where(td_active, delta, torch.zeros_like(delta))
    nll = torch.where(trained, value - target_logit, torch.zeros_like(value))
    mask = loss_mask.to(logits.dtype)
    loss = mask * (nll + lam * delta.square())
    return SoftQLossOutput(loss, nll, delta, value)
