"""``aria``: the command line for users who prefer it to the Dagster UI.

    aria demo                      run the main job on the embedded demo corpus
    aria run ingest --source DIR   run a job on your own MIDI folder
    aria run pretrain              pretrain on the current token shards (resumes a stopped run)
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
    from aria_model.home import HOME_ENV_VAR, default_home
    from aria_model.sources import resolve_sources

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


def missing_upstream(job: str, env: dict[str, str]) -> list[str]:
    """Assets upstream of ``job``'s selection that have never been materialized in this instance."""
    import dagster as dg

    from pipelines.definitions import defs

    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    graph = defs.resolve_asset_graph()
    selected = defs.resolve_job_def(job).asset_layer.executable_asset_keys
    upstream = dg.AssetSelection.assets(*selected).upstream().resolve(graph) - selected
    with dg.DagsterInstance.get() as instance:
        return sorted(key.to_user_string() for key in upstream
                      if graph.get(key).is_materializable and instance.get_latest_materialization_event(key) is None)


def run_job(job: str, home: str | None, source: str | None, config: str | None,
            with_missing_upstream: bool = False) -> int:
    env = prepare_environment(home, source)
    command = [sys.executable, "-m", "dagster", "job", "execute", "-m", "pipelines.definitions", "-j", job]
    missing = missing_upstream(job, env) if with_missing_upstream else []
    if missing:
        from pipelines.definitions import defs

        targets = sorted(k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.executable_asset_keys)
        print(f"never materialized upstream of {job}: {', '.join(missing)}; materializing them first", flush=True)
        command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "pipelines.definitions",
                   "--select", ",".join(missing + targets)]
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
    run.add_argument("--with-missing-upstream", action="store_true",
                     help="first materialize upstream assets that were never built (e.g. token_shards for pretrain)")
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
        return run_job(args.job, args.home, args.source, args.config, args.with_missing_upstream)
    return tokenize_file(args.file, args.ids, args.seed)


if __name__ == "__main__":
    sys.exit(main())
