"""Compare fine-tuning methods from one pre-trained model: fine-tune, select, evaluate, report
(docs/method.md, section 6; docs/results.md).

    python tools/run_experiment.py --config examples/arithmetic/experiment.yaml [--reduced]

The experiment file names a pre-training config, a fine-tuning config, the methods (each a
list of training flags on top of the fine-tuning config and ``finetune_flags``), the seeds
and the evaluation. Steps, each skipped when its output already exists (re-running resumes
an experiment):
  1. pre-train once (plain MLE) unless the checkpoint is there (``pretrain_dir``, default
     ``<output_dir>/pretrain``: experiments that name the same directory share it);
  2. fine-tune every method with every seed from that checkpoint (``--finetune``: the
     same initial weights, the same data, the same number of steps; the seed sets the data
     order and dropout);
  3. with a ``selection`` section: score every saved checkpoint of the run greedily on that
     section's data (a validation split, never the test split) and keep the best (ties: the
     earliest); without one, the last checkpoint;
  4. ``megatron-irl eval`` that checkpoint on the test data (accuracy, Self-BLEU, distinct
     correct responses per prompt, entropy at each temperature and beam size) and
     ``megatron-irl rewards`` on its samples, once per discount in ``eval.reward_gammas``
     (null: the run's own; Spearman correlations with correctness of the return, of log pi
     and of V(s_0), per decoding setting, within and across prompts);
  5. write ``results.md`` (mean +- standard error over seeds: validation curves, test
     metrics, the score gap to the first method at matched diversity, reward correlations),
     ``tradeoff.png`` and ``validation.png`` to the output directory, and export the first
     method's first seed (its evaluated checkpoint) to Hugging Face format (``export_hf:
     false`` skips it, for models ``convert to-hf`` has no family for).
``--reduced`` uses the file's ``reduced`` section (fewer methods, seeds or prompts;
``overfit-5pct.yaml``'s is the README's demo). Every command runs as a subprocess with its
log under the output directory; ``--jobs N`` runs N (method, seed) runs at once, each with
OMP_NUM_THREADS = cores / N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_irl.core.checkpoint_files import saved_iterations  # noqa: E402
from megatron_irl.evaluation.plots import (  # noqa: E402
    TradeoffPoint, plot_curves, plot_score_vs_self_bleu)
from megatron_irl.evaluation.report import tradeoff_points  # noqa: E402
from megatron_irl.evaluation.study_tables import (  # noqa: E402
    matched_diversity_table, rewards_table, test_split_table, validation_table)


def _run(command: list[str], log_path: str, threads: int | None = None) -> None:
    """Run one step; its output goes to ``log_path``; a failure stops the experiment.
    ``threads``: the step's OMP_NUM_THREADS (default: inherited)."""
    started = time.monotonic()
    print(f"$ {' '.join(command)}", flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        with open(log_path, encoding="utf-8") as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"step failed (exit {result.returncode}), log {log_path}:\n{tail}")
    print(f"  done in {time.monotonic() - started:.0f} s: {log_path}", flush=True)


