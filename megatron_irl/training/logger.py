"""Progress output: a console line every ``--log-interval`` steps, a progress bar on a
terminal, and the same scalars in TensorBoard and (``--metrics-file``) a JSONL file. Only the
logging rank (the last one, which holds the loss) writes anything.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from megatron_irl.config import LoggingConfig


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


# Console columns shown when the step has the scalar: (name, label, format).
_LOSS_COLUMNS = (("td_squared", "td^2", ".4f"), ("reward", "reward", "+.4f"),
                 ("disc_accuracy", "disc acc", ".3f"))
# --irl-loss online / gail: seconds spent sampling (0 on steps that reuse samples) and updating.
_SAMPLING_COLUMNS = (("sample_seconds", "sample s", ".2f"), ("update_seconds", "update s", ".2f"))


def _columns(scalars: dict[str, float], columns) -> str:
    return "".join(f"| {label} {scalars[name]:{spec}} " for name, label, spec in columns
                   if name in scalars)


class TrainingLogger:
    def __init__(self, cfg: LoggingConfig, train_iters: int, is_logging_rank: bool):
        self.cfg = cfg
        self.train_iters = train_iters
        self.enabled = is_logging_rank
        self.start_iteration = 0
        self.start_time = time.monotonic()
        self.progress_bar = None
        self.tensorboard = None
        self.metrics_file = None
        if self.enabled and cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=cfg.tensorboard_dir)
        if self.enabled and cfg.metrics_file:
            os.makedirs(os.path.dirname(cfg.metrics_file) or ".", exist_ok=True)  # as --save
            self.metrics_file = open(cfg.metrics_file, "a", encoding="utf-8")

    def begin(self, start_iteration: int) -> None:
        """Training starts (or resumes) at ``start_iteration``: timing and the bar start here."""
        self.start_iteration = start_iteration
        self.start_time = time.monotonic()
        bar = self.cfg.progress_bar
        if self.enabled and (bar == "on" or (bar == "auto" and sys.stderr.isatty())):
            from tqdm import tqdm

            self.progress_bar = tqdm(total=self.train_iters, initial=start_iteration, unit="it",
                                     dynamic_ncols=True)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress_bar is not None:
            self.progress_bar.write(message)
        else:
            print(message, flush=True)

    def log_step(self, iteration: int, scalars: dict[str, float], tokens_per_second: float) -> None:
        """``iteration`` counts completed steps; ``scalars`` include lr, loss, ... grad_norm."""
        if not self.enabled:
            return
        if self.progress_bar is not None:
            self.progress_bar.update(1)
            self.progress_bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{name}", value, iteration)
            self.tensorboard.add_scalar("train/tokens_per_second", tokens_per_second, iteration)
        self._write_metrics("train", iteration, scalars)
        if iteration % self.cfg.log_interval == 0 or iteration == self.train_iters:
            elapsed = time.monotonic() - self.start_time
            done = iteration - self.start_iteration
            eta = elapsed / max(done, 1) * (self.train_iters - iteration)
            self.info(
                f"iteration {iteration:>6d}/{self.train_iters} | lr {scalars['lr']:.3e} "
                f"| loss {scalars['loss']:.4f} | mle {scalars['nll']:.4f} "
                + _columns(scalars, _LOSS_COLUMNS)
                + f"| grad norm {scalars['grad_norm']:.3f} "
                + (f"| loss scale {scalars['loss_scale']:.1f} | skipped "
                   f"{scalars['skipped']:.0f} " if "loss_scale" in scalars else "")
                + (f"| non-finite steps {scalars['nonfinite_steps']:.0f} "
                   if scalars.get("nonfinite_steps") else "")
                + _columns(scalars, _SAMPLING_COLUMNS)
                + f"| tokens/s {tokens_per_second:,.0f} "
                f"| elapsed {_format_duration(elapsed)} | eta {_format_duration(eta)}"
            )

    def log_eval(self, iteration: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(f"valid/{name}", value, iteration)
        self._write_metrics("valid", iteration, scalars)
        self.info(
            f"validation at iteration {iteration} | loss {scalars['loss']:.4f} "
            f"| mle {scalars['nll']:.4f} | td^2 {scalars['td_squared']:.4f}"
        )

    def _write_metrics(self, split: str, iteration: int, scalars: dict[str, float]) -> None:
        if self.metrics_file is not None:
            record = {"split": split, "iteration": iteration, **scalars}
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def close(self) -> None:
        if self.progress_bar is not None:
            self.progress_bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.metrics_file is not None:
            self.metrics_file.close()

    def __enter__(self) -> "TrainingLogger":
        return self

    def __exit__(self, *exc_info: Optional[object]) -> None:
        self.close()
