"""PipesSlurmClient: the sbatch script, sacct parsing, and real Dagster runs against a fake SLURM.

The fake ``sbatch`` runs the rendered script in the background with a fake ``srun`` (which
just execs its command) first on PATH, and keeps each job's state in a file that the fake
``sacct`` prints and the fake ``scancel`` overwrites; the Pipes messages go through the
"shared" directory exactly as they would on a cluster.
"""

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from pipelines.slurm import (
    PipesSlurmClient,
    SlurmJobSpec,
    parse_sacct_state,
    render_sbatch_script,
)

# --- the script ------------------------------------------------------------------------

SPEC = SlurmJobSpec(
    job_name="pretrained_model-1a2b3c4d", output="/shared/runs/x/job.out", nodes=2, ntasks_per_node=4,
    gpus_per_node=4, cpus_per_task=8, time_limit="2-00:00:00", partition="gpu", account="music",
    chdir="/shared/aria", extra_directives=("--qos=high", "--constraint=a100&nvlink"),
    setup_commands=("module load cuda/12.4",),
)
COMMAND = ["/shared/aria/.venv/bin/python", "-m", "aria_model.training.pretrain", "--preset", "medium",
           "--set", "train.num_nodes=2", "train.devices=4"]


def test_script_has_every_directive_before_the_first_command():
    lines = render_sbatch_script(SPEC, COMMAND, {}).splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=pretrained_model-1a2b3c4d", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
        "--cpus-per-task=8", "--time=2-00:00:00", "--partition=gpu", "--account=music",
        "--output=/shared/runs/x/job.out", "--open-mode=append", "--chdir=/shared/aria",
        "--signal=SIGUSR1@90", "--requeue", "--qos=high", "--constraint=a100&nvlink",
    ]
    # sbatch stops reading directives at the first command
    assert all(line.startswith("#") for line in lines[:len(directives) + 1])


def test_optional_directives_are_left_out():
    script = render_sbatch_script(SlurmJobSpec(job_name="j", output="/o"), ["true"], {})
    assert "--gpus-per-node" not in script
    assert "--partition" not in script and "--account" not in script and "--chdir" not in script


def test_srun_line_quotes_the_command_and_comes_last():
    command = [*COMMAND, "tracking.run_name=a b; rm -rf ~"]
    lines = render_sbatch_script(SPEC, command, {}).splitlines()
    assert lines[-1].startswith("srun --kill-on-bad-exit=1 ")
    assert shlex.split(lines[-1])[2:] == command
    assert lines[-2] == "module load cuda/12.4"


@pytest.mark.parametrize("value", [
    "plain", "", "with space", "it's", 'say "hi"', "$HOME and `id` and $(id)", "a\nb", "back\\slash", "*.ckpt",
])
def test_env_values_reach_the_shell_unchanged(value):
    script = render_sbatch_script(SlurmJobSpec(job_name="j", output="/o"), ["true"], {"ARIA_NOTE": value})
    exports = script.split("\nsrun ")[0]  # everything but srun; a quoted newline spans two lines
    shown = subprocess.run(["bash", "-c", f"{exports}\nprintf %s \"$ARIA_NOTE\""], capture_output=True, text=True,
                           check=True)
    assert shown.stdout == value


@pytest.mark.parametrize("spec, env", [
    (SlurmJobSpec(job_name="two words", output="/o"), {}),
    (SlurmJobSpec(job_name="j", output="/my dir/job.out"), {}),
    (SlurmJobSpec(job_name="j", output="/o", extra_directives=("--qos=high\nrm -rf /",)), {}),
    (SlurmJobSpec(job_name="j", output="/o"), {"NOT-A-NAME": "x"}),
    (SlurmJobSpec(job_name="j", output="/o"), {"X; rm -rf /": "x"}),
])
def test_values_that_would_break_the_script_are_refused(spec, env):
    with pytest.raises(ValueError):
        render_sbatch_script(spec, ["true"], env)


# --- sacct -----------------------------------------------------------------------------

@pytest.mark.parametrize("state", [
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
    "DEADLINE", "PENDING", "RUNNING", "REQUEUED", "COMPLETING",
])
def test_sacct_state_is_the_first_word(state):
    assert parse_sacct_state(f"{state}\n") == state


