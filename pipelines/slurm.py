"""Run a Dagster Pipes command as a SLURM batch job: ``PipesSlurmClient``.

The training assets launch ``python -m aria_model.training.pretrain ...`` through a Pipes
client. Locally that is ``dg.PipesSubprocessClient``; on a SLURM cluster bind this client
instead and the same asset code submits one ``sbatch`` job that runs the command under
``srun`` on every task (Lightning detects SLURM and wires up DDP across the nodes).

Pipes context and messages travel through files in ``shared_dir``, which must be mounted at
the same path on the Dagster host and on the compute nodes. Everything for one launch lives
in ``<shared_dir>/<run id>/<op>-<random>/``: ``job.sh`` (the rendered script), ``job.out``
(the output of every task, kept after the run) and the two Pipes files (removed at the end).

    import dagster as dg
    from pipelines.slurm import PipesSlurmClient

    defs = dg.Definitions(..., resources={"pipes_client": PipesSlurmClient(
        shared_dir="/shared/aria/slurm", partition="gpu", account="music",
        nodes=2, gpus_per_node=4, time_limit="24:00:00")})

and the run config says ``train.num_nodes=2 train.devices=4`` (Lightning checks them against SLURM).

See docs/deploy.md for the cluster side (storage, MLflow, requeue on preemption).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster_pipes import PipesExtras

# sacct states after which the job never runs again. REQUEUED, PENDING, RUNNING, COMPLETING,
# SUSPENDED... are not here: a job Lightning requeued before its time limit (or that Slurm
# requeued after preemption) goes REQUEUED -> PENDING -> RUNNING and is still the same job.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
    "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED",
})
SUCCESS_STATE = "COMPLETED"

# Lightning's SLURMEnvironment saves a checkpoint and requeues the job on this signal; 90 s
# before the time limit leaves time to write a large checkpoint to a network filesystem.
REQUEUE_SIGNAL = "SIGUSR1@90"

LOG_TAIL_LINES = 60
# Before accounting has reported the job once, repeated sacct errors mean sacct cannot work
# here (accounting disabled, wrong cluster): give up and cancel. Afterwards an error is a
# slurmdbd hiccup, and a multi-day training run must not be cancelled for one.
SACCT_STARTUP_FAILURES = 10
SLURM_COMMAND_TIMEOUT_S = 60  # for sacct and scancel: a hung slurmdbd is a failed poll, not a reason to cancel
# After COMPLETED, how long to wait for the Pipes "closed" message: an NFS client caches file
# attributes for up to 60 s by default, so the last lines of the messages file can lag.
CLOSED_MESSAGE_WAIT_S = 120.0

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class SlurmJobSpec:
    """What ``render_sbatch_script`` turns into ``#SBATCH`` directives."""

    job_name: str
    output: str  # stdout and stderr of every task, appended across requeues
    nodes: int = 1
    ntasks_per_node: int = 1  # Lightning wants one task per GPU
    gpus_per_node: int = 0  # 0: no GPU request
    cpus_per_task: int = 1
    time_limit: str = "24:00:00"  # any sbatch --time format, e.g. "2-00:00:00"
    partition: str | None = None
    account: str | None = None
    chdir: str | None = None  # None: the directory sbatch was called from
    extra_directives: tuple[str, ...] = ()  # full options, e.g. "--qos=high", "--constraint=a100"
    setup_commands: tuple[str, ...] = ()  # shell lines run before srun, e.g. "module load cuda/12.4"


