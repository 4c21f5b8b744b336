"""A real one-node Slurm cluster on this machine, for tests of the batch scripts in slurm/.

``LocalSlurmCluster`` installs Debian's ``slurm-wlm`` and ``munge`` with apt when they are
missing, writes a ``slurm.conf`` for this host (its CPUs; state, spool, pid and log files in a
temporary directory), starts ``munged`` (as the munge user, on its own socket), ``slurmctld``
and ``slurmd`` on free ports, and waits until the node is idle. ``stop()`` cancels what is
left in the queue, stops exactly the daemons it started (by the PIDs in their pid files) and
deletes the directory. Nothing is written outside it: clients find the cluster through
``SLURM_CONF`` in ``cluster.env``, which sbatch passes on to the jobs.

Needs root (munged as another user, slurmd). ``ClusterUnavailable`` says why it cannot start.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

SLURM_COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
MUNGE_COMMANDS = ("munged", "munge", "unmunge")
# A requeued job waits this long before it may start again (AuthInfo's cred_expire;
# Slurm's default is 120 s). It is also the lifetime of a step's launch credential, so not
# much less on a busy machine.
REQUEUE_DELAY_S = 10


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; the message says why."""


def ensure_apt_packages(packages: dict[str, tuple[str, ...]]) -> None:
    """Install each Debian package (name -> commands it provides) whose commands are missing.

    Raises ClusterUnavailable when a command is still missing afterwards.
    """
    missing = [name for name, commands in packages.items()
               if not all(shutil.which(command) for command in commands)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable(f"{' '.join(missing)} missing and cannot apt-get install "
                                 "them (needs root on Debian)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", *missing]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _real_memory_mb() -> int:
    with open("/proc/meminfo", encoding="utf-8") as meminfo:
        total_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    return total_kb // 1024 // 2  # below what slurmd measures, or the node is marked invalid


def _read_pid(path: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(path, encoding="utf-8") as pid_file:
                return int(pid_file.read().strip())
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)
    raise ClusterUnavailable(f"no pid file {path} after {timeout_s:.0f} s")


def _is_running(pid: int) -> bool:
    """Alive and not a zombie (a daemon's parent, init here, may be slow to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class LocalSlurmCluster:
    """One node named after this host, all its CPUs, partition ``debug``."""

    def __init__(self):
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.root = ""
        self.env: dict[str, str] = {}
        self._daemons: list[tuple[str, int]] = []  # (name, pid), in start order

    def start(self, timeout_s: float = 60.0) -> None:
        if os.geteuid() != 0:
            raise ClusterUnavailable("starting munged and slurmd needs root")
        ensure_apt_packages({"slurm-wlm": SLURM_COMMANDS, "munge": MUNGE_COMMANDS})
        self.root = tempfile.mkdtemp(prefix="slurm-test-")
        os.chmod(self.root, 0o755)  # the munge user must reach its directory inside
        try:
            self._start_munged()
            conf = self._write_config()
            self.env = {**os.environ, "SLURM_CONF": conf}
            self._start_daemon("slurmctld", ["slurmctld", "-f", conf], "slurmctld.pid")
            self._start_daemon("slurmd", ["slurmd", "-f", conf], "slurmd.pid")
            self._wait_for_idle_node(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start_munged(self) -> None:
        munge_user = pwd.getpwnam("munge")
        munge_dir = os.path.join(self.root, "munge")
        os.mkdir(munge_dir)
        os.chmod(munge_dir, 0o755)  # munged requires others to reach its socket
        os.chown(munge_dir, munge_user.pw_uid, munge_user.pw_gid)
        self.munge_socket = os.path.join(munge_dir, "munge.socket")
        result = subprocess.run(
            ["munged", f"--socket={self.munge_socket}", f"--pid-file={munge_dir}/munged.pid",
             f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"],
            user=munge_user.pw_uid, group=munge_user.pw_gid, capture_output=True, text=True)
        if result.returncode != 0:
            raise ClusterUnavailable(f"munged failed to start: {result.stderr.strip()}")
        self._daemons.append(("munged", _read_pid(f"{munge_dir}/munged.pid", 10)))

    def _write_config(self) -> str:
        for name in ("state", "spool"):
            os.mkdir(os.path.join(self.root, name))
        path = os.path.join(self.root, "slurm.conf")
        with open(path, "w", encoding="utf-8") as conf:
            conf.write(f"""\
ClusterName=test
SlurmctldHost={self.node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={REQUEUE_DELAY_S}
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd.log
NodeName={self.node} CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        return path

    def _start_daemon(self, name: str, command: list[str], pid_file: str) -> None:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise ClusterUnavailable(f"{name} failed to start: {result.stderr.strip()}"
                                     f"{self._log_tail(name)}")
        self._daemons.append((name, _read_pid(os.path.join(self.root, pid_file), 10)))

    def _log_tail(self, name: str) -> str:
        try:
            with open(os.path.join(self.root, f"{name}.log"), encoding="utf-8") as log:
                return "\n" + log.read()[-2000:]
        except FileNotFoundError:
            return ""

    def _wait_for_idle_node(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "--noheader", "--format=%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"node {self.node} is {state!r}, not idle, after "
                                 f"{timeout_s:.0f} s{self._log_tail('slurmd')}")

    def run(self, *command: str, check: bool = True,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster (sbatch passes the environment,
        with ``extra_env``, on to the job)."""
        return subprocess.run(command, env={**self.env, **(extra_env or {})},
                              capture_output=True, text=True, check=check)

    def stop(self) -> None:
        """Cancel the jobs left, stop the daemons started here (newest first), delete the
        directory."""
        if any(name == "slurmctld" for name, _ in self._daemons):
            jobs = self.run("squeue", "--noheader", "--format=%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
        for name, pid in reversed(self._daemons):
            if _is_running(pid):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _is_running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _is_running(pid):
                os.kill(pid, signal.SIGKILL)
        self._daemons.clear()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""
