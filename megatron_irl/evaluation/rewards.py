"""What ``megatron-irl rewards`` does (``commands/rewards.py``): per-token rewards and
returns of (prompt, response) records under a checkpoint (``reward_extraction.py``), their
rank correlations with the records' task score (``reward_analysis.py``), written out.
"""

from __future__ import annotations

import json
import os

from megatron_irl.evaluation.options import RewardsOptions


def _output_stem(output: str) -> str:
    return output[: -len(".jsonl")] if output.endswith(".jsonl") else output


def _write_outputs(options: RewardsOptions, gamma: float, pairs, extracted,
                   data_report) -> None:
    from megatron_irl.evaluation.plots import plot_return_vs_score
    from megatron_irl.evaluation.reward_analysis import format_correlations, rank_correlations

    os.makedirs(os.path.dirname(os.path.abspath(options.output)), exist_ok=True)
    with open(options.output, "w", encoding="utf-8") as out:
        for pair, result in zip(pairs, extracted):
            out.write(json.dumps({
                "line": pair.line, "rewards": result.rewards, "return": result.sequence_return,
                "value_initial": result.value_initial, "log_prob": result.log_prob,
                "score": pair.score, "finished": pair.finished, "setting": pair.setting,
            }) + "\n")
    summary = {"checkpoint": options.load, "data": options.data, "gamma": gamma,
               "num_records": len(pairs), "data_problems": data_report.problem_counts}
    scores = [pair.score for pair in pairs]
    written = [options.output]
    if pairs and all(score is not None for score in scores):
        returns = [result.sequence_return for result in extracted]
        correlations = rank_correlations([
            {"setting": pair.setting, "prompt": pair.prompt, "score": pair.score,
             "return": result.sequence_return, "log_prob": result.log_prob,
             "value_initial": result.value_initial}
            for pair, result in zip(pairs, extracted)])
        summary["spearman_vs_score"] = correlations
        plot_path = _output_stem(options.output) + ".return_vs_score.png"
        plot_return_vs_score(returns, scores, plot_path)  # all samples, pooled
        written.append(plot_path)
        print(format_correlations(correlations), flush=True)
    summary_path = _output_stem(options.output) + ".summary.json"
    with open(summary_path, "w", encoding="utf-8") as out:
        json.dump(summary, out, indent=2)
    print("wrote " + ", ".join(written + [summary_path]), flush=True)


def extract_and_analyse(options: RewardsOptions) -> None:
    """Per-token rewards of every record of ``options.data``; (on the writing rank) the
    output JSONL, the summary with the rank correlations, and the scatter plot."""
    from megatron_irl.evaluation.inputs import read_scored_pairs
    from megatron_irl.evaluation.reward_extraction import extract_rewards
    from megatron_irl.evaluation.session import inference_session

    def read_inputs(tokenizer):
        return read_scored_pairs(options.data, tokenizer, options.score_field, options.limit)

    with inference_session(options, read_inputs) as session:
        pairs, data_report = session.inputs
        gamma = session.config.irl.irl_gamma if options.gamma is None else options.gamma
        local = session.shard(pairs)
        extracted = extract_rewards(session.model, [pair for _, pair in local], gamma,
                                    options.micro_batch_size, session.tokenizer.pad_id)
        gathered = session.gather(list(zip((i for i, _ in local), extracted or [])))
        if session.is_writer:
            gathered.sort(key=lambda item: item[0])
            _write_outputs(options, gamma, [pairs[i] for i, _ in gathered],
                           [result for _, result in gathered], data_report)
