"""``tools/run_experiment.py`` end to end at a toy size: the pipeline of the README's demo
(examples/arithmetic/overfit-5pct.yaml --reduced)."""

from __future__ import annotations

import os
import shutil
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


def _write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The demo's experiment, reduced to 3 training steps per stage (checkpoints at 2 and 3,
    the better one on 3 validation prompts evaluated) and 3 test prompts."""
    tmp = tmp_path_factory.mktemp("experiment")
    config = yaml.safe_load(
        (REPO / "examples" / "arithmetic" / "overfit-5pct.yaml").read_text())
    config["output_dir"] = str(tmp / "out")
    config["pretrain_dir"] = str(tmp / "pretrain")
    config["finetune_flags"] += ["--save-interval", 2]  # the last of a repeated flag wins
    config["selection"] = {"data": "examples/arithmetic/valid.jsonl", "limit": 3,
                           "max_new_tokens": 8}
    config["reduced"].update(
        pretrain_flags=SHORT_RUN, finetune_flags=SHORT_RUN, selection={"limit": 3},
        eval={"limit": 3, "samples": 2, "temperatures": [0, 0.7, 1.0], "beam_sizes": [2],
              "max_new_tokens": 8, "reward_gammas": [None, 0.9]})
    path = _write_config(tmp / "experiment.yaml", config)
    result = _run_experiment(path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return path, result


def _table(out: Path, heading: str) -> list[list[str]]:
    """The rows of the first table after the ``## <heading>`` line of results.md."""
    text = (out / "results.md").read_text()
    lines = text[text.index(f"## {heading}"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_reduced_experiment_reports_every_method_at_every_decoding_setting(experiment):
    path, result = experiment
    rows = _table(path.parent / "out_reduced", "Test split")
    settings = ["greedy", "T=0.7", "T=1", "beam=2"]
    assert [(row[0], row[1]) for row in rows] == [
        (method, setting) for method in ("MLE", "IQ-Learn lambda=0.1") for setting in settings]
    for _, setting, accuracy, self_bleu, *_ in rows:
        assert 0.0 <= float(accuracy) <= 1.0
        # Greedy and beam search give one response per prompt: no Self-BLEU.
        assert (self_bleu == "-") == (setting in ("greedy", "beam=2"))
    assert "## Test split" in result.stdout  # the report is printed


def test_each_run_evaluates_its_best_saved_checkpoint_on_the_validation_split(experiment):
    path, _ = experiment
    out = path.parent / "out_reduced"
    rows = _table(out, "Checkpoint selection")
    assert [row[0] for row in rows] == ["MLE", "IQ-Learn lambda=0.1"]
    for method, selected, at_2, at_3 in rows:
        best = 2 if float(at_2) >= float(at_3) else 3  # one seed: cells are plain values
        assert float(selected) == best, method
    report = yaml.safe_load((out / "MLE" / "seed1" / "eval" / "report.json").read_text())
    assert report["iteration"] == int(float(rows[0][1]))


def test_rewards_are_analysed_per_discount_and_setting(experiment):
    rows = _table(experiment[0].parent / "out_reduced", "Extracted rewards")
    assert {(row[0], row[1]) for row in rows} == {
        (method, discount) for method in ("MLE", "IQ-Learn lambda=0.1")
        for discount in ("own", "gamma=0.9")}
    assert all(len(row[4].split(" / ")) == 3 for row in rows)


def test_matched_diversity_compares_each_method_with_the_first(experiment):
    rows = _table(experiment[0].parent / "out_reduced", "Accuracy at matched diversity")
    assert [row[0] for row in rows] == ["IQ-Learn lambda=0.1"]


def test_reduced_experiment_saves_the_plots_and_a_hugging_face_export(experiment):
    out = experiment[0].parent / "out_reduced"
    assert (out / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "validation.png").read_bytes().startswith(b"\x89PNG")
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(
        os.listdir(out / "hf" / "MLE"))


def test_rerunning_an_experiment_repeats_no_finished_step(experiment):
    path, _ = experiment
    result = _run_experiment(path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "$ " not in result.stdout  # every command line is printed when it runs
    assert (path.parent / "out_reduced" / "results.md").exists()


def test_export_hf_false_skips_the_hugging_face_export(experiment, tmp_path):
    path, _ = experiment
    config = yaml.safe_load(path.read_text())
    config.update(output_dir=str(tmp_path / "copy"), export_hf=False)
    shutil.copytree(path.parent / "out_reduced", tmp_path / "copy_reduced",
                    ignore=shutil.ignore_patterns("hf"))
    result = _run_experiment(_write_config(tmp_path / "experiment.yaml", config))
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (tmp_path / "copy_reduced" / "hf").exists()
    assert "convert" not in result.stdout


def test_export_hf_must_be_a_boolean(experiment, tmp_path):
    config = yaml.safe_load(experiment[0].read_text())
    config["export_hf"] = "no"
    result = _run_experiment(_write_config(tmp_path / "experiment.yaml", config))
    assert result.returncode != 0
    assert "export_hf: expected true or false, got 'no'" in result.stderr
