"""bench/gpu_check.sh --smoke: the GPU check's every part at tiny sizes on this CPU.

The GPU run (one lent H100, ``docs/benchmarks.md``) cannot happen here; the smoke run takes the
same code paths (loss check against the reference, loss timing, the trainer's steps with the
three objectives, the FP8 gate, the table) so that the script does not rot between GPU runs.
One run serves every test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PART_FILES = ("env.json", "loss.json", "train_bf16.json", "train_fp8.json", "gpu_path.json",
              "results.json", "table.md")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    return out, result


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_smoke_run_succeeds_and_writes_every_part(smoke_run):
    out, result = smoke_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(path.name for path in out.iterdir()) == sorted(PART_FILES)


def test_loss_check_passes_against_the_float64_reference(smoke_run):
    reference = _results(smoke_run[0])["loss"]["reference"]
    assert reference["passed"], reference["errors"]
    assert set(reference["errors"]) == {"loss", "nll", "delta", "value", "grad", "megatron_nll"}


def test_training_times_every_objective_for_the_requested_rounds(smoke_run):
    train = _results(smoke_run[0])["train_bf16"]
    for name in ("mle", "irl", "mle_megatron"):
        assert train["objectives"][name]["steps"] == 2  # --repeats 2 of the smoke flags
        assert len(train["objectives"][name]["losses"]) == 3  # and the warm-up step
    assert train["matmul_parameters"] > 0 and train["model_flops_per_step"] > 0


def test_fp8_part_says_why_it_was_skipped(smoke_run):
    assert "Transformer Engine" in _results(smoke_run[0])["train_fp8"]["skipped"]


def test_table_has_a_row_for_each_target(smoke_run):
    table = (smoke_run[0] / "table.md").read_text()
    for row in ("loss vs float64 reference", "loss fwd+bwd bfloat16", "train bf16: irl",
                "train bf16: step time IRL / MLE", "train fp8 |"):
        assert row in table, f"no '{row}' row in\n{table}"


def test_table_reports_a_part_that_did_not_finish_instead_of_failing(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rows = gpu_check.table_rows(tmp_path)  # no part's JSON is there
    assert [row[3] for row in rows] == ["error", "error", "error", "error"]  # + gpu-path
    assert "loss.json missing" in rows[0][1]


def test_gpu_path_part_checks_placement_and_says_why_te_checks_were_skipped(smoke_run):
    gpu_path = _results(smoke_run[0])["gpu_path"]
    assert gpu_path["placement"]["passed"], gpu_path["placement"]
    assert set(gpu_path["fusions"]) == {"local", "transformer_engine"}
    for name in ("checkpoints", "thd"):  # Transformer Engine cannot run on this CPU
        assert "Transformer Engine" in gpu_path[name]["skipped"]
    assert set(gpu_path["fp8_recipes"]) == {"delayed", "tensorwise", "blockwise", "mxfp8"}
