"""Work out how to launch pretraining, linear evaluation or fine-tuning on N GPUs, and launch it
(``make pretrain GPUS=N``, ``make linear-eval GPUS=N``, ``make finetune GPUS=N``).

    python -m byol_fast.launch --gpus 32 [--entry train|linear_eval|finetune] [--print] -- --config C.yaml ...

``--entry`` picks the module run, ``byol_fast.train`` (the default), ``byol_fast.linear_eval`` or
``byol_fast.finetune``; the arguments after ``--`` go to it. All three launch the same way:

- N <= 1: one process (``python -m byol_fast.<entry>``): the GPU if there is one, else the CPU.
- N <= GPUs per node: ``torchrun --standalone --nproc_per_node=N`` on this machine.
- N > GPUs per node: N / GPUS_PER_NODE nodes. Inside a SLURM allocation (SLURM_JOB_ID set) the
  launch is ``srun`` with one task per GPU; ranks come from SLURM's variables. Otherwise the same
  command runs on every node with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT set, through
  torchrun's static rendezvous.

GPUS_PER_NODE defaults to the GPUs on this machine, or 8 where it has none. Standard library only,
so that ``make -n pretrain`` and ``make -n linear-eval`` can print the exact command before anything
is installed.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ENTRIES = ("train", "linear_eval", "finetune")
WHAT = {"train": "pretraining", "linear_eval": "linear evaluation", "finetune": "fine-tuning"}


class LaunchError(ValueError):
    """A launch that cannot work as asked; the message says how to launch instead."""


def gpus_on_this_machine() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def plan(gpus: int, train_args: list[str], python: str = "python", env=os.environ,
         gpus_here: int | None = None, max_restarts: int = 0, entry: str = "train") -> list[str]:
    """The command (argv) that starts ``gpus`` processes of ``byol_fast.<entry>`` with ``train_args``
    (the entry's arguments); raises LaunchError if it cannot."""
    if entry not in ENTRIES:
        raise LaunchError(f"entry {entry!r} is not one of {', '.join(ENTRIES)}")
    gpus_here = gpus_on_this_machine() if gpus_here is None else gpus_here
    per_node = int(env.get("GPUS_PER_NODE") or gpus_here or 8)
    train = ["-m", f"byol_fast.{entry}", *train_args]
    if gpus <= 1:
        return [python, *train]
    # torchrun gives each of several processes one OpenMP thread unless told otherwise, and says so
    # in a notice on every start; naming the setting in the command makes it visible and silent.
    threads = [] if env.get("OMP_NUM_THREADS") else ["env", "OMP_NUM_THREADS=1"]
    torchrun = [*threads, python, "-m", "torch.distributed.run"]
    if max_restarts:
        torchrun.append(f"--max-restarts={max_restarts}")
    if gpus <= per_node:
        if gpus_here and gpus > gpus_here:
            raise LaunchError(f"GPUS={gpus} but this machine has {gpus_here} GPUs")
        return [*torchrun, "--standalone", f"--nproc_per_node={gpus}", *train]
    if gpus % per_node:
        raise LaunchError(f"GPUS={gpus} is not a whole number of nodes of {per_node} GPUs (set GPUS_PER_NODE)")
    nnodes = gpus // per_node
    if env.get("SLURM_JOB_ID"):
        return ["srun", f"--ntasks={gpus}", f"--ntasks-per-node={per_node}", "--kill-on-bad-exit=1",
                python, *train]
    missing = [v for v in ("NNODES", "NODE_RANK", "MASTER_ADDR") if not env.get(v)]
    if missing:
        slurm = ("submit config/slurm/pretrain.sbatch with sbatch" if entry == "train"
                 else "run the same make command inside a SLURM allocation (sbatch, salloc)")
        raise LaunchError(
            f"{WHAT[entry]} on GPUS={gpus} needs {nnodes} nodes of {per_node} GPUs. Run the same make command on "
            f"every node with NNODES={nnodes} NODE_RANK=<0..{nnodes - 1}> MASTER_ADDR=<node 0's address> "
            f"[MASTER_PORT=29500] set (missing: {', '.join(missing)}), or {slurm}")
    if int(env["NNODES"]) != nnodes:
        raise LaunchError(f"NNODES={env['NNODES']} but GPUS={gpus} at {per_node} per node needs {nnodes}")
    return [*torchrun, f"--nnodes={nnodes}", f"--node_rank={env['NODE_RANK']}", f"--nproc_per_node={per_node}",
            f"--master_addr={env['MASTER_ADDR']}", f"--master_port={env.get('MASTER_PORT', '29500')}", *train]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m byol_fast.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=None, help="GPUs in all (default: this machine's)")
    parser.add_argument("--entry", choices=ENTRIES, default="train",
                        help="module to launch: byol_fast.train (pretraining, the default), byol_fast.linear_eval "
                             "or byol_fast.finetune")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the launched processes")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun elastic restarts (resume from last.pt)")
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
    args = parser.parse_args(ours)
    gpus = gpus_on_this_machine() if args.gpus is None else args.gpus
    try:
        cmd = plan(gpus, train_args, args.python, max_restarts=args.max_restarts, entry=args.entry)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print:
        print(shlex.join(cmd))
        return 0
    print("+ " + shlex.join(cmd), flush=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
