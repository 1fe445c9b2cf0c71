"""A throwaway single-node SLURM cluster for tests: munged, slurmctld and slurmd on this machine.

Everything (key, sockets, state, spool, logs, slurm.conf) lives in one folder; client
commands find the cluster through SLURM_CONF, and through a link at the default path,
/etc/slurm/slurm.conf, because the SLURM plugin's job step drops SLURM_* variables
before its srun. A machine that already has that file is left alone (no test cluster). The node is declared as a
small GPU
node (16 CPUs, 128 GB, one GPU; slurmd's config_overrides lets the declared size stand on
a smaller machine) so the SLURM profile's requests schedule as on a site's GPU node.
The GPU is a GRES entry backed by /dev/null: SLURM counts and allocates it, and the
training scripts, finding no CUDA, run on the CPU.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")


class ClusterUnavailable(Exception):
    """SLURM cannot run here; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60.0):
        missing = [tool for tool in DAEMONS + CLIENTS if not shutil.which(tool)]
        if missing:
            raise ClusterUnavailable(f"not installed: {', '.join(missing)} (Debian packages slurm-wlm and munge)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("slurmd must run as root to start jobs")
        if DEFAULT_CONF.exists() or DEFAULT_CONF.is_symlink():
            raise ClusterUnavailable(f"{DEFAULT_CONF} exists: this machine has a SLURM setup of its own")
        root = self.root
        for name in ("state", "spool", "log"):
            (root / name).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.run("munged", "--force", f"--key-file={key}", f"--socket={root / 'munge.sock'}",
                 f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'log/munged.log'}",
                 f"--seed-file={root / 'munge.seed'}")
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(SLURM_CONF.format(root=root, host=host, ctld_port=free_port(), d_port=free_port()))
        (root / "gres.conf").write_text("Name=gpu File=/dev/null\n")
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.symlink_to(self.conf)
        self.run("slurmctld", "-f", str(self.conf))
        self.run("slurmd", "-f", str(self.conf))
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                return self
            time.sleep(0.5)
        raise ClusterUnavailable(f"the node did not become idle in {timeout:.0f} s (state {state.strip()!r}); "
                                 f"slurmctld log:\n{self.log_tail('slurmctld')}\n"
                                 f"slurmd log:\n{self.log_tail('slurmd')}")

    def run(self, *cmd):
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-1000:]}")
        return done.stdout

    def log_tail(self, daemon: str, lines: int = 20) -> str:
        path = self.root / f"log/{daemon}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(none)"

    def stop(self):
        """Cancel every job, then stop the daemons (slurmd, slurmctld, munged) and wait for them:
        those that started (a start that fails part way, or on a machine without SLURM, is
        stopped too)."""
        if (self.root / "slurmctld.pid").exists():
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True)
        for daemon in reversed(DAEMONS):
            pid_file = self.root / f"{daemon}.pid"
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        if DEFAULT_CONF.is_symlink() and DEFAULT_CONF.resolve() == self.conf.resolve():
            DEFAULT_CONF.unlink()


SLURM_CONF = """\
ClusterName=zhlmtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
GresTypes=gpu
# squeue answers for finished jobs this long (the profile's status command is squeue).
MinJobAge=600
KillWait=30
ReturnToService=2
NodeName={host} CPUs=16 RealMemory=128000 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
