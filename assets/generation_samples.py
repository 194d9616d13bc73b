"""generation_samples: continuations of held-out prompts by the latest pretrained model.

For each prompt the model continues its first ``prompt_seconds`` in ``variations`` ways
(``aria_model.generation``, Aria's ``aria generate``), written as
``<home>/generation_samples/<prompt>/<n>.mid`` and ``<n>.png`` (piano roll). The metadata has
decoding speed, a tempo-drift table (the continuation's inter-onset intervals and grid alignment
against the prompt's) and one piano roll; the MIDI files and pictures are also artifacts of this
step's MLflow run. The folder holds the latest materialization's samples only.

Prompts: the ``prompts`` config (MIDI files or folders), else the first few files of the
token_shards test split (pieces the model never trained on), else the demo corpus.
"""


import math
import shutil
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from aria_model.midi import MidiError, load_midi
from aria_model.piano_roll import piano_roll
from aria_model.shards import MANIFEST_FILE, shard_paths
from aria_model.tokenizer import AbsTokenizer
from assets.metadata import figure_markdown, markdown_table
from assets.pretrained_model import ASSET_NAME as PRETRAINED_MODEL
from assets.raw_midi_manifest import manifest_path
from assets.token_shards import shards_root
from pipelines.resources import AriaHome, MlflowTracking

ASSET_NAME = "generation_samples"
MIDI_SUFFIXES = (".mid", ".midi")


class GenerationSamplesConfig(dg.Config):
    prompts: list[str] = []  # MIDI files or folders; empty: the token_shards test split, else the demo corpus
    n_prompts: int = 3  # how many default prompts (ignored when prompts are given)
    model_path: str | None = None  # None: pretrained_model's latest weights, or run_name's model.pt
    run_name: str | None = None  # <home>/models/pretrain/<run_name>/model.pt when there is no materialization
    variations: int = 2
    length: int = 512  # new tokens per variation; Aria's CLI default is 2048 (a GPU's worth)
    prompt_seconds: float = 15.0
    temperature: float = 0.98
    min_p: float = 0.035
    top_p: float | None = None  # set to sample top-p instead of min-p
    force_end: bool = False
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    compile: bool = False  # CUDA graphs for the decode step (worth it on a GPU)


def weights_path(context: dg.AssetExecutionContext, config: GenerationSamplesConfig, home: AriaHome) -> Path:
    """The model.pt to load: the config's path, else the one pretrained_model last reported
    (its ``weights`` metadata), else ``run_name``'s (the newest run's without one)."""
    from aria_model.generation import find_weights

    if config.model_path:
        return Path(config.model_path)
    if config.run_name is None:
        event = context.instance.get_latest_materialization_event(dg.AssetKey(PRETRAINED_MODEL))
        reported = event.asset_materialization.metadata.get("weights") if event else None
        if reported is not None and Path(reported.value).exists():
            return Path(reported.value)
    return find_weights(home.root, config.run_name)


def prompt_files(config: GenerationSamplesConfig, home: AriaHome) -> list[Path]:
    if config.prompts:
        files: list[Path] = []
        for entry in map(Path, config.prompts):
            files += sorted(p for p in entry.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES) if entry.is_dir() else [entry]
        return files
    return (held_out_files(home) or sorted(p for p in (home.root / "demo_corpus").rglob("*")
                                           if p.suffix.lower() in MIDI_SUFFIXES))[: config.n_prompts]


def held_out_files(home: AriaHome) -> list[Path]:
    """Source paths of the token_shards test split (by path), or none when there are no shards."""
    shards, manifest = shards_root(home), manifest_path(home)
    if not (shards / MANIFEST_FILE).exists() or not manifest.exists():
        return []
    test_ids = {file_id for shard in shard_paths(shards, "test")
                for file_id in pq.read_table(shard, columns=["file_id"])["file_id"].to_pylist()}
    rows = pq.read_table(manifest, columns=["file_id", "path"]).to_pylist()
    return sorted(Path(row["path"]) for row in rows if row["file_id"] in test_ids)


