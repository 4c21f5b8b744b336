"""The batch scripts in slurm/ on a real one-node Slurm cluster (tests/slurm_cluster.py).

The cluster needs root (CI runs as root and installs slurm-wlm, munge and shellcheck with apt);
elsewhere these tests skip with the reason, unless MEGATRON_IRL_REQUIRE_SLURM=1 makes that a
failure. Training runs the tiny CPU configuration with 2 ranks (gloo).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import ClusterUnavailable, LocalSlurmCluster, ensure_apt_packages

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "slurm" / "train.sbatch"
# Generous: on a busy 2-core machine one job takes minutes (imports dominate); quiet, < 1 min.
JOB_TIMEOUT_S = 600
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _unavailable(reason: str):
    if os.environ.get("MEGATRON_IRL_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = LocalSlurmCluster()
    try:
        cluster.start()
    except ClusterUnavailable as error:
        _unavailable(f"cannot start a local Slurm cluster: {error}")
    yield cluster
    cluster.stop()


def submit_training(cluster: LocalSlurmCluster, run_dir: Path, *train_flags: str) -> str:
    """sbatch slurm/train.sbatch with the tiny config on 2 tasks; returns the job id."""
    run_dir.mkdir(exist_ok=True)
    result = cluster.run(
        "sbatch", "--parsable", "--ntasks=2", f"--chdir={REPO}",
        f"--output={run_dir}/%x-%j.out",
        str(TRAIN_SCRIPT), "examples/tiny.yaml",
        "--save", str(run_dir / "checkpoints"), "--metrics-file", str(run_dir / "metrics.jsonl"),
        "--log-interval", "1", "--progress-bar", "off", "--tensorboard-dir", "",
        "--lr-warmup-iters", "2",
        *train_flags, check=False, extra_env={"PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_fields(cluster: LocalSlurmCluster, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    text = cluster.run("scontrol", "show", "job", "--oneliner", job_id).stdout
    return dict(word.split("=", 1) for word in text.split() if "=" in word)


def wait_for_end(cluster: LocalSlurmCluster, job_id: str,
                 timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = job_fields(cluster, job_id)
        if fields["JobState"] in FINAL_STATES:
            return fields
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout_s} s: {fields}")


def job_log(run_dir: Path, job_id: str) -> str:
    return (run_dir / f"megatron-irl-{job_id}.out").read_text()


def train_iterations(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [record["iteration"] for record in records if record["split"] == "train"]


def checkpoint_marker(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())


def test_training_job_completes_with_logged_loss_and_checkpoint(slurm_cluster, tmp_path):
    job_id = submit_training(slurm_cluster, tmp_path, "--train-iters", "6")
    fields = wait_for_end(slurm_cluster, job_id)
    log = job_log(tmp_path, job_id)

    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0",
                                                                             "0"), log
    assert re.search(r"iteration\s+6/6 \|.*\| loss \d+\.\d+", log), log
    assert train_iterations(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert checkpoint_marker(tmp_path) == 6
    assert (tmp_path / "checkpoints" / "iter_0000006").is_dir()


def test_preempted_job_saves_requeues_and_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    train_iters = 30
    job_id = submit_training(slurm_cluster, tmp_path, "--train-iters", str(train_iters))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(train_iterations(tmp_path)) < 2:
        assert time.monotonic() < deadline, job_fields(slurm_cluster, job_id)
        time.sleep(0.2)
    # What Slurm does before the time limit (--signal=B:USR1@...): signal the batch script.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    fields = wait_for_end(slurm_cluster, job_id)
    log = job_log(tmp_path, job_id)
    stopped_at = int(re.search(r"stopping at iteration (\d+) on a termination signal", log)[1])

    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "1"), log
    assert 2 <= stopped_at < train_iters
    assert f"resuming from {tmp_path}/checkpoints at iteration {stopped_at}" in log
    # The second run went on from the checkpoint: every step once, none repeated from 0.
    assert train_iterations(tmp_path) == list(range(1, train_iters + 1))
    assert checkpoint_marker(tmp_path) == train_iters


def test_failing_training_job_ends_failed_and_is_not_requeued(slurm_cluster, tmp_path):
    empty_dir = tmp_path / "no-checkpoint"
    empty_dir.mkdir()
    job_id = submit_training(slurm_cluster, tmp_path, "--train-iters", "6",
                             "--load", str(empty_dir))
    fields = wait_for_end(slurm_cluster, job_id)
    log = job_log(tmp_path, job_id)

    assert (fields["JobState"], fields["Restarts"]) == ("FAILED", "0"), log
    assert fields["ExitCode"] != "0:0"
    assert "megatron-irl train: error:" in log and "training failed with exit status" in log


def test_slurm_scripts_pass_shellcheck():
    try:
        ensure_apt_packages({"shellcheck": ("shellcheck",)})
    except ClusterUnavailable as error:
        _unavailable(str(error))
    scripts = sorted(str(path) for path in (REPO / "slurm").iterdir() if path.is_file())
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
