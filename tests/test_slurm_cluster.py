"""On a machine without SLURM, the SLURM tests are skipped, saying why, instead of erroring."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import CLIENTS, DAEMONS, ClusterUnavailable, SlurmCluster

REPO = Path(__file__).resolve().parents[1]


def test_a_cluster_that_cannot_start_says_why_and_stops_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no SLURM tool is found
    cluster = SlurmCluster(tmp_path / "slurm")
    with pytest.raises(ClusterUnavailable, match="not installed: " + ", ".join(DAEMONS + CLIENTS)):
        cluster.start()
    cluster.stop()  # stops nothing, and needs no SLURM tool to do it


def test_the_slurm_tests_are_skipped_with_the_reason_where_slurm_is_not_installed(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path / "nothing")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests/test_workflow.py", "-k", "slurm_profile_runs_every_job"],
                         env=env, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 skipped" in run.stdout and "SLURM cannot start on this machine" in run.stdout, run.stdout[-3000:]
    assert "not installed: munged" in run.stdout, run.stdout[-3000:]