@pytest.mark.parametrize("text, state", [
    ("CANCELLED by 1234\n", "CANCELLED"),
    ("CANCELLED+\n", "CANCELLED"),
    ("  running  \n", "RUNNING"),
    ("\n\nRUNNING\nRUNNING\nCOMPLETED\n", "RUNNING"),  # the allocation, then its steps
    ("OUT_OF_MEMORY\nOUT_OF_MEMORY\n", "OUT_OF_MEMORY"),
    ("", ""),  # submitted, not in the accounting database yet
    ("\n", ""),
])
def test_sacct_output_variants(text, state):
    assert parse_sacct_state(text) == state


# --- a fake SLURM ----------------------------------------------------------------------

FAKE_SBATCH = """
    import os, re, subprocess, sys
    from pathlib import Path

    STATE = Path({state!r})
    BIN = {bin!r}

    def set_state(job_id, state):
        path = STATE / f"{{job_id}}.state"
        if path.exists() and path.read_text() == "CANCELLED":
            return  # scancel has the last word
        path.write_text(state)

    if sys.argv[1] == "--run":  # the detached job
        job_id, script, output = sys.argv[2:5]
        set_state(job_id, "RUNNING")
        env = {{**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "SLURM_JOB_ID": job_id,
               "SLURM_PROCID": "0"}}
        with open(output, "a") as out:
            rc = subprocess.call(["bash", script], stdout=out, stderr=subprocess.STDOUT, env=env)
        set_state(job_id, "COMPLETED" if rc == 0 else "FAILED")
        sys.exit(0)

    assert sys.argv[1] == "--parsable", sys.argv
    script = Path(sys.argv[2])
    directives = dict(re.findall(r"^#SBATCH (--[a-z-]+)=(\\S+)$", script.read_text(), re.M))
    job_id = str(1000 + len(list(STATE.glob("*.state"))))
    set_state(job_id, "PENDING")
    job = subprocess.Popen([sys.executable, __file__, "--run", job_id, str(script), directives["--output"]],
                           cwd=directives.get("--chdir"), start_new_session=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (STATE / f"{{job_id}}.pid").write_text(str(job.pid))
    print(f"{{job_id}};fakecluster")
"""

FAKE_SACCT = """
    import sys
    from pathlib import Path

    job_id = sys.argv[sys.argv.index("-j") + 1]
    (Path({state!r}) / "sacct.log").open("a").write(job_id + "\\n")
    path = Path({state!r}) / f"{{job_id}}.state"
    state = path.read_text() if path.exists() else ""
    print("CANCELLED by 1000" if state == "CANCELLED" else state)
"""

FAKE_SCANCEL = """
    import os, signal, sys
    from pathlib import Path

    state = Path({state!r})
    job_id = sys.argv[1]
    (state / "scancel.log").open("a").write(job_id + "\\n")
    (state / f"{{job_id}}.state").write_text("CANCELLED")
    os.killpg(int((state / f"{{job_id}}.pid").read_text()), signal.SIGTERM)
"""

FAKE_SRUN = """
    import os, sys

    args = sys.argv[1:]
    while args[0].startswith("-"):  # srun's own options
        args.pop(0)
    os.execvp(args[0], args)
"""

# What the training script does, in miniature: talk to Dagster from rank 0 only.
PIPES_JOB = """
    import os, time
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        pipes.log.info(f"training in SLURM job {os.environ['SLURM_JOB_ID']} at lr {pipes.get_extra('lr')}")
        print("step 1/1 loss 0.25", flush=True)
        if os.environ.get("ARIA_SLEEP"):
            time.sleep(float(os.environ["ARIA_SLEEP"]))
        pipes.report_asset_materialization(metadata={
            "final_loss": 0.25, "steps": 7, "note": os.environ["ARIA_NOTE"], "cwd": os.getcwd()})
"""

FAILING_JOB = """
    import sys
    print("loading shards", flush=True)
    print("boom: loss is nan at step 3", file=sys.stderr)
    sys.exit(1)
"""


def _script(path: Path, body: str, **names) -> Path:
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body.format(**names) if names else body))
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_slurm(tmp_path) -> dict[str, Path]:
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm_state"
    bin_dir.mkdir()
    state.mkdir()
    names = {"state": str(state), "bin": str(bin_dir)}
    return {
        "sbatch": _script(bin_dir / "sbatch", FAKE_SBATCH, **names),
        "sacct": _script(bin_dir / "sacct", FAKE_SACCT, **names),
        "scancel": _script(bin_dir / "scancel", FAKE_SCANCEL, **names),
        "srun": _script(bin_dir / "srun", FAKE_SRUN),
        "state": state,
        "shared": tmp_path / "shared",
    }


