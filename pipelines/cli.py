"""``aria``: the command line for users who prefer it to the Dagster UI.

    aria demo                      run the main job on the embedded demo corpus, print the probe table
    aria demo --probe-corpus       the same on 400 pieces per collection (100+ pieces per probe class)
    aria run ingest --source DIR   run a job on your own MIDI folder
    aria run pretrain              pretrain on the current token shards (resumes a stopped run)
    aria tokenize FILE.mid         print Aria tokens (or ids) of a MIDI file
    aria generate PROMPT.mid       continue a MIDI file with the latest pretrained model
    aria compare                   params that differ between training runs, final losses, loss curves
    aria embed DIR                 embed MIDI files with the latest contrastive model into Parquet

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


# `aria demo`'s run config: the tiny presets with schedules cut to fit a few minutes on a laptop CPU
# (the presets' own step counts are what `aria run full` and the library's tests use). Both
# contrastive assets get the same overrides: the from-scratch baseline trains exactly as long.
DEMO_PRETRAIN_OVERRIDES = ["train.max_steps=60", "train.val_every=30", "train.checkpoint_every=30"]
DEMO_CONTRASTIVE_OVERRIDES = ["train.max_steps=20", "train.val_every=20", "train.checkpoint_every=20"]
# 400 pieces per collection: 100+ pieces in every style class and in reel, jig and hornpipe.
PROBE_CORPUS_PIECES = 400


def demo_run_config(probe_corpus: bool = False) -> dict:
    """The Dagster run config ``aria demo`` runs the main job with."""
    contrastive = {"config": {"preset": "tiny", "overrides": DEMO_CONTRASTIVE_OVERRIDES}}
    ops = {
        "pretrained_model": {"config": {"preset": "tiny", "overrides": DEMO_PRETRAIN_OVERRIDES}},
        "contrastive_model": contrastive,
        "contrastive_scratch": contrastive,
    }
    if probe_corpus:
        ops["demo_corpus"] = {"config": {"pieces_per_collection": PROBE_CORPUS_PIECES}}
    # Every step in one process: a step process of the multiprocess executor spends 10-40 s importing
    # torch, dagster and mlflow, more than most demo steps compute. Training still runs in its own
    # process (Pipes), and demo_corpus and midi_notes still use every core.
    return {"execution": {"config": {"in_process": {}}}, "ops": ops}


def print_probe_results(home: Path) -> None:
    """The probe table (``<home>/probe_eval/results.parquet``) and the probe dataset's pieces per class."""
    import pyarrow.parquet as pq

    from aria_model.probe import RESULT_COLUMNS, RESULTS_DIR, RESULTS_FILE, results_text
    from aria_model.probe_data import read_probe_dataset
    from assets.probe_dataset import ASSET_NAME as PROBE_DATASET
    from assets.probe_dataset import PROBE_FILE

    path = home / RESULTS_DIR / RESULTS_FILE
    if not path.exists():
        return
    rows = pq.read_table(path, columns=list(RESULT_COLUMNS)).to_pylist()
    print(f"\nLinear probes ({path}):")
    print(results_text(rows))
    dataset = home / PROBE_DATASET / PROBE_FILE
    if dataset.exists():
        print("\nPieces per class (train / test split by piece):")
        print(read_probe_dataset(dataset).describe())


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