def render_sbatch_script(job: SlurmJobSpec, command: Sequence[str], env: Mapping[str, str]) -> str:
    """The batch script: directives, ``export`` of ``env``, setup lines, then ``srun <command>``."""
    if not command:
        raise ValueError("empty command")
    options = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.ntasks_per_node}",
        *([f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []),
        f"--cpus-per-task={job.cpus_per_task}",
        f"--time={job.time_limit}",
        *([f"--partition={job.partition}"] if job.partition else []),
        *([f"--account={job.account}"] if job.account else []),
        f"--output={job.output}",
        "--open-mode=append",  # a requeued job keeps the log of its earlier attempts
        *([f"--chdir={job.chdir}"] if job.chdir else []),
        f"--signal={REQUEUE_SIGNAL}",
        "--requeue",  # lets Lightning (scontrol requeue) and preemption put the job back in the queue
    ]
    # sbatch reads directives up to the first command and splits them on whitespace, so a
    # space or newline in a value would silently become another option.
    for option in options:
        if any(c.isspace() for c in option):
            raise ValueError(f"whitespace in sbatch option {option!r}")
    for option in job.extra_directives:
        if "\n" in option or "\r" in option:
            raise ValueError(f"newline in extra directive {option!r}")
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in (*options, *job.extra_directives))]
    lines.append("set -e")
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.extend(job.setup_commands)
    # One rank dying must end the step: the others would otherwise wait in a collective until
    # the NCCL timeout, holding every GPU of the allocation.
    lines.append(f"srun --kill-on-bad-exit=1 {shlex.join(command)}")
    return "\n".join(lines) + "\n"


def parse_sacct_state(text: str) -> str:
    """The job state in ``sacct -n -X -P -o State`` output; "" while accounting has no record yet.

    The first line is the job allocation (later ones are steps, or older attempts with -D);
    "CANCELLED by 1234" names who cancelled, and "+" marks a state cut to the column width.
    """
    for line in text.splitlines():
        if line.strip():
            return line.split()[0].rstrip("+").upper()
    return ""


