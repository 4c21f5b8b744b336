"""MLE vs IQ-Learn from one pre-trained model: fine-tune, evaluate, compare (docs/method.md,
section 6).

    python tools/run_experiment.py --config examples/arithmetic/experiment.yaml [--reduced]

The experiment file names a pre-training config, a fine-tuning config, the methods (each a
list of training flags on top of the fine-tuning config), the seeds and the evaluation.
Steps, each skipped when its output already exists (re-running resumes an experiment):
  1. pre-train once (plain MLE) unless the checkpoint is there;
  2. fine-tune every method with every seed from that checkpoint (``--finetune``: the
     same initial weights, the same data, the same number of steps; the seed sets the data
     order and dropout);
  3. ``megatron-irl eval`` each fine-tuned model (accuracy, Self-BLEU, distinct correct
     responses per prompt, entropy at each temperature) and ``megatron-irl rewards`` on its
     samples (Spearman correlations with correctness of the return, of log pi and of V(s_0), per
     temperature, within and across prompts);
  4. write ``results.md`` (mean +- standard error over seeds) and ``tradeoff.png`` to the
     output directory, and export the first method's first seed to Hugging Face format.
``--reduced`` uses the file's ``reduced`` section (fewer methods, seeds and prompts): the
README's demo. Every command runs as a subprocess with its log under the output directory;
``--jobs N`` runs N (method, seed) runs at once, each with OMP_NUM_THREADS = cores / N.
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

from megatron_irl.evaluation.metrics import mean_and_stderr  # noqa: E402
from megatron_irl.evaluation.plots import TradeoffPoint, plot_score_vs_self_bleu  # noqa: E402

METRICS = ("exact_match", "self_bleu", "distinct_correct", "entropy")


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
    return [sys.executable, "-m", "megatron_irl.cli", command, *args]


def _finished(checkpoint_dir: str) -> bool:
    return os.path.exists(os.path.join(checkpoint_dir, "latest_checkpointed_iteration.txt"))


def _arguments(flags: list) -> list[str]:
    """A YAML list of flags as command-line arguments (YAML reads numbers as numbers)."""
    return [str(flag) for flag in flags]


def _plan(config: dict, reduced: bool) -> dict:
    """The experiment's settings, with the ``reduced`` section applied."""
    plan = {key: config[key] for key in ("pretrain", "finetune", "methods", "seeds", "eval")}
    plan["methods"] = {name: _arguments(flags) for name, flags in plan["methods"].items()}
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
        plan["finetune_flags"] = _arguments(section.get("finetune_flags", []))
    return plan


def _fine_tune_and_evaluate(plan: dict, out: str, pretrained: str, threads: int | None,
                            method: str, flags: list, seed: int) -> dict:
    """One (method, seed) run: its eval report, rewards summary and final validation NLL."""
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
                           "--progress-bar", "off", *plan.get("finetune_flags", []), *flags),
             os.path.join(run_dir, "train.log"), threads)
    ev = plan["eval"]
    eval_dir = os.path.join(run_dir, "eval")
    if not os.path.exists(os.path.join(eval_dir, "report.json")):
        _run(_megatron_irl("eval", "--load", checkpoints, "--data", ev["data"],
                           "--limit", str(ev["limit"]), "--samples", str(ev["samples"]),
                           "--temperature", *map(str, ev["temperatures"]),
                           "--max-new-tokens", str(ev["max_new_tokens"]),
                           "--seed", str(seed), "--output-dir", eval_dir,
                           "--progress-bar", "off"),
             os.path.join(run_dir, "eval.log"), threads)
    rewards = os.path.join(run_dir, "rewards.jsonl")
    if not os.path.exists(os.path.join(run_dir, "rewards.summary.json")):
        _run(_megatron_irl("rewards", "--load", checkpoints, "--data",
                           os.path.join(eval_dir, "samples.jsonl"), "--output", rewards,
                           "--progress-bar", "off"),
             os.path.join(run_dir, "rewards.log"), threads)
    with open(os.path.join(eval_dir, "report.json"), encoding="utf-8") as file:
        report = json.load(file)
    with open(os.path.join(run_dir, "rewards.summary.json"), encoding="utf-8") as file:
        summary = json.load(file)
    with open(metrics_file, encoding="utf-8") as file:
        valid = [json.loads(line) for line in file if '"split": "valid"' in line]
    return {"report": report, "spearman": summary.get("spearman_vs_score", {}),
            "valid_nll": valid[-1]["nll"] if valid else None}