def generate_file(args: argparse.Namespace) -> int:
    """Continue ``args.prompt``: MIDI + piano roll per variation, then their paths and tempo drift."""
    import torch

    from aria_model.generation import GenerationConfig, find_weights, generate, load_generator, write_samples
    from aria_model.home import default_home
    from aria_model.midi import MidiError, load_midi
    from aria_model.tokenizer import AbsTokenizer

    try:
        weights = Path(args.model) if args.model else find_weights(default_home(), args.run)
        if not weights.exists():
            raise FileNotFoundError(f"no model at {weights}; train one with `aria run pretrain --with-missing-upstream`")
        perf = load_midi(args.prompt)
        config = GenerationConfig(prompt_seconds=args.seconds, length=args.length, variations=args.variations,
                                  temperature=args.temperature, min_p=args.min_p, top_p=args.top_p,
                                  force_end=args.end, compile=args.compile)
        model = load_generator(weights, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        samples = generate(model, AbsTokenizer(), perf, config, seed=args.seed, progress=True)
    except MidiError as exc:
        print(f"error: cannot read {args.prompt}: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:  # no model, bad settings, a prompt too long for --end
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("generated") / Path(args.prompt).stem
    timing = samples[0].timing
    print(f"model {weights} on {model.lm_head.weight.device}: prompt {timing.prompt_tokens} tokens, "
          f"{timing.tokens_per_s:.1f} tokens/s, first token after {timing.first_token_s * 1e3:.0f} ms")
    for sample, (midi, png) in zip(samples, write_samples(samples, out, title=Path(args.prompt).name)):
        drift = sample.drift
        print(f"{midi}  {png}  {sample.new_tokens} tokens{' (ended)' if sample.finished else ''}, "
              f"{sample.continuation.n_notes} notes; IOI ratio {drift.ioi_ratio:.2f}, on the prompt's grid "
              f"{drift.continuation_on_grid:.2f} (prompt {drift.prompt_on_grid:.2f}, chance {drift.chance_on_grid:.2f})")
    return 0


EMBEDDINGS_FILE = "embeddings.parquet"
SCRATCH_SUFFIX = "-scratch"  # the from-scratch baseline's run names (assets/contrastive_model.py)


def find_embedding_model(home: Path, run_name: str | None = None) -> Path:
    """``<home>/models/contrastive/<run_name>/model.pt``, or the newest such file of a fine-tuned
    run (not the from-scratch baseline) when no run is named."""
    root = home / "models" / "contrastive"
    if run_name is not None:
        candidates = [root / run_name / "model.pt"]
    else:
        candidates = sorted((p for p in root.glob("*/model.pt") if not p.parent.name.endswith(SCRATCH_SUFFIX)),
                            key=lambda p: p.stat().st_mtime)
    if not candidates or not candidates[-1].exists():
        raise FileNotFoundError(
            f"no contrastive model at {root / (run_name or '*') / 'model.pt'}. Train one with "
            "`aria run finetune --with-missing-upstream` (or `aria demo`), or pass --model PATH")
    return candidates[-1]


def embed_midi(args: argparse.Namespace) -> int:
    """Embed one MIDI file or every MIDI file under a folder; one Parquet row per embedded file."""
    import torch
    from tqdm import tqdm

    from aria_model.embedding import EMBEDDING_SEQ_LEN, embed_files, load_embedding_model, write_embeddings_parquet
    from aria_model.home import default_home
    from aria_model.sources import SourceError, iter_midi_files

    home = Path(args.home).expanduser().resolve() if args.home else default_home()
    target = Path(args.input)
    try:
        weights = Path(args.model) if args.model else find_embedding_model(home, args.run)
        if not weights.is_file():
            raise FileNotFoundError(f"no model at {weights}")
        # A folder is listed as the ingest lists a plain source: recursive, .mid/.midi, no dot files.
        files = [target] if target.is_file() else [Path(r.path) for r in iter_midi_files(target, layout="plain")]
        model = load_embedding_model(weights, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (FileNotFoundError, SourceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Aria embeds 2048-token chunks; a smaller model (the tiny demo preset) takes what fits.
    seq_len = min(EMBEDDING_SEQ_LEN, model.config.max_seq_len)
    with tqdm(total=len(files), desc="embedding", unit="file") as bar:
        result = embed_files(model, files, batch_size=args.batch_size, seq_len=seq_len,
                             progress=lambda done, total: bar.update(done - bar.n))
    out = Path(args.out)
    write_embeddings_parquet(result, out)
    print(f"{len(result.keys)} of {len(files)} files -> {out} ({result.matrix.shape[1]}-dim, model {weights})")
    for failure in result.failures:
        print(f"  skipped {failure['key']}: {failure['error']}", file=sys.stderr)
    return 0 if result.keys else 1


def compare_runs(args: argparse.Namespace) -> int:
    """Print the runs' differing params and final metrics; write their curves overlaid with --plot."""
    from aria_model.home import default_home
    from aria_model.tracking import Tracker, sqlite_uri

    metrics = [key.strip() for key in args.metrics.split(",") if key.strip()]
    query = args.filter or args.name
    # A named home means its store, whatever $MLFLOW_TRACKING_URI says.
    tracker = Tracker(sqlite_uri(Path(args.home)) if args.home else None, home=default_home())
    try:
        table = tracker.compare_runs(args.experiment, query, metrics, plot_path=Path(args.plot) if args.plot else None)
    except ValueError as exc:  # no such experiment
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if table.empty:
        print(f"no runs match {query!r} in experiment {args.experiment!r} ({tracker.tracking_uri})", file=sys.stderr)
        return 1
    print(f"{len(table)} runs of {args.experiment!r} matching {query!r} ({tracker.tracking_uri}), oldest first:\n")
    print(comparison_text(table))
    if args.plot:
        print(f"\nloss curves: {args.plot}")
    return 0


def comparison_text(table) -> str:
    """The runs one per row: name, id, start, status, the params that differ between them, final metrics."""
    params = [c for c in table.columns if c.startswith("params.")]
    differing = [c for c in params if table[c].astype(str).nunique() > 1]
    metrics = [c for c in table.columns if c.startswith("metrics.")]
    shown = table[["run_name", "run_id", "start_time", "status", *differing, *metrics]].copy()
    shown["run_id"] = shown["run_id"].str[:8]
    shown["start_time"] = shown["start_time"].dt.strftime("%Y-%m-%d %H:%M")
    shown.columns = [c.removeprefix("params.").removeprefix("metrics.") for c in shown.columns]
    text = shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}")
    same = len(params) - len(differing)
    if same:
        text += f"\n({same} params identical in every run not shown)"
    return text


# `aria <command> --help` ends with these.
EXAMPLES = {
    "demo": "examples:\n  aria demo\n  aria demo --home /data/aria-demo --probe-corpus",
    "run": "examples:\n  aria run ingest --source ~/midi\n  aria run pretrain --with-missing-upstream\n"
           "  aria run full -c run.yaml          # presets and overrides under ops: <asset>: config:",
    "tokenize": "examples:\n  aria tokenize song.mid\n  aria tokenize song.mid --ids --seed 0",
    "generate": "examples:\n  aria generate prompt.mid\n  aria generate prompt.mid --run pretrain-small --variations 2 --end",
    "compare": "examples:\n  aria compare                               # every pretrained_model run\n"
               "  aria compare --plot compare.png\n"
               "  aria compare --filter \"params.optim.lr = '0.001'\"\n"
               "  aria compare --name contrastive_model --metrics train/loss",
    "embed": "examples:\n  aria embed ~/midi                          # newest contrastive model\n"
             "  aria embed song.mid --run contrastive-small --out song.parquet\n"
             "  aria embed ~/midi --model model.pt --device cuda --batch-size 64",
}


def build_parser() -> argparse.ArgumentParser:
    from pipelines.jobs import MAIN_JOB

    parser = argparse.ArgumentParser(prog="aria", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help=f"run the main job ({MAIN_JOB}) on the embedded demo corpus")
    demo.add_argument("--home", help="data home (default: $ARIA_HOME or ./.aria)")
    demo.add_argument("--probe-corpus", action="store_true",
                      help=f"build {PROBE_CORPUS_PIECES} pieces per collection instead of 80, so that every style "
                           "class and reel/jig/hornpipe has 100+ pieces (the corpus alone takes ~15 min on 2 cores)")
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
    gen = commands.add_parser("generate", help="continue a MIDI file with a pretrained model (Aria's `generate`)")
    gen.add_argument("prompt", help="MIDI file whose first --seconds are the prompt")
    which = gen.add_mutually_exclusive_group()
    which.add_argument("--model", help="a model.pt (default: the newest <home>/models/pretrain/*/model.pt)")
    which.add_argument("--run", help="use <home>/models/pretrain/RUN/model.pt")
    gen.add_argument("--seconds", type=float, default=15.0, help="prompt length in seconds (default 15)")
    gen.add_argument("--length", type=int, default=2048, help="new tokens per variation (default 2048)")
    gen.add_argument("--variations", type=int, default=4, help="continuations of the prompt (default 4)")
    gen.add_argument("--temperature", type=float, default=0.98, help="0 is greedy (default 0.98)")
    gen.add_argument("--min-p", type=float, default=0.035, help="min-p sampling threshold (default 0.035)")
    gen.add_argument("--top-p", type=float, help="sample top-p (0.5..1) instead of min-p")
    gen.add_argument("--end", action="store_true", help="force an ending (<D>) within the last 130 tokens")
    gen.add_argument("--seed", type=int, default=0, help="the same seed gives the same continuations")
    gen.add_argument("--out", help="output folder (default: generated/<prompt name>)")
    gen.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--compile", action="store_true", help="CUDA graphs for the decode step (GPU; compiles first)")
    compare = commands.add_parser("compare", help="compare MLflow training runs: differing params, final metrics, curves")
    which = compare.add_mutually_exclusive_group()
    which.add_argument("--name", default="pretrained_model",
                       help="run name to compare (default: pretrained_model, every pretraining step's run)")
    which.add_argument("--filter", help="an MLflow filter string instead, e.g. \"params.optim.lr = '0.001'\"")
    compare.add_argument("--experiment", default="aria", help="MLflow experiment (default: aria)")
    compare.add_argument("--metrics", default="train/loss,val/loss",
                         help="comma-separated metrics: final values and curves (default: train/loss,val/loss)")
    compare.add_argument("--plot", help="write the runs' metric curves overlaid to this PNG")
    compare.add_argument("--home", help="read HOME/mlflow.db (default: $MLFLOW_TRACKING_URI, else the "
                                        "mlflow.db of $ARIA_HOME or ./.aria)")
    embed = commands.add_parser("embed", help="embed MIDI files with a contrastive model into a Parquet file")
    embed.add_argument("input", metavar="FILE_OR_DIR", help="a MIDI file, or a folder searched for .mid/.midi")
    which = embed.add_mutually_exclusive_group()
    which.add_argument("--model", help="a model.pt (default: the newest <home>/models/contrastive/*/model.pt "
                                       "that is not a -scratch baseline)")
    which.add_argument("--run", help="use <home>/models/contrastive/RUN/model.pt")
    embed.add_argument("--out", default=EMBEDDINGS_FILE,
                       help=f"Parquet with path, embedding, n_chunks per file (default: {EMBEDDINGS_FILE})")
    embed.add_argument("--batch-size", type=int, default=32, help="chunks per forward pass (default 32)")
    embed.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    embed.add_argument("--home", help="data home to find the model in (default: $ARIA_HOME or ./.aria)")
    for name, sub in commands.choices.items():
        sub.epilog = EXAMPLES.get(name)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from pipelines.jobs import MAIN_JOB

        if os.environ.get("ARIA_SOURCE"):
            print("note: ARIA_SOURCE is set; `aria demo` ignores it and uses the demo corpus", file=sys.stderr)
        os.environ.pop("ARIA_SOURCE", None)
        env = prepare_environment(args.home, None)
        config = Path(env["DAGSTER_HOME"]) / "demo_run_config.yaml"
        config.write_text(json.dumps(demo_run_config(args.probe_corpus), indent=2))  # JSON is YAML
        code = run_job(MAIN_JOB, args.home, None, str(config))
        if code == 0:
            print_probe_results(Path(env["ARIA_HOME"]))
        return code
    if args.command == "run":
        return run_job(args.job, args.home, args.source, args.config, args.with_missing_upstream)
    if args.command == "generate":
        return generate_file(args)
    if args.command == "compare":
        return compare_runs(args)
    if args.command == "embed":
        return embed_midi(args)
    return tokenize_file(args.file, args.ids, args.seed)


if __name__ == "__main__":
    sys.exit(main())