def _client(fake: dict[str, Path], **overrides) -> PipesSlurmClient:
    settings = {"shared_dir": str(fake["shared"]), "partition": "debug", "gpus_per_node": 0, "cpus_per_task": 1,
                "time_limit": "00:05:00", "sbatch": str(fake["sbatch"]), "sacct": str(fake["sacct"]),
                "scancel": str(fake["scancel"]), "poll_interval_s": 0.1}
    return PipesSlurmClient(**{**settings, **overrides})


def _training_asset(command: list[str], cwd: str | None = None, env: dict[str, str] | None = None):
    @dg.asset
    def tiny_model(context: dg.AssetExecutionContext, trainer: PipesSlurmClient) -> dg.MaterializeResult:
        return trainer.run(context=context, command=command, extras={"lr": 3e-4}, env=env, cwd=cwd
                           ).get_materialize_result()

    return tiny_model


def test_a_job_reports_its_materialization_and_logs_through_the_shared_dir(fake_slurm, tmp_path):
    job = _script(tmp_path / "job.py", PIPES_JOB)
    note = "it's $HOME and `id`"
    workdir = tmp_path / "work"
    workdir.mkdir()
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [_training_asset([sys.executable, str(job)], cwd=str(workdir), env={"ARIA_NOTE": note})],
        resources={"trainer": _client(fake_slurm)}, instance=instance,
    )
    assert result.success
    metadata = result.asset_materializations_for_node("tiny_model")[0].metadata
    assert metadata["final_loss"].value == 0.25
    assert metadata["steps"].value == 7
    assert metadata["note"].value == note  # survived the export line and srun
    assert metadata["slurm_job_id"].value == "1000"
    output = Path(metadata["slurm_output"].value)
    assert "step 1/1 loss 0.25" in output.read_text()
    assert metadata["cwd"].value == str(workdir)
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("training in SLURM job 1000 at lr 0.0003" in m for m in messages)
    assert any("SLURM job 1000 ended COMPLETED" in m and "step 1/1 loss 0.25" in m for m in messages)
    # the Pipes files are gone, the script and the log stay for debugging
    assert sorted(p.name for p in output.parent.iterdir()) == ["job.out", "job.sh"]


def test_a_failing_job_raises_failure_with_the_log_tail(fake_slurm, tmp_path):
    job = _script(tmp_path / "job.py", FAILING_JOB)
    with pytest.raises(dg.Failure) as failure:
        dg.materialize([_training_asset([sys.executable, str(job)])], resources={"trainer": _client(fake_slurm)})
    assert "SLURM job 1000 ended FAILED" in failure.value.description
    assert "boom: loss is nan at step 3" in failure.value.description
    assert failure.value.metadata["slurm_state"].value == "FAILED"
    assert not (fake_slurm["state"] / "scancel.log").exists()


def test_interrupting_the_run_cancels_the_job(fake_slurm, tmp_path):
    job = _script(tmp_path / "job.py", PIPES_JOB)
    polled = fake_slurm["state"] / "sacct.log"

    def interrupt_once_polling():  # as `dagster` does when a run is terminated from the UI
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not polled.exists():
            time.sleep(0.05)
        if polled.exists():  # never interrupt pytest itself outside the run
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_polling, daemon=True).start()
    with pytest.raises(dg.DagsterExecutionInterruptedError):
        dg.materialize([_training_asset([sys.executable, str(job)], env={"ARIA_NOTE": "x", "ARIA_SLEEP": "30"})],
                       resources={"trainer": _client(fake_slurm)})
    assert (fake_slurm["state"] / "scancel.log").read_text() == "1000\n"
    assert (fake_slurm["state"] / "1000.state").read_text() == "CANCELLED"


def test_sacct_that_never_works_gives_up_and_cancels(fake_slurm, tmp_path):
    _script(fake_slurm["sacct"], """
        import sys
        print("sacct: error: Slurm accounting storage is disabled", file=sys.stderr)
        sys.exit(1)
    """)
    job = _script(tmp_path / "job.py", PIPES_JOB)
    with pytest.raises(dg.Failure, match="sacct never reported SLURM job 1000"):
        dg.materialize([_training_asset([sys.executable, str(job)], env={"ARIA_NOTE": "x", "ARIA_SLEEP": "30"})],
                       resources={"trainer": _client(fake_slurm, poll_interval_s=0.02)})
    assert (fake_slurm["state"] / "scancel.log").read_text() == "1000\n"