def _cell(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, stderr = mean_and_stderr(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {stderr:.3f}"


def _correlation_cell(correlations: list[dict], kind: str, count: int) -> str:
    """``return / log pi (/ V(s_0))`` Spearman of one kind, each over the seeds."""
    names = ("return", "log_prob", "value_initial")[:count]
    return " / ".join(_cell([c.get(kind, {}).get(name) for c in correlations])
                      for name in names)


def _results_table(results: dict, temperatures: list) -> tuple[str, list[TradeoffPoint]]:
    """Markdown table (mean ± standard error over seeds) and the per-method trade-off points."""
    header = ("| method | T | accuracy | Self-BLEU | distinct correct | entropy | "
              "Spearman within prompt: return / log pi | "
              "Spearman across prompts: return / log pi / V(s_0) | valid NLL |\n"
              "|---|---|---|---|---|---|---|---|---|")
    rows, points = [header], []
    for method, runs in results.items():
        for temperature in temperatures:
            settings = [next(s for s in run["report"]["settings"]
                             if s.get("temperature") == temperature) for run in runs]
            per_seed = [setting["metrics"] for setting in settings]
            cells = [_cell([m[name] for m in per_seed]) for name in METRICS]
            # The reward analysis of this setting's samples only (temperature moves both the
            # score and the return, so pooling settings would confound them).
            correlations = [run["spearman"].get(setting["name"], {})
                            for run, setting in zip(runs, settings)]
            rows.append(f"| {method} | {temperature:g} | " + " | ".join(cells)
                        + f" | {_correlation_cell(correlations, 'within_prompt', 2)}"
                        + f" | {_correlation_cell(correlations, 'across_prompts', 3)}"
                        + f" | {_cell([r['valid_nll'] for r in runs])} |")
            scores = [m["exact_match"] for m in per_seed]
            self_bleus = [m["self_bleu"] for m in per_seed]
            if all(v is not None for v in self_bleus):
                points.append(TradeoffPoint(method, mean_and_stderr(scores)[0],
                                            mean_and_stderr(self_bleus)[0],
                                            temperature=temperature))
    return "\n".join(rows), points


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--output-dir", default=None, help="default: the file's output_dir")
    parser.add_argument("--reduced", action="store_true", help="the quick demo version")
    parser.add_argument("--jobs", type=int, default=1,
                        help="(method, seed) runs at once, each with cores/jobs threads")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    with open(args.config, encoding="utf-8") as file:
        config = yaml.safe_load(file)
    plan = _plan(config, args.reduced)
    out = args.output_dir or config["output_dir"] + ("_reduced" if args.reduced else "")
    os.makedirs(out, exist_ok=True)
    started = time.monotonic()

    pretrained = os.path.join(out, "pretrain", "checkpoints")
    if not _finished(pretrained):
        os.makedirs(os.path.dirname(pretrained), exist_ok=True)
        _run(_megatron_irl("train", "--config", plan["pretrain"], "--save", pretrained,
                           "--progress-bar", "off", *plan.get("pretrain_flags", [])),
             os.path.join(out, "pretrain", "train.log"))
    runs = [(method, flags, seed) for method, flags in plan["methods"].items()
            for seed in plan["seeds"]]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        outcomes = pool.map(lambda run: _fine_tune_and_evaluate(plan, out, pretrained, threads,
                                                                *run), runs)
        results = {}
        for (method, _, _), outcome in zip(runs, outcomes):
            results.setdefault(method, []).append(outcome)

    table, points = _results_table(results, plan["eval"]["temperatures"])
    ev = plan["eval"]
    text = (f"# Results: {os.path.basename(args.config)}{' (reduced)' if args.reduced else ''}"
            f"\n\nSeeds {plan['seeds']}; {ev['limit']} test prompts x {ev['samples']} samples "
            f"each; mean ± standard error over seeds.\n\n{table}\n")
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as file:
        file.write(text)
    plot_score_vs_self_bleu(points, os.path.join(out, "tradeoff.png"),
                            score_label="accuracy (exact match)")
    first_method = next(iter(plan["methods"]))
    hf_dir = os.path.join(out, "hf", first_method.replace(" ", "_"))
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        _run([sys.executable, "tools/convert_to_hf.py", "--load",
              os.path.join(out, first_method.replace(" ", "_"), f"seed{plan['seeds'][0]}",
                           "checkpoints"), "--output", hf_dir],
             os.path.join(out, "convert_to_hf.log"))
    print(f"\n{text}\nwrote {out}/results.md, {out}/tradeoff.png, {hf_dir} "
          f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
