"""README.md's snakemake commands run exactly as printed, and `snakemake --lint` is clean.

Each command runs as a dry run (`-n` after `snakemake`) in a fresh copy of the repository's
files (`git ls-files`: no results/ or .snakemake/ of an earlier run), offline: HF_ENDPOINT
and every proxy point at a closed port on 127.0.0.1. The SLURM tools on PATH are stubs that
record being called and fail, as on a machine whose cluster is down, so the SLURM command's
dry run shows that it needs no cluster.
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from project_files import copy_tree

REPO = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there
OFFLINE = {"HF_ENDPOINT": CLOSED, "http_proxy": CLOSED, "https_proxy": CLOSED, "all_proxy": CLOSED,
           "HTTP_PROXY": CLOSED, "HTTPS_PROXY": CLOSED, "ALL_PROXY": CLOSED, "no_proxy": "", "NO_PROXY": ""}
SLURM_TOOLS = ("sbatch", "srun", "salloc", "sinfo", "squeue", "sacct", "scontrol", "scancel")
# snakemake-executor-plugin-slurm asks for MinJobAge when it is loaded, for its --help text
# (which every snakemake run does), and takes a failure as "unknown".
HARMLESS_CALLS = {"scontrol show config"}
SHELL_FENCES = ("", "bash", "sh", "shell", "console")


def readme_commands(text: str) -> list[str]:
    """The lines of the README's shell code blocks that start with `snakemake `, without a trailing comment."""
    commands, fence, pending = [], None, ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            continue
        if fence not in SHELL_FENCES:
            continue
        line = pending + stripped
        if line.endswith("\\"):  # a command continued on the next line
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("snakemake "):
            commands.append(shlex.join(shlex.split(line, comments=True)))
    return commands


COMMANDS = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))


def offline_env(tree: Path, stubs: Path) -> dict:
    """os.environ offline, with this Python's snakemake first on PATH after the SLURM stubs,
    and zhlm imported from the copy."""
    stubs.mkdir()
    calls = stubs / "calls.log"
    for tool in SLURM_TOOLS:
        stub = stubs / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexit 1\n')
        stub.chmod(0o755)
    path = os.pathsep.join([str(stubs), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(filter(None, [str(tree / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **OFFLINE, "PATH": path, "PYTHONPATH": pythonpath}


def test_readme_has_the_snakemake_commands():
    assert len(COMMANDS) >= 3, COMMANDS
    assert any("--workflow-profile profiles/slurm" in c for c in COMMANDS), COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_printed(command, tmp_path):
    tree = copy_tree(tmp_path / "tree")
    env = offline_env(tree, tmp_path / "stubs")
    argv = shlex.split(command)
    argv.insert(1, "-n")
    run = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{shlex.join(argv)} failed:\n{output[-5000:]}"
    assert "This was a dry-run" in output or "Nothing to be done" in output, output[-5000:]
    calls = tmp_path / "stubs/calls.log"
    called = set(calls.read_text().splitlines()) if calls.exists() else set()
    assert not called - HARMLESS_CALLS, f"the dry run called SLURM: {called}"
    assert not (tree / "results").exists()  # a dry run makes nothing


def test_snakemake_lint_is_clean(tmp_path):
    tree = copy_tree(tmp_path / "tree")
    env = offline_env(tree, tmp_path / "stubs")
    run = subprocess.run(["snakemake", "--lint"], cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "Congratulations" in output, output[-5000:]
