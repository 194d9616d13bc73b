"""``aria``: the command line for users who prefer it to the Dagster UI.

    aria demo                      run the main job on the embedded demo corpus
    aria run ingest --source DIR   run a job on your own MIDI folder
    aria tokenize FILE.mid         print Aria tokens (or ids) of a MIDI file

Jobs run through ``dagster job execute`` against a persistent instance in
``$ARIA_HOME/dagster`` (DAGSTER_HOME), so every run shows up in ``dagster dev``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def prepare_environment(home: str | None, source: str | None) -> dict[str, str]:
    """Environment for a job run: ARIA_HOME, ARIA_SOURCE and an absolute DAGSTER_HOME with our dagster.yaml."""
    from aria_model.sources import resolve_sources
    from pipelines.resources import HOME_ENV_VAR, default_home

    env = dict(os.environ)
    if home:
        env[HOME_ENV_VAR] = str(Path(home).expanduser().resolve())
    if source:
        env["ARIA_SOURCE"] = os.pathsep.join(str(folder.resolve()) for folder in resolve_sources(source))
    aria_home = Path(env.get(HOME_ENV_VAR) or default_home())
    env[HOME_ENV_VAR] = str(aria_home)
    dagster_home = Path(env.get("DAGSTER_HOME") or aria_home / "dagster").resolve()
    dagster_home.mkdir(parents=True, exist_ok=True)
    env["DAGSTER_HOME"] = str(dagster_home)
    instance_yaml = REPO_ROOT / "dagster.yaml"
    if instance_yaml.exists() and not (dagster_home / "dagster.yaml").exists():
        shutil.copy(instance_yaml, dagster_home / "dagster.yaml")
    return env


def run_job(job: str, home: str | None, source: str | None, config: str | None) -> int:
    env = prepare_environment(home, source)
    command = [sys.executable, "-m", "dagster", "job", "execute", "-m", "pipelines.definitions", "-j", job]
    if config:
        command += ["-c", config]
    print(f"ARIA_HOME={env['ARIA_HOME']}  DAGSTER_HOME={env['DAGSTER_HOME']}", flush=True)
    print("$ " + " ".join(command[2:]), flush=True)
    code = subprocess.call(command, env=env, cwd=REPO_ROOT)
    if code == 0:
        print(f"\nDone. Outputs are under {env['ARIA_HOME']}/<asset>/ (Parquet; open them with DuckDB or pyarrow).")
        print(f"See the run in the UI:  DAGSTER_HOME={env['DAGSTER_HOME']} dagster dev")
    return code


def tokenize_file(path: str, ids: bool, rng_seed: int | None) -> int:
    import numpy as np

    from aria_model.midi import MidiError, load_midi
    from aria_model.tokenizer import AbsTokenizer

    tokenizer = AbsTokenizer()
    try:
        perf = load_midi(path)
    except MidiError as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(rng_seed) if rng_seed is not None else None
    if ids:
        print(json.dumps(tokenizer.tokenize_ids(perf, rng=rng).tolist()))
    else:
        print(json.dumps(tokenizer.tokenize(perf, rng=rng), ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pipelines.jobs import MAIN_JOB

    parser = argparse.ArgumentParser(prog="aria", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help=f"run the main job ({MAIN_JOB}) on the embedded demo corpus")
    demo.add_argument("--home", help="data home (default: $ARIA_HOME or ./.aria)")
    run = commands.add_parser("run", help="run a pipeline job")
    run.add_argument("job", help="job name, e.g. ingest")
    run.add_argument("--source", help=f"MIDI folder(s) to ingest, several separated by '{os.pathsep}' "
                                      "(default: $ARIA_SOURCE or the demo corpus)")
    run.add_argument("--home", help="data home (default: $ARIA_HOME or ./.aria)")
    run.add_argument("--config", "-c", help="run config YAML passed to dagster")
    tokenize = commands.add_parser("tokenize", help="print the Aria tokens of a MIDI file")
    tokenize.add_argument("file")
    tokenize.add_argument("--ids", action="store_true", help="print token ids instead of tokens")
    tokenize.add_argument("--seed", type=int, help="shuffle prefixes and jitter <D> as in training")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from pipelines.jobs import MAIN_JOB

        if os.environ.get("ARIA_SOURCE"):
            print("note: ARIA_SOURCE is set; `aria demo` ignores it and uses the demo corpus", file=sys.stderr)
        os.environ.pop("ARIA_SOURCE", None)
        return run_job(MAIN_JOB, args.home, None, None)
    if args.command == "run":
        return run_job(args.job, args.home, args.source, args.config)
    return tokenize_file(args.file, args.ids, args.seed)


if __name__ == "__main__":
    sys.exit(main())
