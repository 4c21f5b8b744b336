"""The training log: console line, progress bar, TensorBoard scalars and the metrics file."""

import json
import re

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_irl.config import LoggingConfig
from megatron_irl.training.logger import TrainingLogger

SCALARS = {"lr": 1e-3, "loss": 2.5, "nll": 2.0, "td_squared": 5.0, "reward": -1.0,
           "grad_norm": 0.7, "lambda": 0.1}


def _log_two_steps(cfg: LoggingConfig, is_logging_rank: bool = True) -> None:
    with TrainingLogger(cfg, train_iters=4, is_logging_rank=is_logging_rank) as log:
        log.begin(start_iteration=2)
        log.log_step(3, SCALARS, tokens_per_second=1000.0)
        log.log_step(4, {**SCALARS, "loss": 2.0}, tokens_per_second=1000.0)
        log.log_eval(4, {"loss": 1.5, "nll": 1.4, "td_squared": 1.0})


def test_console_line_shows_the_terms_every_log_interval(capsys):
    _log_two_steps(LoggingConfig(log_interval=2, progress_bar="off"))
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith("iteration")]) == 1  # only step 4
    line = next(line for line in lines if line.startswith("iteration"))
    for text in ("iteration      4/4", "lr 1.000e-03", "loss 2.0000", "mle 2.0000",
                 "td^2 5.0000", "reward -1.0000", "grad norm 0.700", "tokens/s 1,000", "eta"):
        assert text in line
    assert any(line.startswith("validation at iteration 4 | loss 1.5000") for line in lines)


def test_tensorboard_gets_every_step_scalar(tmp_path):
    _log_two_steps(LoggingConfig(tensorboard_dir=str(tmp_path), progress_bar="off"))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [2.5, 2.0]
    assert [e.step for e in events.Scalars("train/td_squared")] == [3, 4]
    assert events.Scalars("valid/loss")[0].value == 1.5


def test_metrics_file_holds_one_json_line_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log_two_steps(LoggingConfig(metrics_file=str(path), progress_bar="off"))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["split"], r["iteration"]) for r in records] == [
        ("train", 3), ("train", 4), ("valid", 4)]
    assert records[1]["lambda"] == 0.1


def test_progress_bar_starts_at_the_resumed_iteration(capsys):
    _log_two_steps(LoggingConfig(progress_bar="on"))  # resumes at 2, logs steps 3 and 4
    counts = re.findall(r"(\d+)/4", capsys.readouterr().err)  # every rendering of the bar
    # Drawn first before any step of this run, at the resumed iteration (not 0/4), and
    # finished at the last step (a bar started at 0 would end at 2/4).
    assert counts[0] == "2" and counts[-1] == "4", counts


def test_only_the_logging_rank_writes(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _log_two_steps(LoggingConfig(metrics_file=str(path), tensorboard_dir=str(tmp_path / "tb"),
                                 progress_bar="on"), is_logging_rank=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not path.exists() and not (tmp_path / "tb").exists()


def test_metrics_file_directory_is_created(tmp_path):
    path = tmp_path / "new" / "dir" / "metrics.jsonl"
    _log_two_steps(LoggingConfig(metrics_file=str(path), progress_bar="off"))
    assert len(path.read_text().splitlines()) == 3