def _megatron_irl(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_irl", *command.split(), *args]


def _finished(checkpoint_dir: str) -> bool:
    return os.path.exists(os.path.join(checkpoint_dir, "latest_checkpointed_iteration.txt"))


def _arguments(flags: list) -> list[str]:
    """A YAML list of flags as command-line arguments (YAML reads numbers as numbers)."""
    return [str(flag) for flag in flags]


def _read_json(path: str):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _plan(config: dict, reduced: bool) -> dict:
    """The experiment's settings, with the ``reduced`` section applied."""
    plan = {key: config[key] for key in ("pretrain", "finetune", "methods", "seeds", "eval")}
    plan["methods"] = {name: _arguments(flags) for name, flags in plan["methods"].items()}
    plan["finetune_flags"] = _arguments(config.get("finetune_flags", []))
    plan["selection"] = config.get("selection")
    plan["export_hf"] = config.get("export_hf", True)
    if not isinstance(plan["export_hf"], bool):
        raise SystemExit(f"export_hf: expected true or false, got {plan['export_hf']!r}")
    if reduced:
        section = config.get("reduced", {})
        unknown = set(section.get("methods", [])) - set(plan["methods"])
        if unknown:
            raise SystemExit(f"reduced.methods: {sorted(unknown)} not in the methods section "
                             f"{sorted(plan['methods'])}")
        plan["methods"] = {name: plan["methods"][name]
                           for name in section.get("methods", plan["methods"])}
        plan["seeds"] = section.get("seeds", plan["seeds"])
        plan["eval"] = {**plan["eval"], **section.get("eval", {})}
        plan["pretrain_flags"] = _arguments(section.get("pretrain_flags", []))
        plan["finetune_flags"] += _arguments(section.get("finetune_flags", []))
        if plan["selection"] is not None:
            plan["selection"] = {**plan["selection"], **section.get("selection", {})}
    return plan


def _select_checkpoint(selection: dict, run_dir: str, checkpoints: str, threads: int | None,
                       seed: int) -> tuple[int, dict[int, float]]:
    """The saved iteration with the best greedy score on ``selection['data']`` (ties: the
    earliest), and every saved iteration's score."""
    scores = {}
    for step in sorted(saved_iterations(checkpoints)):
        out = os.path.join(run_dir, "selection", f"iter_{step:07d}")
        if not os.path.exists(os.path.join(out, "report.json")):
            _run(_megatron_irl("eval", "--load", checkpoints, "--ckpt-step", str(step),
                               "--data", selection["data"], "--limit", str(selection["limit"]),
                               "--temperature", "0",
                               "--max-new-tokens", str(selection["max_new_tokens"]),
                               "--seed", str(seed), "--output-dir", out, "--progress-bar", "off"),
                 os.path.join(run_dir, f"selection_{step}.log"), threads)
        scores[step] = _read_json(os.path.join(out, "report.json"))["settings"][0]["metrics"][
            "exact_match"]
    best = max(scores.values())
    return min(step for step, score in scores.items() if score == best), scores


def _reward_analyses(ev: dict, run_dir: str, checkpoints: str, step: int, samples: str,
                     threads: int | None) -> dict:
    """``megatron-irl rewards`` of ``samples`` per discount: {"own" | "gamma=<g>": summary}."""
    analyses = {}
    for gamma in ev.get("reward_gammas", [None]):
        label = "own" if gamma is None else f"gamma={gamma:g}"
        output = os.path.join(run_dir, f"rewards_{label.replace('=', '')}.jsonl")
        summary = output[:-len(".jsonl")] + ".summary.json"
        if not os.path.exists(summary):
            _run(_megatron_irl("rewards", "--load", checkpoints, "--ckpt-step", str(step),
                               "--data", samples, "--output", output, "--progress-bar", "off",
                               *(["--gamma", str(gamma)] if gamma is not None else [])),
                 os.path.join(run_dir, f"rewards_{label.replace('=', '')}.log"), threads)
        analyses[label] = _read_json(summary).get("spearman_vs_score", {})
    return analyses


def _fine_tune_and_evaluate(plan: dict, out: str, pretrained: str, threads: int | None,
                            method: str, flags: list, seed: int) -> dict:
    """One (method, seed) run: its selection, test report, reward analyses, validation NLL."""
    run_dir = os.path.join(out, method.replace(" ", "_"), f"seed{seed}")
    checkpoints = os.path.join(run_dir, "checkpoints")
    metrics_file = os.path.join(run_dir, "metrics.jsonl")
    os.makedirs(run_dir, exist_ok=True)
    if not _finished(checkpoints):
        if os.path.exists(metrics_file):
            os.remove(metrics_file)
        _run(_megatron_irl("train", "--config", plan["finetune"], "--load", pretrained,
                           "--finetune", "--seed", str(seed), "--data-seed", str(seed),
                           "--save", checkpoints, "--metrics-file", metrics_file,
                           "--tensorboard-dir", os.path.join(run_dir, "tensorboard"),
                           "--progress-bar", "off", *plan["finetune_flags"], *flags),
             os.path.join(run_dir, "train.log"), threads)
    if plan["selection"] is not None:
        step, selection = _select_checkpoint(plan["selection"], run_dir, checkpoints, threads,
                                             seed)
    else:
        step, selection = saved_iterations(checkpoints)[0], {}
    ev = plan["eval"]
    eval_dir = os.path.join(run_dir, "eval")
    if not os.path.exists(os.path.join(eval_dir, "report.json")):
        _run(_megatron_irl("eval", "--load", checkpoints, "--ckpt-step", str(step),
                           "--data", ev["data"], "--limit", str(ev["limit"]),
                           "--samples", str(ev["samples"]),
                           "--temperature", *map(str, ev["temperatures"]),
                           *(["--beam-size", *map(str, ev["beam_sizes"])]
                             if ev.get("beam_sizes") else []),
                           "--max-new-tokens", str(ev["max_new_tokens"]),
                           "--seed", str(seed), "--output-dir", eval_dir,
                           "--progress-bar", "off"),
             os.path.join(run_dir, "eval.log"), threads)
    with open(metrics_file, encoding="utf-8") as file:
        valid = [json.loads(line) for line in file if '"split": "valid"' in line]
    return {"report": _read_json(os.path.join(eval_dir, "report.json")),
            "rewards": _reward_analyses(ev, run_dir, checkpoints, step,
                                        os.path.join(eval_dir, "samples.jsonl"), threads),
            "selected_step": step, "selection": selection,
            "valid_nll": {record["iteration"]: record["nll"] for record in valid}}


def _tradeoff_points(results: dict) -> list[TradeoffPoint]:
    """Mean (over seeds) score and Self-BLEU of each method's sampled settings."""
    points = []
    for method, runs in results.items():
        per_seed = [tradeoff_points(run["report"], method) for run in runs]
        for setting in zip(*per_seed):  # one sampled setting, every seed
            points.append(TradeoffPoint(
                method, sum(p.score for p in setting) / len(runs),
                sum(p.self_bleu for p in setting) / len(runs),
                temperature=setting[0].temperature))
    return points


def _mean_curve(runs: list, key: str) -> list[tuple[float, float]]:
    steps = sorted(set.intersection(*(set(run[key]) for run in runs)))
    return [(step, sum(run[key][step] for run in runs) / len(runs)) for step in steps]


def _write_report(args, plan: dict, results: dict, out: str) -> str:
    ev = plan["eval"]
    sections = [f"# Results: {os.path.basename(args.config)}"
                f"{' (reduced)' if args.reduced else ''}\n",
                f"Seeds {plan['seeds']}; {ev['limit']} test prompts x {ev['samples']} samples "
                f"per temperature; mean ± standard error over seeds.\n"]
    if plan["selection"] is not None:
        sections.append(validation_table(results, plan["selection"]))
    sections += [test_split_table(results), matched_diversity_table(results),
                 rewards_table(results)]
    text = "\n".join(sections)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as file:
        file.write(text)
    plot_score_vs_self_bleu(_tradeoff_points(results), os.path.join(out, "tradeoff.png"),
                            score_label="accuracy (exact match)")
    panels = {"valid NLL": {m: _mean_curve(runs, "valid_nll") for m, runs in results.items()}}
    if plan["selection"] is not None:
        panels["valid greedy accuracy"] = {m: _mean_curve(runs, "selection")
                                           for m, runs in results.items()}
    plot_curves(panels, os.path.join(out, "validation.png"), xlabel="iteration")
    return text


def _export_first_run(plan: dict, results: dict, out: str) -> str:
    """Export the first method's first seed, at its evaluated checkpoint, to Hugging Face
    format; returns the directory."""
    first_method = next(iter(plan["methods"]))
    hf_dir = os.path.join(out, "hf", first_method.replace(" ", "_"))
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        _run(_megatron_irl("convert to-hf", "--load",
                           os.path.join(out, first_method.replace(" ", "_"),
                                        f"seed{plan['seeds'][0]}", "checkpoints"),
                           "--ckpt-step", str(results[first_method][0]["selected_step"]),
                           "--output", hf_dir),
             os.path.join(out, "convert_to_hf.log"))
    return hf_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--output-dir", default=None, help="default: the file's output_dir")
    parser.add_argument("--reduced", action="store_true", help="the quick demo version")
    parser.add_argument("--jobs", type=int, default=1,
                        help="(method, seed) runs at once, each with cores/jobs threads")
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                        help="run and report these methods of the file only (the first is "
                             "the baseline of the matched-diversity table)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    with open(args.config, encoding="utf-8") as file:
        config = yaml.safe_load(file)
    plan = _plan(config, args.reduced)
    if args.methods is not None:
        unknown = set(args.methods) - set(plan["methods"])
        if unknown:
            parser.error(f"--methods: {sorted(unknown)} not in {args.config}'s methods "
                         f"{sorted(plan['methods'])}")
        plan["methods"] = {name: plan["methods"][name] for name in args.methods}
    out = args.output_dir or config["output_dir"] + ("_reduced" if args.reduced else "")
    os.makedirs(out, exist_ok=True)
    started = time.monotonic()

    pretrain_dir = config.get("pretrain_dir", os.path.join(out, "pretrain"))
    pretrained = os.path.join(pretrain_dir, "checkpoints")
    if not _finished(pretrained):
        os.makedirs(pretrain_dir, exist_ok=True)
        _run(_megatron_irl("train", "--config", plan["pretrain"], "--save", pretrained,
                           "--progress-bar", "off", *plan.get("pretrain_flags", [])),
             os.path.join(pretrain_dir, "train.log"))
    runs = [(method, flags, seed) for method, flags in plan["methods"].items()
            for seed in plan["seeds"]]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        outcomes = pool.map(lambda run: _fine_tune_and_evaluate(plan, out, pretrained, threads,
                                                                *run), runs)
        results = {}
        for (method, _, _), outcome in zip(runs, outcomes):
            results.setdefault(method, []).append(outcome)

    text = _write_report(args, plan, results, out)
    written = [f"{out}/results.md", f"{out}/tradeoff.png", f"{out}/validation.png"]
    if plan["export_hf"]:
        written.append(_export_first_run(plan, results, out))
    print(f"\n{text}\nwrote {', '.join(written)} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
