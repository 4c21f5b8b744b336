"""What ``megatron-irl eval`` does (``commands/eval.py``): sample from a checkpoint at each
decoding setting, score the samples, measure diversity, write the report.

For every decoding setting (each temperature; each beam size) every prompt gets
``--samples`` samples (one for greedy and beam search). Data-parallel replicas split the
prompts; the writing rank gathers them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from megatron_irl.evaluation.options import EvalOptions


def _seed(base: int, prompt_index: int, sample: int) -> int:
    """A sample's own seed: the same (prompt, sample) draws the same response whatever the
    batch or data-parallel split."""
    return (base * 1_000_003 + prompt_index * 1_009 + sample) % (2**63)


def _settings(options: EvalOptions):
    from megatron_irl.evaluation.report import Decoding

    return ([Decoding(temperature=t) for t in options.temperature]
            + [Decoding(beam_size=b) for b in options.beam_size])


def _generate(session, generator, prompts, decoding, options: EvalOptions, progress) -> list[dict]:
    """This replica's samples of one setting, as ``samples.jsonl`` records."""
    from megatron_irl.evaluation.metrics import extract_answer
    from megatron_irl.inference.generation import SamplingParams

    per_prompt = options.samples if decoding.temperature not in (None, 0) else 1
    rows = [(index, k) for index, _ in session.shard(prompts) for k in range(per_prompt)]
    results = []
    for start in range(0, len(rows), options.micro_batch_size):
        batch = rows[start:start + options.micro_batch_size]
        if decoding.beam_size is not None:
            generations = [generator.beam_search(prompts[i].prompt_tokens, decoding.beam_size,
                                                 options.max_new_tokens, options.length_penalty)
                           for i, _ in batch]
        else:
            params = SamplingParams(decoding.temperature, options.top_k, options.top_p,
                                    options.max_new_tokens)
            generations = generator.sample([prompts[i].prompt_tokens for i, _ in batch], params,
                                           [_seed(options.seed, i, k) for i, k in batch])
        for (index, k), generation in zip(batch, generations):
            prompt = prompts[index]
            response = session.tokenizer.decode(generation.tokens)
            results.append({
                "line": prompt.line, "setting": decoding.name, "sample": k,
                "prompt": prompt.prompt, "response": response, "reference": prompt.reference,
                "answer": prompt.answer,
                "predicted_answer": extract_answer(response, options.answer_pattern),
                "num_tokens": len(generation.tokens) + generation.finished,
                "finished": generation.finished, "log_prob": generation.log_prob,
                "entropy": generation.entropy,
            })
        progress.update(len(batch))
    return results


def _write_outputs(options: EvalOptions, session, settings: list[dict], samples: list[dict],
                   data_report) -> None:
    from megatron_irl.evaluation.plots import plot_score_vs_self_bleu
    from megatron_irl.evaluation.report import format_table, task_score_name, tradeoff_points

    os.makedirs(options.output_dir, exist_ok=True)
    with open(os.path.join(options.output_dir, "samples.jsonl"), "w", encoding="utf-8") as out:
        for sample in samples:
            sample["score"] = float(sample["predicted_answer"] == sample["answer"]) \
                if sample["answer"] is not None else None
            out.write(json.dumps(sample) + "\n")
    report = {
        "checkpoint": options.load, "iteration": session.iteration, "data": options.data,
        "num_prompts": len({s["line"] for s in samples}),
        "data_problems": data_report.problem_counts,
        "top_k": options.top_k, "top_p": options.top_p,
        "max_new_tokens": options.max_new_tokens, "seed": options.seed,
        "task_score": task_score_name(settings), "settings": settings,
    }
    with open(os.path.join(options.output_dir, "report.json"), "w", encoding="utf-8") as out:
        json.dump(report, out, indent=2)
    points = tradeoff_points(report, os.path.basename(os.path.normpath(options.load)))
    if points:
        plot_score_vs_self_bleu(points, os.path.join(options.output_dir, "tradeoff.png"))
    print(format_table(settings), flush=True)
    print(f"wrote {options.output_dir}/report.json, samples.jsonl"
          + (", tradeoff.png" if points else ""), flush=True)


def evaluate(options: EvalOptions) -> None:
    """Sample every decoding setting of ``options``, score the samples, and (on the writing
    rank) write report.json, samples.jsonl and tradeoff.png to ``options.output_dir``."""
    from megatron_irl.evaluation.inputs import read_eval_prompts, response_budget
    from megatron_irl.evaluation.report import score_setting
    from megatron_irl.evaluation.session import inference_session
    from megatron_irl.inference.generation import Generator
    from tqdm import tqdm

    def read_inputs(tokenizer):
        return read_eval_prompts(options.data, tokenizer, options.limit, options.answer_pattern)

    with inference_session(options, read_inputs) as session:
        prompts, data_report = session.inputs
        model_cfg = session.config.model
        options = dataclasses.replace(options, max_new_tokens=response_budget(
            prompts, options.data, model_cfg.max_position_embeddings, options.max_new_tokens))
        generator = Generator(session.model, session.config.model.vocab_size,
                              session.tokenizer.eos_id, model_cfg.max_position_embeddings,
                              session.pipeline_group)
        settings, samples = [], []
        show_bar = session.is_writer and (options.progress_bar == "on" or (
            options.progress_bar == "auto" and sys.stderr.isatty()))
        for decoding in _settings(options):
            with tqdm(desc=decoding.name, unit="sample", dynamic_ncols=True,
                      disable=not show_bar) as progress:
                local = _generate(session, generator, prompts, decoding, options, progress)
            gathered = session.gather(local)
            if session.is_writer:
                gathered.sort(key=lambda s: (s["line"], s["sample"]))
                settings.append({"name": decoding.name, **decoding.as_dict(),
                                 "samples_per_prompt": max(s["sample"] for s in gathered) + 1,
                                 "metrics": score_setting(gathered, options.answer_pattern)})
                samples += gathered
        if session.is_writer:
            _write_outputs(options, session, settings, samples, data_report)