@dg.asset(
    name=ASSET_NAME,
    group_name="generation",
    kinds={"pytorch", "mlflow"},
    deps=[dg.AssetKey(PRETRAINED_MODEL)],
    pool="gpu",  # shares the GPU with training: see dagster.yaml
)
def generation_samples(context: dg.AssetExecutionContext, config: GenerationSamplesConfig, home: AriaHome,
                       mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Continue held-out prompts with the latest pretrained model: MIDI + piano rolls, decoding
    speed and tempo drift."""
    # torch loads in this step only, not in every process that loads the code location (ingest
    # steps, the UI)
    import torch

    from aria_model.generation import GenerationConfig, generate, load_generator, write_samples

    weights = weights_path(context, config, home)
    prompts = prompt_files(config, home)
    if not prompts:
        raise dg.Failure("no prompts: give `prompts`, or materialize token_shards or demo_corpus first")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = GenerationConfig(prompt_seconds=config.prompt_seconds, length=config.length,
                                variations=config.variations, temperature=config.temperature, min_p=config.min_p,
                                top_p=config.top_p, force_end=config.force_end, compile=config.compile)
    model = load_generator(weights, device)
    tokenizer = AbsTokenizer()
    out = home.root / ASSET_NAME
    shutil.rmtree(out, ignore_errors=True)
    rows, skipped, shown = [], [], None
    decoded_tokens, decode_s = 0, 0.0
    with mlflow.asset_run(context) as run_id:
        tracker = mlflow.tracker()
        tracker.log_params(run_id, settings)
        for name, path in _named(prompts):
            try:
                perf = load_midi(path)
            except (MidiError, OSError) as exc:
                context.log.warning(f"skipping prompt {path}: {exc}")
                skipped.append({"prompt": str(path), "reason": str(exc)})
                continue
            samples = generate(model, tokenizer, perf, settings, seed=config.seed)
            timing = samples[0].timing
            decoded_tokens += timing.batch * (timing.steps - 1)
            decode_s += timing.decode_s
            for sample, (midi, png) in zip(samples, write_samples(samples, out / name, title=name)):
                rows.append({"prompt": name, "variation": sample.index, "prompt_tokens": sample.prompt_len,
                             "new_tokens": sample.new_tokens, "ended": sample.finished,
                             "generated_notes": sample.continuation.n_notes, **sample.drift.row()})
                for artifact in (midi, png):
                    tracker.client.log_artifact(run_id, str(artifact), artifact_path=f"{ASSET_NAME}/{name}")
            shown = shown or (name, samples[0])
            context.log.info(f"{name}: {len(samples)} variations, {timing.tokens_per_s:.1f} tokens/s")
        metadata = {
            "dagster/row_count": len(rows),
            "prompts": len(prompts) - len(skipped),
            "samples": len(rows),
            "tokens_per_s": round(decoded_tokens / decode_s, 1) if decode_s else math.nan,
            "model": dg.MetadataValue.path(str(weights)),
            "device": device,
            "path": dg.MetadataValue.path(str(out)),
        }
        mlflow.log_metadata(run_id, metadata)
    metadata["drift"] = dg.MetadataValue.md(markdown_table(rows))
    if skipped:
        metadata["skipped"] = dg.MetadataValue.md(markdown_table(skipped))
    if shown:
        name, sample = shown
        metadata["piano_roll"] = figure_markdown(
            piano_roll(sample.prompt, sample.continuation, sample.prompt_end_ms, title=f"{name} variation 0"),
            "piano roll")
    return dg.MaterializeResult(metadata={**metadata, **mlflow.run_metadata(run_id)})


def _named(paths: list[Path]) -> list[tuple[str, Path]]:
    """A folder name per prompt: its file stem, numbered when two prompts share one."""
    named, seen = [], {}
    for path in paths:
        count = seen[path.stem] = seen.get(path.stem, 0) + 1
        named.append((path.stem if count == 1 else f"{path.stem}-{count}", path))
    return named
