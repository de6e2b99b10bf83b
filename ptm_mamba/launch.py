"""How the train rule starts training: ``accelerate launch`` on one machine or on several.

:func:`launch_command` is the prefix the train rule puts before ``-m ptm_mamba train ...``
(``workflow/rules/common.smk``): ``python -m ptm_mamba.launch`` runs ``accelerate launch`` on each
machine; N > 1 machines are one SLURM job, one ``srun`` task per node (static rendezvous).

Signals: SLURM signals every process of a job step, and kills the rest of the step when its
first process exits. Training saves its state on SIGTERM/SIGUSR1 (``train.StopSignals``), so
this launcher waits for it instead of exiting, and keeps torch's elastic agent from killing the
workers 30 s after a SIGTERM. Snakemake's SLURM job dies on SIGUSR1 but finishes on SIGTERM:
hence ``--signal=TERM@...`` in the SLURM profiles.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from .errors import PipelineError

# SIGTERM and SIGUSR1 are left to the training processes: torch's elastic agent (--multi_gpu)
# handles only these (its default also lists SIGTERM, on which it kills its workers after 30 s).
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
WAIT_FOR_TRAINING = (signal.SIGTERM, signal.SIGUSR1)


def launch_command(num_machines: int, num_processes: int, log: str | None = None) -> str:
    """The shell prefix of the train rule's command; ``num_processes`` is per machine. With
    ``log``, output is also appended to ``log``, each segment of a resumed run under a header."""
    logging = f" --log {shlex.quote(log)}" if log else ""
    args = f"--num_machines {num_machines} --num_processes {num_processes}{logging} --"
    if num_machines == 1:
        return f"exec python -m ptm_mamba.launch {args}"
    # srun stopped passing CPUs per task in SLURM 22.05; a failed task must end the others,
    # not leave them waiting in a collective.
    return (f"exec srun --nodes={num_machines} --ntasks={num_machines} --ntasks-per-node=1"
            " --cpus-per-task=${SLURM_CPUS_PER_TASK:-1} --kill-on-bad-exit=1"
            f" python -m ptm_mamba.launch {args}")


def slurm_resources(num_machines: int, num_processes: int) -> dict:
    """The train rule's resources (the ``mpi`` resource keeps the SLURM plugin from adding its own srun)."""
    if num_machines == 1:
        return {"gpu": num_processes}
    return {"gpu": 0, "gres": f"gpu:{num_processes}", "nodes": num_machines, "tasks": num_machines,
            "mpi": "srun"}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04],gpu7`` -> ``node01``)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise PipelineError(f"cannot expand the SLURM node list {nodelist!r} with scontrol ({exc})") from None
    if not out:
        raise PipelineError(f"the SLURM node list {nodelist!r} names no host")
    return out[0]


def rendezvous(num_machines: int, env: dict) -> list[str]:
    """This machine's rank and the main process's address, from SLURM; ``MACHINE_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` win when set (another scheduler, or one host)."""
    rank = env.get("MACHINE_RANK", env.get("SLURM_NODEID"))
    if rank is None:
        raise PipelineError(f"training.num_machines: {num_machines} runs as one SLURM job over {num_machines} "
                            "nodes (snakemake --profile profiles/slurm); SLURM_NODEID is not set here "
                            "(outside SLURM set MACHINE_RANK, MASTER_ADDR and MASTER_PORT)")
    nodes = env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES"))
    if "MACHINE_RANK" not in env and nodes is not None and int(nodes) != num_machines:
        raise PipelineError(f"training.num_machines is {num_machines}, but the SLURM job has {nodes} node(s)")
    if not 0 <= int(rank) < num_machines:
        raise PipelineError(f"machine rank {rank} is not in 0..{num_machines - 1} (training.num_machines)")
    address = env.get("MASTER_ADDR")
    if address is None:
        if "SLURM_JOB_NODELIST" not in env:
            raise PipelineError("MASTER_ADDR is not set and there is no SLURM_JOB_NODELIST to take it from")
        address = first_host(env["SLURM_JOB_NODELIST"])
    # A port per job, so that jobs sharing a node do not clash.
    port = env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000)
    return ["--machine_rank", str(int(rank)), "--main_process_ip", address, "--main_process_port", port]


