"""Start a training script: one process, torchrun on this machine, or torchrun on every node of a SLURM job.

    python -m zhlm.train.launch --nproc-per-node N [--nodes M] SCRIPT [ARGS...]

One process runs the script directly. More processes on one node run
`torchrun --standalone`. Several nodes need a SLURM allocation of that many nodes:
srun starts one torchrun per node, and they meet at the job's first node (c10d
rendezvous). The launcher replaces itself with the command (exec), so SIGTERM from
SLURM reaches torchrun or the script, whose training loop checkpoints on it.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

RENDEZVOUS_PORT = 29500


def slurm_nodes(job_id: str) -> list[str]:
    """Host names of a SLURM job's nodes, the first one first (asks scontrol)."""
    info = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id],
                          capture_output=True, text=True, check=True).stdout
    match = re.search(r"\bNodeList=(\S+)", info)
    if not match or match.group(1) == "(null)":
        raise SystemExit(f"SLURM job {job_id} has no nodes yet: {info.strip()[:200]}")
    hosts = subprocess.run(["scontrol", "show", "hostnames", match.group(1)],
                           capture_output=True, text=True, check=True).stdout
    return hosts.split()


def command(script_args: list[str], nproc: int, nodes: int = 1, env=os.environ) -> list[str]:
    """The argv that runs `script_args` as nodes × nproc training processes."""
    if nodes == 1 and nproc == 1:
        return [sys.executable, *script_args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nodes == 1:
        return [*torchrun, "--standalone", *script_args]
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise SystemExit(f"{nodes} nodes need a SLURM job (SLURM_JOB_ID is not set): run the workflow "
                         "with --workflow-profile profiles/slurm, or set nodes: 1")
    hosts = slurm_nodes(job_id)
    if len(hosts) != nodes:
        raise SystemExit(f"the config asks for {nodes} nodes but SLURM job {job_id} has {len(hosts)}: {hosts}")
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            *torchrun, f"--nnodes={nodes}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={hosts[0]}:{RENDEZVOUS_PORT}", f"--rdzv-id={job_id}", *script_args]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script and its arguments")
    args = parser.parse_args(argv)
    if not args.script_args:
        parser.error("no script given")
    argv = command(args.script_args, args.nproc_per_node, args.nodes)
    print("launch:", " ".join(argv), file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
