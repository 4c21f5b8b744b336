"""``megatron-irl eval`` and ``megatron-irl rewards`` as users run them (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VALID = REPO / "examples" / "data" / "valid.jsonl"
# The bundled data's answers are the last word of the response ("... is 38." -> 38).
EVAL_FLAGS = ["--data", str(VALID), "--limit", "4", "--samples", "3", "--max-new-tokens", "6",
              "--answer-pattern", r"(\S+?)\.?$", "--progress-bar", "off"]


def _run(command: str, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([*launcher, "-m", "megatron_irl", command, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _samples(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    result = _run("eval", "--load", tiny_checkpoint, *EVAL_FLAGS,
                  "--temperature", "0", "1.0", "--beam-size", "2", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_eval_reports_every_setting_of_the_sweep(evaluated):
    report = json.loads((evaluated / "report.json").read_text())
    assert [s["name"] for s in report["settings"]] == ["greedy", "T=1", "beam=2"]
    assert [s["samples_per_prompt"] for s in report["settings"]] == [1, 3, 1]
    sampled = report["settings"][1]["metrics"]
    assert 0 <= sampled["self_bleu"] <= 100 and sampled["entropy"] > 0
    assert report["settings"][0]["metrics"]["self_bleu"] is None
    assert report["task_score"] == "exact_match" and report["num_prompts"] == 4


def test_eval_writes_every_sample_and_the_tradeoff_plot(evaluated):
    samples = _samples(evaluated)
    assert len(samples) == 4 * (1 + 3 + 1)
    assert {"prompt", "response", "reference", "answer", "score", "log_prob"} <= set(samples[0])
    assert (evaluated / "tradeoff.png").read_bytes().startswith(b"\x89PNG")


def test_eval_split_over_two_data_parallel_ranks_draws_the_same_samples(evaluated,
                                                                          tiny_checkpoint,
                                                                          tmp_path):
    result = _run("eval", "--load", tiny_checkpoint, *EVAL_FLAGS,
                  "--temperature", "1.0", "--output-dir", str(tmp_path), nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    single = [(s["line"], s["sample"], s["response"]) for s in _samples(evaluated)
              if s["setting"] == "T=1"]
    assert [(s["line"], s["sample"], s["response"]) for s in _samples(tmp_path)] == single


def test_rewards_reads_eval_samples_and_writes_returns_and_the_correlation(evaluated,
                                                                          tiny_checkpoint,
                                                                          tmp_path):
    output = tmp_path / "rewards.jsonl"
    result = _run("rewards", "--load", tiny_checkpoint, "--data",
                  str(evaluated / "samples.jsonl"), "--output", str(output))
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == len(_samples(evaluated))
    assert all(r["return"] == pytest.approx(sum(r["rewards"]), abs=1e-4) for r in lines)
    summary = json.loads((tmp_path / "rewards.summary.json").read_text())
    assert summary["num_records"] == len(lines)
    per_setting = summary["spearman_vs_score"]
    assert sorted(per_setting) == ["T=1", "beam=2", "greedy"]
    assert per_setting["T=1"]["num_samples"] == 4 * 3 and per_setting["T=1"]["num_prompts"] == 4
    for entry in per_setting.values():
        assert set(entry["across_prompts"]) == {"return", "log_prob", "value_initial"}
    assert {r["setting"] for r in lines} == {"greedy", "T=1", "beam=2"}
    assert [r["finished"] for r in lines] == [s["finished"] for s in _samples(evaluated)]
    assert (tmp_path / "rewards.return_vs_score.png").exists()


def test_malformed_eval_data_is_an_error_naming_its_line(tiny_checkpoint, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Q: 1+1?\\nA:", "response": " 2"}\n{"prompt": 3}\n')
    result = _run("eval", "--load", tiny_checkpoint, "--data", str(data),
                  "--output-dir", str(tmp_path))
    assert result.returncode == 1
    assert f"{data}:2" in result.stderr


def test_a_score_missing_from_some_records_is_an_error_naming_its_line(tiny_checkpoint,
                                                                       tmp_path):
    data = tmp_path / "scored.jsonl"
    data.write_text('{"prompt": "a", "response": " b", "score": 1}\n'
                    '{"prompt": "c", "response": " d"}\n')
    result = _run("rewards", "--load", tiny_checkpoint, "--data", str(data),
                  "--output", str(tmp_path / "r.jsonl"))
    assert result.returncode == 1
    assert f"{data}:2" in result.stderr and "'score'" in result.stderr


@pytest.mark.parametrize("flags, named", [
    (["--samples", "0"], "--samples"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature"], "--temperature"),
])
def test_eval_rejects_a_bad_flag_naming_it(flags, named, capsys):
    from megatron_irl.commands.eval import main

    assert main(["--load", "x", "--data", "y", *flags]) == 2
    assert named in capsys.readouterr().err


def test_plot_tradeoff_combines_the_reports_of_several_runs(evaluated, tmp_path):
    report = str(evaluated / "report.json")
    output = tmp_path / "runs.png"
    result = subprocess.run([sys.executable, "tools/plot_tradeoff.py", report, report,
                             "--labels", "MLE", "IQ-Learn", "--output", str(output)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 points" in result.stdout and output.read_bytes().startswith(b"\x89PNG")


def test_eval_default_response_length_fits_the_checkpoints_positions(tiny_checkpoint, tmp_path):
    result = _run("eval", "--load", tiny_checkpoint, "--data", str(VALID),
                  "--limit", "1", "--temperature", "0", "--progress-bar", "off",
                  "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    from helpers import tiny_tokenizer

    from megatron_irl.evaluation.inputs import read_eval_prompts

    report = json.loads((tmp_path / "report.json").read_text())
    (prompt,), _ = read_eval_prompts(str(VALID), tiny_tokenizer(), limit=1)
    assert report["max_new_tokens"] == 128 - len(prompt.prompt_tokens)  # the tiny model's 128


def test_prompt_longer_than_the_model_names_its_line(tiny_checkpoint, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text('{"prompt": "Q: 1+1?\\nA:", "response": " 2"}\n'
                    + json.dumps({"prompt": "Q: " + "1+" * 200 + "1?\\nA:", "response": " 2"})
                    + "\n")
    result = _run("eval", "--load", tiny_checkpoint, "--data", str(data),
                  "--output-dir", str(tmp_path))
    assert result.returncode == 1
    assert f"{data}:2: the prompt has" in result.stderr
    assert "exceeds the model's 128 positions" in result.stderr


def test_ckpt_step_without_that_checkpoint_names_the_usable_one(tiny_checkpoint, tmp_path):
    result = _run("eval", "--load", tiny_checkpoint, "--data", str(VALID),
                  "--ckpt-step", "5", "--output-dir", str(tmp_path))
    assert result.returncode == 1
    assert ("(iteration 5, chosen by --ckpt-step 5) is unusable: the directory does not exist; "
            "the newest usable checkpoint is iteration 0" in result.stderr)
