"""Batched generation from a Megatron-Core GPTModel at any TP / PP layout, with a KV cache.

Decoding follows Megatron's static-batch scheme: prompts of different lengths share one
batch without padding masks. The first forward (prefill) runs every row's first
``min(prompt lengths)`` tokens with a causal mask; after that each forward feeds one token
per row and attends to the cache (Megatron-Core's ``StaticInferenceContext``). A row whose
prompt is longer than the current position takes its own prompt token instead of the
sampled one, so it is still "prefilling" one token per step.

Every rank of a model replica runs the same loop:
  * pipeline stages pass hidden states ``[n, b, h]`` forward with point-to-point
    send / recv on the pipeline group (one message per forward);
  * on the last stage GPTModel all-gathers the last position's vocab-parallel logits over
    the tensor-parallel group (Megatron's inference path) and every TP rank samples
    identically (same logits, same generators);
  * the chosen tokens (and beam indices) are broadcast from the last stage over the
    pipeline group, so every rank knows when every row is done and stops together.

Sampling draws row ``i`` from its own ``torch.Generator`` seeded with ``seeds[i]``: a
sample depends on its prompt, its seed and the model, not on which other rows share
its batch (nor on the data-parallel split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_irl.cpu_support import current_device
from megatron_irl.data import block_causal_attention_mask


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature`` 0 is greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set with this much probability; 1: all
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"--temperature {self.temperature} must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k} must be >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens} must be >= 1")


@dataclass
class Generation:
    """One generated response.

    ``log_prob`` sums log pi(token | prefix) at temperature 1 over the generated tokens
    (the EOS included when it was generated); ``entropy`` is the policy's mean entropy
    (nats, temperature 1) over the positions that generated them. ``token_log_probs`` are
    the summands, one per generated token (EOS included), from :meth:`Generator.sample`
    (empty from beam search).
    """

    tokens: list[int]  # the response, without the EOS
    finished: bool  # ended with EOS (else the token budget ran out)
    log_prob: float
    entropy: float
    token_log_probs: list[float] = field(default_factory=list)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` [b, v] with the tokens outside top-k / top-p set to -inf (a new tensor).

    Top-p keeps the most likely tokens whose cumulative probability, before adding the
    token itself, is below ``top_p``: the most likely token always survives.
    """
    filtered = logits.clone()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1]
        filtered[logits < kth] = -math.inf
    if top_p < 1:
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        filtered[drop] = -math.inf
    return filtered