def tail_lines(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a possibly huge log, reading at most ``max_bytes``."""
    try:
        with path.open("rb") as log:
            log.seek(max(log.seek(0, os.SEEK_END) - max_bytes, 0))
            text = log.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no output file at {path})"
    return "\n".join(text.splitlines()[-lines:])


class PipesSlurmClient(dg.ConfigurableResource, dg.PipesClient):
    """Runs a command with ``srun`` inside an ``sbatch`` job and reports it back through Pipes.

    ``run(context=..., command=[...], extras=..., env=..., cwd=...)`` takes the same arguments as
    ``PipesSubprocessClient.run``, so an asset swaps one for the other through its binding.
    """

    shared_dir: str  # mounted at the same path on the Dagster host and on every compute node
    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1  # 0: no --gpus-per-node (CPU, or GPUs requested by --gres in extra_directives)
    ntasks_per_node: int | None = None  # None: one per GPU (at least one), the layout Lightning expects
    cpus_per_task: int = 8  # data-loader workers + the main process
    time_limit: str = "24:00:00"  # per attempt; Lightning requeues before it runs out
    extra_directives: list[str] = []  # e.g. ["--qos=high", "--constraint=a100", "--mem=0"]
    setup_commands: list[str] = []  # e.g. ["module load cuda/12.4", "source /shared/aria/.venv/bin/activate"]
    env: dict[str, str] = {}  # exported in the job, e.g. ARIA_HOME on the shared filesystem
    sbatch: str = "sbatch"
    sacct: str = "sacct"
    scancel: str = "scancel"
    poll_interval_s: float = 30.0

    def _job_spec(self, job_name: str, output: Path, cwd: str | None) -> SlurmJobSpec:
        return SlurmJobSpec(
            job_name=job_name, output=str(output), nodes=self.nodes,
            ntasks_per_node=self.ntasks_per_node or max(self.gpus_per_node, 1), gpus_per_node=self.gpus_per_node,
            cpus_per_task=self.cpus_per_task, time_limit=self.time_limit, partition=self.partition,
            account=self.account, chdir=cwd, extra_directives=tuple(self.extra_directives),
            setup_commands=tuple(self.setup_commands),
        )

    def run(
        self,
        *,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        command: Sequence[str],
        extras: PipesExtras | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> dg.PipesClientCompletedInvocation:
        """Submit, wait for a terminal state, and return what the job reported.

        Raises ``dg.Failure`` (with the state and the end of the job's output) unless the job
        ends COMPLETED; cancels the job if the step stops waiting for any other reason.
        """
        if isinstance(command, str):
            raise TypeError("command must be a list of arguments, as srun execs it without a shell")
        op_name = context.op_execution_context.op.name
        run_dir = Path(self.shared_dir).expanduser().resolve() / context.run.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        launch_dir = Path(tempfile.mkdtemp(prefix=f"{op_name}-", dir=run_dir))
        output = launch_dir / "job.out"
        with dg.open_pipes_session(
            context=context,
            context_injector=dg.PipesFileContextInjector(str(launch_dir / "pipes_context.json")),
            message_reader=dg.PipesFileMessageReader(str(launch_dir / "pipes_messages.jsonl")),
            extras=extras,
        ) as session:
            script = launch_dir / "job.sh"
            script.write_text(render_sbatch_script(
                self._job_spec(f"{op_name}-{context.run.run_id[:8]}", output, cwd),
                list(command),
                {**self.env, **(env or {}), **session.get_bootstrap_env_vars()},
            ))
            job_id = self._submit(script)
            context.log.info(f"submitted SLURM job {job_id} ({script}); output in {output}")
            try:
                state = self._wait(context, job_id)
            except BaseException:  # the run was terminated, or polling gave up: leave no orphan job
                self._cancel(context, job_id)
                raise
            if state == SUCCESS_STATE:
                self._await_closed_message(session)
            tail = tail_lines(output)
            context.log.info(f"SLURM job {job_id} ended {state}; last lines of {output}:\n{tail}")
            if state != SUCCESS_STATE:
                raise dg.Failure(
                    description=f"SLURM job {job_id} ended {state}. Last lines of {output}:\n{tail}",
                    metadata={"slurm_job_id": job_id, "slurm_state": state,
                              "slurm_output": dg.MetadataValue.path(str(output))},
                )
        return dg.PipesClientCompletedInvocation(
            session, metadata={"slurm_job_id": job_id, "slurm_output": dg.MetadataValue.path(str(output))})

    def _submit(self, script: Path) -> str:
        done = subprocess.run([self.sbatch, "--parsable", str(script)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise dg.Failure(description=f"sbatch failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        # --parsable prints "<job id>" or, on a federation, "<job id>;<cluster>"
        return done.stdout.strip().split(";")[0]

    def _wait(self, context: dg.AssetExecutionContext | dg.OpExecutionContext, job_id: str) -> str:
        last_state, seen_state, failures = None, False, 0
        while True:
            try:
                done = subprocess.run([self.sacct, "-j", job_id, "-n", "-X", "-P", "-o", "State"],
                                      capture_output=True, text=True, check=False, timeout=SLURM_COMMAND_TIMEOUT_S)
                error = f"exit {done.returncode}: {done.stderr.strip()}" if done.returncode else None
            except subprocess.TimeoutExpired:
                error = f"no answer in {SLURM_COMMAND_TIMEOUT_S} s"
            if error:
                failures += 1
                context.log.warning(f"sacct failed for SLURM job {job_id} ({error})")
                if not seen_state and failures >= SACCT_STARTUP_FAILURES:
                    raise dg.Failure(description=f"sacct never reported SLURM job {job_id} ({error})")
            else:
                state = parse_sacct_state(done.stdout)
                if state:
                    seen_state = True
                    if state != last_state:
                        context.log.info(f"SLURM job {job_id}: {state}")
                        last_state = state
                    if state in TERMINAL_STATES:
                        return state
            time.sleep(self.poll_interval_s)

    def _cancel(self, context: dg.AssetExecutionContext | dg.OpExecutionContext, job_id: str) -> None:
        # Runs while another exception (usually the run's termination) propagates: report a
        # failed scancel, never raise over the original error.
        try:
            done = subprocess.run([self.scancel, job_id], capture_output=True, text=True, check=False,
                                  timeout=SLURM_COMMAND_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            context.log.error(f"could not cancel SLURM job {job_id}, cancel it by hand: {error}")
            return
        if done.returncode == 0:
            context.log.warning(f"cancelled SLURM job {job_id}")
        else:
            context.log.error(f"scancel {job_id} failed, cancel it by hand ({done.returncode}): {done.stderr.strip()}")

    def _await_closed_message(self, session: dg.PipesSession) -> None:
        # Not conditional on the "opened" message: on NFS the whole messages file can lag,
        # so a job that reported everything may look silent for a while after it ended.
        deadline = time.monotonic() + CLOSED_MESSAGE_WAIT_S
        while not session.message_handler.received_closed_message and time.monotonic() < deadline:
            time.sleep(0.2)
