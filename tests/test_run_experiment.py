"""``tools/run_experiment.py`` end to end at a toy size: the pipeline of the README's demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHORT_RUN = ["--train-iters", "3", "--eval-interval", "3", "--eval-iters", "1",
             "--log-interval", "1", "--lr-warmup-iters", "1"]


def _run_experiment(config: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "tools/run_experiment.py", "--config", str(config),
                           "--reduced", "--jobs", "2"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The bundled arithmetic experiment, reduced to 3 training steps per stage and 3 prompts."""
    tmp = tmp_path_factory.mktemp("experiment")
    config = yaml.safe_load((REPO / "examples" / "arithmetic" / "experiment.yaml").read_text())
    config["output_dir"] = str(tmp / "out")
    config["reduced"].update(
        pretrain_flags=SHORT_RUN, finetune_flags=SHORT_RUN,
        eval={"limit": 3, "samples": 2, "temperatures": [0, 1.0], "max_new_tokens": 8})
    path = tmp / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _run_experiment(path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return path, result


def _results_rows(out: Path) -> list[list[str]]:
    lines = (out / "results.md").read_text().splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in lines if line.startswith("| ") and not line.startswith("| method")]


def test_reduced_experiment_reports_every_method_at_every_temperature(experiment):
    path, result = experiment
    out = path.parent / "out_reduced"
    rows = _results_rows(out)
    assert [(row[0], row[1]) for row in rows] == [
        ("MLE", "0"), ("MLE", "1"), ("IQ-Learn lambda=0.1", "0"), ("IQ-Learn lambda=0.1", "1")]
    for method, temperature, accuracy, self_bleu, *_, within, across, _nll in rows:
        assert 0.0 <= float(accuracy) <= 1.0
        # Greedy decoding gives one response per prompt: no Self-BLEU, no within-prompt ranks.
        assert (self_bleu == "-") == (temperature == "0")
        if temperature == "0":  # (sampled prompts may lack one too: equal scores)
            assert within == "- / -"
        assert len(across.split(" / ")) == 3
    assert "| method | T | accuracy | Self-BLEU" in result.stdout  # the table is printed


def test_reduced_experiment_saves_the_plot_and_a_hugging_face_export(experiment):
    out = experiment[0].parent / "out_reduced"
    assert (out / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(
        os.listdir(out / "hf" / "MLE"))


def test_rerunning_an_experiment_repeats_no_finished_step(experiment):
    path, _ = experiment
    result = _run_experiment(path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "$ " not in result.stdout  # every command line is printed when it runs
    assert (path.parent / "out_reduced" / "results.md").exists()