def choose_tokens(logits: torch.Tensor, params: SamplingParams,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """int64 [b]: the next token of each row of ``logits`` [b, v] (float32)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits / params.temperature, params.top_k,
                                        params.top_p), dim=-1)
    return torch.cat([torch.multinomial(row, 1, generator=generator)
                      for row, generator in zip(probs, generators)])


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """[b] entropy of each row of ``log_probs`` [b, v]."""
    return -(log_probs.exp() * log_probs).sum(dim=-1)


class Generator:
    """Generates with one model replica (this rank's single model chunk).

    Args:
        model: this rank's GPTModel (built without virtual pipeline stages), in eval mode.
        vocab_size: the real vocabulary (``core.vocabulary.real_vocab_size``); the softmax, the
            log-probabilities and the entropy cover it only: the padded logits beyond it
            are never chosen.
        eos_id: the token that ends a response.
        max_sequence_length: longest prompt + response the model may see.
        pp_group: this rank's pipeline-parallel group (TP collectives happen inside the
            model, on its own groups).
    """

    def __init__(self, model, vocab_size: int, eos_id: int, max_sequence_length: int,
                 pp_group: dist.ProcessGroup):
        self.model = model
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.max_sequence_length = max_sequence_length
        self.pp_group = pp_group
        pp_ranks = dist.get_process_group_ranks(pp_group)
        stage = pp_ranks.index(dist.get_rank())
        self.is_first_stage = stage == 0
        self.is_last_stage = stage == len(pp_ranks) - 1
        self.prev_rank = None if self.is_first_stage else pp_ranks[stage - 1]
        self.next_rank = None if self.is_last_stage else pp_ranks[stage + 1]
        self.last_rank = pp_ranks[-1]
        config = model.config
        self.hidden_size = config.hidden_size
        self.pipeline_dtype = config.pipeline_dtype or config.params_dtype
        self.device = current_device()

    # ------------------------------------------------------------------ one forward

    def _forward(self, tokens: torch.Tensor, start: int,
                 context: StaticInferenceContext) -> torch.Tensor | None:
        """Run ``tokens`` [b, n] (positions ``start..start+n-1``) through this stage.

        Returns the float32 log-probabilities [b, vocab] of the token after the last
        position on the last stage, None elsewhere. Advances the cache offset by n.
        """
        batch, length = tokens.shape
        positions = torch.arange(start, start + length, device=self.device).expand(batch, -1)
        # The prefill needs a causal mask; later single-token steps attend to the whole
        # cache and Megatron's attention switches to no mask itself.
        mask = (block_causal_attention_mask(torch.zeros_like(tokens)) if start == 0 else None)
        if not self.is_first_stage:
            hidden = torch.empty(length, batch, self.hidden_size, dtype=self.pipeline_dtype,
                                 device=self.device)  # [n, b, h]
            dist.recv(hidden, src=self.prev_rank, group=self.pp_group)
            self.model.set_input_tensor(hidden)
        # Megatron's inference path all-gathers the vocab-parallel logits over TP itself.
        output = self.model(tokens, positions, mask, inference_context=context,
                            runtime_gather_output=True)
        context.increment_sequence_len_offset(length)
        if not self.is_last_stage:
            dist.send(output.contiguous(), dst=self.next_rank, group=self.pp_group)
            return None
        logits = output[:, -1, : self.vocab_size].float()  # [b, v]: the last position only
        return torch.log_softmax(logits, dim=-1)

    def _from_last_stage(self, tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """``tensor`` of the last stage, broadcast over the pipeline group (``like`` gives
        the shape and dtype elsewhere)."""
        if self.is_last_stage:
            tensor = tensor.contiguous()
        else:
            tensor = torch.empty_like(like)
        if dist.get_world_size(self.pp_group) > 1:
            dist.broadcast(tensor, src=self.last_rank, group=self.pp_group)
        return tensor

    def _check_length(self, longest_prompt: int, max_new_tokens: int) -> int:
        total = longest_prompt + max_new_tokens
        if total > self.max_sequence_length:
            raise ValueError(
                f"a prompt of {longest_prompt} tokens + --max-new-tokens {max_new_tokens} = "
                f"{total} exceeds the model's {self.max_sequence_length} positions; lower "
                "--max-new-tokens or shorten the prompt")
        return total

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], params: SamplingParams,
               seeds: list[int]) -> list[Generation]:
        """One response per prompt (a prompt repeated K times gives K samples).

        Collective over the model replica's TP and PP groups; every rank returns the
        same generations.
        """
        batch = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        total = self._check_length(int(lengths.max()), params.max_new_tokens)
        ends = lengths + params.max_new_tokens  # [b] one past each row's last position
        tokens = torch.full((batch, total), self.eos_id, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt, device=self.device)
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        # Per row: [sum log-prob, sum entropy, generated count], kept on the last stage.
        stats = torch.zeros(batch, 3, device=self.device)
        token_log_probs = torch.zeros(batch, total, device=self.device)  # at each token's position
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        context = StaticInferenceContext(batch, total)
        start, position = 0, int(lengths.min())
        while position < total and not bool(done.all()):
            log_probs = self._forward(tokens[:, start:position], start, context)
            generating = (position >= lengths) & ~done  # [b] rows past their prompt
            chosen = None
            if self.is_last_stage:
                # Only generating rows draw: a row's stream must not depend on how many
                # steps it spent taking its own prompt tokens in this batch.
                rows = generating.nonzero().flatten().tolist()
                chosen = torch.zeros(batch, dtype=torch.long, device=self.device)
                if rows:
                    chosen[rows] = choose_tokens(log_probs[rows], params,
                                                 [generators[row] for row in rows])
                picked = log_probs.gather(-1, chosen[:, None]).squeeze(-1)
                stats += generating[:, None] * torch.stack(
                    [picked, _entropy(log_probs), torch.ones_like(picked)], dim=-1)
                token_log_probs[:, position] = torch.where(generating, picked, 0.0)
            chosen = self._from_last_stage(chosen, like=lengths)
            tokens[:, position] = torch.where(generating, chosen, tokens[:, position])
            done |= generating & ((chosen == self.eos_id) | (position + 1 >= ends))
            start, position = position, position + 1
        stats = self._from_last_stage(stats if self.is_last_stage else None, like=stats)
        token_log_probs = self._from_last_stage(
            token_log_probs if self.is_last_stage else None, like=token_log_probs)
        return [self._generation(tokens[row, int(lengths[row]):], stats[row],
                                 token_log_probs[row, int(lengths[row]):])
                for row in range(batch)]

    def _generation(self, generated: torch.Tensor, stats: torch.Tensor,
                    token_log_probs: torch.Tensor) -> Generation:
        """The response from a row's tokens after its prompt (EOS-padded), its stats and the
        log-probs at those positions."""
        count = int(stats[2])
        response = generated[:count].tolist()
        finished = bool(response) and response[-1] == self.eos_id
        return Generation(tokens=response[:-1] if finished else response, finished=finished,
                          log_prob=float(stats[0]), entropy=float(stats[1]) / max(count, 1),
                          token_log_probs=token_log_probs[:count].tolist())

    # ------------------------------------------------------------------ beam search

    @torch.no_grad()
    def beam_search(self, prompt: list[int], beam_size: int, max_new_tokens: int,
                    length_penalty: float = 1.0) -> Generation:
        """The best response by beam search; a hypothesis scores log-prob / length**penalty.

        A hypothesis ends at EOS when the EOS is among the ``beam_size`` best candidates of
        its step. The search stops when ``beam_size`` hypotheses have ended and no live beam
        scores better than the worst of them, or at the token budget, where the live beams
        compete too. Collective like :meth:`sample`; every rank returns the same result.
        """
        if beam_size < 1:
            raise ValueError(f"--beam-size {beam_size} must be >= 1")
        total = self._check_length(len(prompt), max_new_tokens)
        context = StaticInferenceContext(beam_size, total)
        tokens = torch.tensor([prompt] * beam_size, device=self.device)  # [B, n]
        # Only beam 0 is live at first: its copies would fill the beam with one hypothesis.
        scores = torch.full((beam_size,), -math.inf, dtype=torch.float64, device=self.device)
        scores[0] = 0.0
        entropy_sums = torch.zeros(beam_size, dtype=torch.float64, device=self.device)
        ended: list[tuple[float, Generation]] = []
        start, length = 0, 0
        for length in range(1, max_new_tokens + 1):
            log_probs = self._forward(tokens[:, start:], start, context)
            start = tokens.shape[1]
            candidates = None
            if self.is_last_stage:
                totals = (scores[:, None] + log_probs.double()).flatten()  # [B * v]
                top_scores, top = torch.topk(totals, 2 * beam_size)
                beams = top // self.vocab_size
                candidates = torch.stack([beams.double(), (top % self.vocab_size).double(),
                                          top_scores, (entropy_sums + _entropy(log_probs))[beams]])
            like = torch.empty(4, 2 * beam_size, dtype=torch.float64, device=self.device)
            # [4, 2B] rows: source beam, token, score, entropy sum; best candidate first.
            candidates = self._from_last_stage(candidates, like=like)
            live = []
            for rank, (beam, word, score, entropy) in enumerate(candidates.T.tolist()):
                if score == -math.inf or len(live) == beam_size:
                    break
                if int(word) != self.eos_id:
                    live.append(rank)
                elif rank < beam_size:
                    response = tokens[int(beam), len(prompt):].tolist()
                    ended.append((score / length ** length_penalty,
                                  Generation(response, True, score, entropy / length)))
            if not live:  # every candidate ended
                scores.fill_(-math.inf)
                break
            # Too few live candidates (tiny vocabularies): repeat the last as dead beams.
            live += [live[-1]] * (beam_size - len(live))
            chosen = candidates[:, live]
            order = chosen[0].long()
            scores = chosen[2].clone()
            scores[len(set(live)):] = -math.inf
            entropy_sums = chosen[3]
            context.swap_key_value_dict(order)  # the cache follows its beams
            tokens = torch.cat([tokens[order], chosen[1].long()[:, None]], dim=1)
            if len(ended) >= beam_size:
                worst_ended = sorted(score for score, _ in ended)[-beam_size]
                if float(scores[0]) / length ** length_penalty <= worst_ended:
                    break
        running = [(float(scores[b]) / length ** length_penalty,
                    Generation(tokens[b, len(prompt):].tolist(), False, float(scores[b]),
                               float(entropy_sums[b]) / length))
                   for b in range(beam_size) if scores[b] > -math.inf]
        return max(ended + running, key=lambda pair: pair[0])[1]