def accelerate_args(num_machines: int, num_processes: int, env: dict) -> list[str]:
    """``accelerate launch`` options (without the command): ``num_processes`` per machine."""
    total = num_machines * num_processes
    # --mixed_precision no only silences accelerate's warning; training.mixed_precision wins over it
    args = ["--num_machines", str(num_machines), "--num_processes", str(total), "--dynamo_backend", "no",
            "--mixed_precision", "no"]
    if num_machines > 1:
        args += rendezvous(num_machines, env)
    elif env.get("MASTER_PORT"):  # else torch's default, 29500
        args += ["--main_process_port", env["MASTER_PORT"]]
    if total > 1:  # a process group (gloo on CPU, NCCL on GPU) across all processes
        args.append("--multi_gpu")
    return args


@contextlib.contextmanager
def output_to_log(log: str | None, machine_rank: int) -> Iterator[None]:
    """Tee this process's and its children's output, on the first machine, to ``log`` and
    :func:`segments_log` (Snakemake deletes a failed job's log before resubmitting). The launcher
    outlives training on SIGTERM, so the last words are kept."""
    if log is None:
        yield
        return
    sys.stdout.flush(), sys.stderr.flush()
    terminal = os.dup(1)
    read_end, write_end = os.pipe()
    saved = (os.dup(1), os.dup(2))
    os.dup2(write_end, 1), os.dup2(write_end, 2)
    os.close(write_end)
    sinks = []
    if machine_rank == 0:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        sinks = [open(path, "ab", buffering=0) for path in (log, segments_log(log))]
        for sink in sinks:
            sink.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: "
                       f"{os.environ.get('SLURM_JOB_ID', 'local')} job, a segment of this run ====\n".encode())

    def copy() -> None:
        while chunk := os.read(read_end, 1 << 16):
            for fd in (terminal, *(sink.fileno() for sink in sinks)):
                with contextlib.suppress(OSError):  # a closed terminal must not stop the log
                    os.write(fd, chunk)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)  # the pipe's last writer closes: the copy ends
        thread.join(timeout=30)
        for fd in (*saved, terminal, read_end):
            os.close(fd)
        for sink in sinks:
            sink.close()


def segments_log(log: str | os.PathLike) -> Path:
    """Where every segment of a resumed training is kept: ``logs/train/x.log`` -> ``x.segments.log``."""
    return Path(log).with_suffix(".segments.log")


def _wait_for_training(signum, frame) -> None:
    """SIGTERM/SIGUSR1: training got it too from SLURM; keep waiting for it to save and exit."""


def run(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command as accelerate_launch
    from accelerate.commands.launch import launch_command_parser

    if "--" not in argv:
        raise PipelineError("usage: python -m ptm_mamba.launch --num_machines N --num_processes P -- "
                            "-m ptm_mamba train ...")
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1:]
    opts = dict(zip(own[::2], own[1::2]))
    if len(own) % 2 or not {"--num_machines", "--num_processes"} <= set(opts) <= {"--num_machines",
                                                                                 "--num_processes", "--log"}:
        raise PipelineError(f"expected --num_machines N --num_processes P [--log FILE] before --, "
                            f"got {shlex.join(own)!r}")
    try:
        machines, processes = int(opts["--num_machines"]), int(opts["--num_processes"])
    except ValueError:
        raise PipelineError(f"--num_machines and --num_processes take integers, got {shlex.join(own)!r}") from None
    if machines < 1 or processes < 1:
        raise PipelineError("--num_machines and --num_processes must be >= 1")
    args = accelerate_args(machines, processes, os.environ)
    for sig in WAIT_FOR_TRAINING:  # a handler, not SIG_IGN: the training processes start with the defaults
        signal.signal(sig, _wait_for_training)
    parsed = launch_command_parser().parse_args(args + command)
    parsed.signals_to_handle = AGENT_SIGNALS  # torchrun's --signals-to-handle (accelerate passes it on)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    rank = int(args[args.index("--machine_rank") + 1]) if "--machine_rank" in args else 0
    with output_to_log(opts.get("--log"), rank):
        print(f"ptm_mamba.launch: accelerate launch {shlex.join(args)} {shlex.join(command)}", file=sys.stderr,
              flush=True)
        try:
            accelerate_launch(parsed)
        except subprocess.CalledProcessError as exc:  # one process, which failed: pass its status on
            return exit_status(exc.returncode)
        except ChildFailedError as exc:  # several processes (torch elastic has printed which failed)
            return exit_status(exc.get_first_failure()[1].exitcode)
    return 0


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N for signal N."""
    return returncode if returncode > 0 else 128 - returncode if returncode < 0 else 1


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
