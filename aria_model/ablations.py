"""The seed paper's follow-up experiments as sweeps: one MLflow run per variant, one table and plot per sweep.

Three sweeps, each a plain function over a data home (no Dagster; ``assets/ablations.py`` wraps them):

- ``contrastive_epochs_sweep``: contrastive fine-tunes of 0, 1, 5, 10, 25 epochs, from the
  pretrained LM and from random weights, each probed (linear probe, ``probe_eval``'s protocol) on
  the probe dataset's tasks. "0 epochs" is the network before any contrastive step, mean-pooled
  (final hidden states averaged per 300-note chunk, then over chunks): an untrained projection
  head at ``<E>`` would be a random linear map of one position's state, which says more about the
  draw of the head than about the representation, while the mean pool is the LM baseline the
  paper and ``probe_eval`` (``pretrained_mean_pool``) report, so the 0-epoch point lines up with it.
- ``data_scale_sweep``: pretraining on 10 / 25 / 50 / 100 % of the train split (the same model
  and the same number of steps), then the same contrastive fine-tune (on the full shards, so only
  the pretraining data varies) and probe; reports the validation loss (per token and per note, on
  the full val split) and the probe accuracies per fraction. A fraction keeps whole piece clusters:
  cluster ``c`` is in fraction ``f`` when a hash of ``c`` is below ``f`` (``in_fraction``), so the
  subsets are nested and never split a piece; each is written as its own shard set (``subset_shards``)
  with the val and test splits unchanged.
- ``tokenizer_sweep``: the same model, data and steps with ``AbsTokenizer`` and ``RelTokenizer``
  ids. Both shard sets are written from the token shards through notes (``retokenized_shards``):
  each stored file is decoded to its notes, given back its prefix metadata and tokenized again
  without ``<D>``, so both models see exactly the same quantised notes and differ only in how time
  is written (``<D>`` is left out of both because the data loader's ``<D>`` redraw knows the
  absolute layout only; the augmentation, absolute-only too, is off in both arms). Reports the
  validation loss per note (the summed loss over the val split over its note count, so token
  counts compare fairly) and the tempo drift of continuations of held-out prompts
  (``generation.tempo_drift``: inter-onset-interval ratio and on-grid fraction against the prompt).

MLflow layout (experiment ``aria`` unless told)::

    ablation-<sweep>                 kind=ablation; params ablation.*; summary.parquet + <sweep>.png
      <sweep>:<variant>              kind=ablation_variant; params ablation.<variable>=...; final metrics
        pretrain-... / contrastive-...   the training runs, nested (curves, config)

Outputs under ``<home>/ablations/<sweep>/``: ``summary.parquet`` (one row per variant: the sweep
variable(s), then metrics), ``<sweep>.png`` and ``runs/<variant>/`` (each training run's out_dir).
Every call trains every variant afresh (the variant folders are cleared first), so a summary never
mixes runs of two configurations.

    result = contrastive_epochs_sweep(home, home / "models/pretrain/pretrain-tiny/model.pt",
                                      ContrastiveConfig.preset("tiny"), epochs=(0, 1, 2))
    print(result.table.to_pandas())
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from aria_model.atomic_io import write_bytes_atomic, write_json_atomic, write_parquet_atomic
from aria_model.contrastive import SCRATCH
from aria_model.data import TokenWindows, WindowConfig
from aria_model.embedding import embed_performances, load_model, read_weights
from aria_model.generation import GenerationConfig, prompt_performance, sample_batch, tempo_drift
from aria_model.model import TransformerLM
from aria_model.note_tokenizer import NoteTokenizer
from aria_model.probe import probe_task
from aria_model.probe_config import PROBE_SEQ_LEN, PROBE_TASKS, ProbeConfig
from aria_model.probe_data import ProbeDataset
from aria_model.rel_tokenizer import RelTokenizer
from aria_model.shards import (
    MANIFEST_FILE,
    SHARD_SCHEMA,
    SPLITS,
    notes_performances,
    read_manifest,
    set_id,
    shard_paths,
)
from aria_model.sources import sha256_file
from aria_model.tokenizer import AbsTokenizer
from aria_model.tracking import Tracker
from aria_model.training.config import PretrainConfig
from aria_model.training.contrastive import ContrastiveConfig, contrastive
from aria_model.training.lm_module import masked_loss_sum
from aria_model.training.pretrain import pretrain

ABLATIONS_DIR = "ablations"
SUMMARY_FILE = "summary.parquet"
TOKENIZERS: dict[str, Callable[[], NoteTokenizer]] = {"abs": AbsTokenizer, "rel": RelTokenizer}
SCALE_SALT = "data_scale"  # keeps the subset draw independent of the split draw (salted by the shard seed)


@dataclass(frozen=True)
class ProbeSettings:
    """How each variant is probed: ``probe_eval``'s protocol (Aria's probe, 1024-token chunks)."""

    tasks: tuple[str, ...] = PROBE_TASKS  # those the probe dataset has are probed
    seq_len: int = PROBE_SEQ_LEN  # capped at the model's context
    batch_size: int = 32  # chunks per forward pass
    epochs: int = ProbeConfig.epochs
    seed: int = ProbeConfig.seed
    device: str = "cpu"


@dataclass(frozen=True)
class SweepTracking:
    """Where the sweep's runs go: the parent nests under ``parent_run_id`` (a Dagster step's run) if set."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///<home>/mlflow.db
    experiment: str = "aria"
    parent_run_id: str | None = None


@dataclass(frozen=True)
class SweepResult:
    name: str
    table: pa.Table  # the summary: one row per variant
    summary_path: Path
    plot_path: Path
    mlflow_run_id: str  # the sweep's parent run
    variant_run_ids: list[str]
    figure: object  # the matplotlib Figure of plot_path (Dagster shows it inline)


# -- probing -------------------------------------------------------------------------------------


def probe_accuracies(network: torch.nn.Module, pooling: str, dataset: ProbeDataset, notes_dir: Path,
                     settings: ProbeSettings = ProbeSettings()) -> dict[str, float]:
    """``<task>/accuracy`` and ``<task>/macro_f1`` of the linear probe on ``network``'s embeddings
    (``pooling`` "eos" for a contrastive model, "mean" for an LM) of the probe files in ``midi_notes``."""
    network = network.to(settings.device).eval()
    file_ids = dataset.table["file_id"].to_pylist()
    embedded = embed_performances(network, notes_performances(notes_dir, file_ids), settings.batch_size,
                                  min(settings.seq_len, network.config.max_seq_len), pooling=pooling)
    features = embedded.by_key()
    if len(features) < len(set(file_ids)):  # files outside the corpus or without notes: left out, as probe_eval does
        dataset = ProbeDataset(dataset.table.filter(pc.field("file_id").isin(sorted(features))), dataset.reports)
    config = ProbeConfig(epochs=settings.epochs, seed=settings.seed)
    metrics = {}
    for task in [t for t in settings.tasks if t in dataset.tasks]:
        result = probe_task(dataset, task, features, method=pooling, config=config)
        metrics[f"{task}/accuracy"] = result.accuracy
        metrics[f"{task}/macro_f1"] = result.macro_f1
    return metrics


# -- validation loss per note --------------------------------------------------------------------


def note_count(ids: np.ndarray, tokenizer: NoteTokenizer) -> int:
    """Notes (and drum hits) in ``ids``: both tokenizers write exactly one note or drum token per note."""
    ids = np.asarray(ids)
    return int(np.count_nonzero((ids >= tokenizer.layout.note) & (ids < tokenizer.layout.dur)))


def summed_loss(model: TransformerLM, batches: Iterator) -> tuple[float, int]:
    """(summed cross-entropy, predicted tokens) over ``(input, target, loss_mask)`` batches."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for inputs, targets, mask in batches:
            loss, n = masked_loss_sum(model(inputs.to(device).long()), targets.to(device).long(), mask.to(device))
            total += float(loss)
            count += int(n)
    return total, count


def split_notes(shards_root: Path, split: str, tokenizer: NoteTokenizer) -> int:
    return sum(note_count(np.asarray(ids), tokenizer) for path in shard_paths(shards_root, split)
               for ids in pq.read_table(path, columns=["ids"])["ids"].to_numpy(zero_copy_only=False))


def validation_loss_per_note(model: TransformerLM, shards_root: Path, tokenizer: NoteTokenizer, seq_len: int,
                             batch_size: int = 8, split: str = "val") -> dict[str, float]:
    """The whole split's summed loss over its notes (and over its predicted tokens, for reference).

    Windows are the stored ids cut as for validation (no augmentation, no redraw), so the
    numerator is every predicted token's loss; dividing by notes rather than tokens compares
    tokenizers that spend different numbers of tokens per note.
    """
    windows = TokenWindows(shards_root, split, WindowConfig.for_split(split, seq_len=seq_len))
    total, tokens = summed_loss(model, iter(DataLoader(windows, batch_size=batch_size)))
    notes = split_notes(shards_root, split, tokenizer)
    return {"val_loss_per_note": total / notes if notes else math.nan,
            "val_loss_per_token": total / tokens if tokens else math.nan,
            "val_notes": notes, "val_tokens": tokens}


# -- shard sets derived from the token shards ----------------------------------------------------


def in_fraction(cluster_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a piece cluster is in the ``fraction`` subset: a uniform draw from its hash below
    ``fraction``, so a cluster in one fraction is in every larger one."""
    digest = hashlib.sha256(f"{SCALE_SALT}:{seed}:{cluster_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def subset_shards(source: Path, target: Path, fraction: float, seed: int = 0) -> Path:
    """A shard set at ``target`` whose train split keeps the clusters ``in_fraction``; val and test
    as they are. The data loader reads it like any token_shards folder."""
    def keep(split: str, rows: pa.Table) -> pa.Table:
        if split != "train":
            return rows
        mask = [in_fraction(c, fraction, seed) for c in rows["cluster_id"].to_pylist()]
        return rows.filter(pa.array(mask, pa.bool_()))

    return _derived_shard_set(source, target, keep, {"subset": {"fraction": fraction, "seed": seed,
                                                                "salt": SCALE_SALT}})


def retokenized_shards(source: Path, target: Path, tokenizer_name: str) -> Path:
    """A shard set at ``target`` with every file's stored ids decoded to notes and tokenized again
    by ``tokenizer_name`` without ``<D>`` (prefix metadata restored from the row)."""
    source_tokenizer = AbsTokenizer()  # what aria_model.shards writes
    tokenizer = TOKENIZERS[tokenizer_name]()

    def retokenize(split: str, rows: pa.Table) -> pa.Table:
        ids = []
        for stored, prefix in zip(rows["ids"].to_numpy(zero_copy_only=False), rows["prefix_metadata"].to_pylist()):
            perf = dataclasses.replace(source_tokenizer.detokenize_ids(stored), metadata=json.loads(prefix))
            ids.append(tokenizer.tokenize_ids(perf, add_dim_tok=False).astype(np.uint16))
        return rows.set_column(2, "ids", pa.array(ids, pa.list_(pa.uint16()))).set_column(
            3, "n_tokens", pa.array([len(x) for x in ids], pa.int32()))

    header = {"tokenizer": {"name": tokenizer.name, "config_hash": tokenizer.config.config_hash(),
                            "vocab_size": tokenizer.vocab_size},
              "stored_ids": f"{type(tokenizer).__name__}.tokenize_ids of the source set's decoded notes, "
                            "prefix tokens in vocabulary order, no <D>, <E> last"}
    return _derived_shard_set(source, target, retokenize, {**header, "retokenized": tokenizer_name})


def _derived_shard_set(source: Path, target: Path, transform: Callable[[str, pa.Table], pa.Table],
                       changes: Mapping) -> Path:
    """Write ``transform(split, row group)`` of every row group of ``source`` to ``target`` (row groups
    kept as row groups, empty ones dropped) with a manifest listing the new shards; returns ``target``."""
    source = Path(source).resolve()
    manifest = read_manifest(source)
    if target.exists():
        shutil.rmtree(target)
    splits = {}
    for split in SPLITS:
        shards, clusters = [], set()
        for path in shard_paths(source, split):
            name = str(path.relative_to(source))
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            entry = {"name": name, "rows": 0, "tokens": 0, "row_groups": 0}
            parquet = pq.ParquetFile(path)
            with pq.ParquetWriter(target / name, SHARD_SCHEMA, compression="zstd") as writer:
                for group in range(parquet.num_row_groups):
                    rows = transform(split, parquet.read_row_group(group).cast(SHARD_SCHEMA))
                    if rows.num_rows:
                        writer.write_table(rows.combine_chunks(), row_group_size=rows.num_rows)
                        entry["rows"] += rows.num_rows
                        entry["tokens"] += int(pc.sum(rows["n_tokens"]).as_py())
                        entry["row_groups"] += 1
                        clusters.update(rows["cluster_id"].to_pylist())
            if entry["rows"]:
                shards.append(entry | {"sha256": sha256_file(target / name)})
            else:
                (target / name).unlink()
        splits[split] = {"files": sum(s["rows"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                         "clusters": len(clusters), "shards": shards}
    derived = {**manifest, **changes, "splits": splits, "derived_from": set_id(manifest),
               "build": {"mode": "derived", "source": str(source)}}
    write_json_atomic(derived, target / MANIFEST_FILE)
    return target


# -- generation drift ----------------------------------------------------------------------------


def continuation_drift(model: TransformerLM, tokenizer: NoteTokenizer, perf, config: GenerationConfig,
                       seed: int = 0) -> list[dict[str, float]]:
    """``tempo_drift`` of each of ``config.variations`` continuations of ``perf``'s first
    ``config.prompt_seconds``, for either tokenizer: the prompt and its continuation are decoded
    together (one clock) and split at the prompt's note count."""
    prompt = tokenizer.tokenize_ids(prompt_performance(perf, config.prompt_seconds), add_dim_tok=False,
                                    add_eos_tok=False).astype(np.int64)
    n_prompt_notes = tokenizer.detokenize_ids(prompt).n_notes
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    batch, _ = sample_batch(model, tokenizer, prompt, config, generator)
    rows = []
    for ids in batch.cpu().numpy():
        onsets = tokenizer.detokenize_ids(ids[ids != tokenizer.pad_id]).onset_ms(False)
        rows.append(tempo_drift(onsets[:n_prompt_notes], onsets[n_prompt_notes:]).row())
    return rows


# -- MLflow and outputs --------------------------------------------------------------------------


class _Sweep:
    """One sweep's parent run, its variants' runs, its folder and its summary rows."""

    def __init__(self, name: str, home: Path, tracking: SweepTracking, params: Mapping):
        self.name, self.home = name, Path(home)
        self.folder = self.home / ABLATIONS_DIR / name
        self.tracker = Tracker(tracking.tracking_uri, home=self.home)
        self.tracking = tracking
        self.params = {f"ablation.{key}": value for key, value in params.items()}
        self.rows: list[dict] = []
        self.variant_run_ids: list[str] = []
        self.run_id = ""

    @contextmanager
    def parent(self) -> Iterator[_Sweep]:
        with self.tracker.open_run(f"ablation-{self.name}", parent_run_id=self.tracking.parent_run_id,
                                   experiment=self.tracking.experiment, kind="ablation") as run_id:
            self.run_id = run_id
            self.tracker.log_params(run_id, {"ablation.sweep": self.name, **self.params})
            yield self

    @contextmanager
    def variant(self, label: str, variables: Mapping) -> Iterator[tuple[str, Path]]:
        """A nested run for one variant (params: the sweep's and this variant's variables) and its
        emptied folder; the caller adds the metrics row with ``record``."""
        out = self.folder / "runs" / label
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        with self.tracker.open_run(f"{self.name}:{label}", parent_run_id=self.run_id,
                                   kind="ablation_variant") as run_id:
            self.tracker.log_params(run_id, {**self.params, "ablation.sweep": self.name, "ablation.variant": label,
                                             **{f"ablation.{k}": v for k, v in variables.items()}})
            self.variant_run_ids.append(run_id)
            yield run_id, out

    def record(self, run_id: str, variables: Mapping, metrics: Mapping[str, float]) -> None:
        self.tracker.log_summary(run_id, metrics)
        self.rows.append({**variables, **metrics})

    def tracked(self, config, run_id: str):
        """A training config logging to a run nested under the variant's ``run_id`` in this sweep's
        store, registering nothing (the registry holds the pipeline's models, not every variant's)."""
        return replace(config, tracking=replace(config.tracking, tracking_uri=self.tracker.tracking_uri,
                                                experiment=self.tracking.experiment, run_id="",
                                                parent_run_id=run_id, register_as="", enabled=True))

    def finish(self, plot: Callable[[pa.Table], object]) -> SweepResult:
        """summary.parquet and the plot, on disk and as the parent run's artifacts and metrics."""
        table = pa.Table.from_pylist(self.rows)
        summary = self.folder / SUMMARY_FILE
        write_parquet_atomic(table, summary)
        figure = plot(table)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plot_path = self.folder / f"{self.name}.png"
        write_bytes_atomic(plot_path, buffer.getvalue())
        client = self.tracker.client
        client.log_artifact(self.run_id, str(summary))
        client.log_artifact(self.run_id, str(plot_path))
        client.log_table(self.run_id, table.to_pandas(), "summary.json")
        return SweepResult(self.name, table, summary, plot_path, self.run_id, list(self.variant_run_ids), figure)


def _figure(table: pa.Table, x: str, panels: Sequence[tuple[str, str]], series: str | None = None, log_x=False):
    """One panel per (metric column, title), ``x`` on the horizontal axis, one line per ``series`` value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(column, title) for column, title in panels if column in table.column_names]
    figure = Figure(figsize=(4.2 * max(len(panels), 1), 3.4), dpi=100)
    FigureCanvasAgg(figure)
    rows = table.to_pylist()
    groups = sorted({row[series] for row in rows}) if series else [None]
    for index, (column, title) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        for group in groups:
            points = sorted((row[x], row[column]) for row in rows if series is None or row[series] == group)
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=str(group) if series else None)
        if log_x:
            axes.set_xscale("symlog", linthresh=1)
        axes.set_xlabel(x)
        axes.set_title(title, fontsize=9)
        if series:
            axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _probe_panels(settings: ProbeSettings) -> list[tuple[str, str]]:
    return [(f"{task}/accuracy", f"{task} probe accuracy") for task in settings.tasks]


# -- the sweeps ----------------------------------------------------------------------------------


def contrastive_epochs_sweep(home: Path, pretrained_weights: Path, base: ContrastiveConfig, dataset: ProbeDataset,
                             epochs: Sequence[int] = (0, 1, 5, 10, 25), inits: Sequence[str] = ("pretrained", SCRATCH),
                             probe: ProbeSettings = ProbeSettings(), tracking: SweepTracking = SweepTracking(),
                             report: Callable[[str], None] = print) -> SweepResult:
    """Probe accuracy per contrastive epoch count, from ``pretrained_weights`` and from scratch.

    ``base``'s data, optimizer and batch apply to every variant; its model is the pretrained one's
    shape for both inits (so the scratch network is the same network), its ``train.epochs`` is the
    sweep's and ``train.max_steps`` is cleared.
    """
    home = Path(home)
    _, pretrained_shape = read_weights(pretrained_weights)
    model = replace(pretrained_shape or base.model, emb_size=base.model.emb_size)
    notes_dir = Path(base.data.notes or home / "midi_notes")
    base = replace(base, model=model, data=replace(base.data, shards=base.data.shards or str(home / "token_shards"),
                                                   notes=str(notes_dir)))
    sweep = _Sweep("contrastive_epochs", home, tracking, {"epochs": list(epochs), "inits": list(inits),
                                                          "probe_tasks": list(probe.tasks)})
    with sweep.parent():
        for init in inits:
            for n in epochs:
                label = f"{init}-e{n}"
                variables = {"init": init, "epochs": n}
                with sweep.variant(label, variables) as (run_id, out):
                    if n == 0:
                        network, pooling, steps = _untrained(pretrained_weights if init != SCRATCH else None,
                                                             model, base.train.seed), "mean", 0
                    else:
                        config = sweep.tracked(replace(base, init=str(pretrained_weights) if init != SCRATCH else SCRATCH,
                                                  train=replace(base.train, epochs=n, max_steps=0),
                                                  run_name=f"contrastive-{label}", out_dir=str(out)),
                                          run_id)
                        result = contrastive(config, report)
                        network, pooling, steps = load_model(result.weights), "eos", result.steps
                    metrics = {"steps": steps, **probe_accuracies(network, pooling, dataset, notes_dir, probe)}
                    report(f"contrastive_epochs {label}: " + _line(metrics))
                    sweep.record(run_id, variables, metrics)
        return sweep.finish(lambda table: _figure(table, "epochs", _probe_panels(probe), series="init", log_x=True))


def _untrained(weights: Path | None, model, seed: int) -> TransformerLM:
    """The LM the 0-epoch variant probes: the pretrained weights, or a seeded random init of the same shape."""
    if weights is not None:
        return load_model(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformerLM(replace(model, emb_size=None)).eval()


def data_scale_sweep(home: Path, pretrain_base: PretrainConfig, contrastive_base: ContrastiveConfig,
                     dataset: ProbeDataset, fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
                     probe: ProbeSettings = ProbeSettings(), tracking: SweepTracking = SweepTracking(),
                     report: Callable[[str], None] = print) -> SweepResult:
    """Pretrain on each fraction of the train split (same model, same steps), fine-tune and probe.

    Validation is on the full val split for every fraction; the contrastive step reads the full
    shards, so only the pretraining data differs between variants.
    """
    home = Path(home)
    shards = Path(pretrain_base.data.shards or home / "token_shards").resolve()
    notes_dir = Path(contrastive_base.data.notes or home / "midi_notes")
    seed = read_manifest(shards).get("seed", 0)
    sweep = _Sweep("data_scale", home, tracking, {"fractions": list(fractions), "probe_tasks": list(probe.tasks)})
    tokenizer = AbsTokenizer()
    with sweep.parent():
        for fraction in sorted(fractions):
            label = f"f{fraction:g}"
            variables = {"fraction": float(fraction)}
            with sweep.variant(label, variables) as (run_id, out):
                subset = shards if fraction >= 1 else subset_shards(shards, out / "shards", fraction, seed)
                train = read_manifest(subset)["splits"]["train"]
                if not train["files"]:
                    raise ValueError(f"fraction {fraction} of {shards} keeps no training file: use a larger one")
                trained = pretrain(sweep.tracked(replace(pretrain_base, data=replace(pretrain_base.data, shards=str(subset)),
                                                    run_name=f"pretrain-{label}", out_dir=str(out / "pretrain")),
                                            run_id), report)
                lm = load_model(trained.weights)
                loss = validation_loss_per_note(lm, subset, tokenizer, pretrain_base.data.seq_len or lm.config.max_seq_len,
                                                pretrain_base.data.batch_size)
                tuned = contrastive(sweep.tracked(replace(contrastive_base, init=str(trained.weights),
                                                     data=replace(contrastive_base.data, shards=str(shards),
                                                                  notes=str(notes_dir)),
                                                     run_name=f"contrastive-{label}", out_dir=str(out / "contrastive")),
                                             run_id), report)
                metrics = {"train_files": train["files"], "train_tokens": train["tokens"],
                           "train_clusters": train["clusters"], "pretrain_steps": trained.steps,
                           "val_loss": trained.val_loss, **loss,
                           **probe_accuracies(load_model(tuned.weights), "eos", dataset, notes_dir, probe)}
                report(f"data_scale {label}: " + _line(metrics))
                sweep.record(run_id, variables, metrics)
        return sweep.finish(lambda table: _figure(
            table, "fraction", [("val_loss_per_note", "val loss per note"), *_probe_panels(probe)]))


def tokenizer_sweep(home: Path, pretrain_base: PretrainConfig, tokenizers: Sequence[str] = ("abs", "rel"),
                    prompts: int = 3, generation: GenerationConfig = GenerationConfig(variations=2, length=256,
                                                                                      prompt_seconds=10.0),
                    tracking: SweepTracking = SweepTracking(), report: Callable[[str], None] = print) -> SweepResult:
    """Absolute vs relative time: the same model, notes and steps; validation loss per note and the
    tempo drift of continuations of the first ``prompts`` held-out files (test split, else val)."""
    home = Path(home)
    shards = Path(pretrain_base.data.shards or home / "token_shards").resolve()
    source_tokenizer = AbsTokenizer()
    sweep = _Sweep("tokenizer", home, tracking, {"tokenizers": list(tokenizers), "prompts": prompts,
                                                 "generation.length": generation.length})
    with sweep.parent():
        for name in tokenizers:
            tokenizer = TOKENIZERS[name]()
            variables = {"tokenizer": name}
            with sweep.variant(name, variables) as (run_id, out):
                retokenized = retokenized_shards(shards, out / "shards", name)
                # Augmentation reads absolute ids only: off in both arms so the data is the same.
                config = replace(pretrain_base, data=replace(pretrain_base.data, shards=str(retokenized), augment=False),
                                 run_name=f"pretrain-{name}", out_dir=str(out / "pretrain"))
                trained = pretrain(sweep.tracked(config, run_id), report)
                lm = load_model(trained.weights)
                loss = validation_loss_per_note(lm, retokenized, tokenizer,
                                                pretrain_base.data.seq_len or lm.config.max_seq_len,
                                                pretrain_base.data.batch_size)
                drift = [row for index, perf in enumerate(_held_out(shards, source_tokenizer, prompts))
                         for row in continuation_drift(lm, tokenizer, perf, generation, seed=index)]
                metrics = {"pretrain_steps": trained.steps, "train_tokens": read_manifest(retokenized)["splits"]
                           ["train"]["tokens"], **loss, **_mean_drift(drift)}
                report(f"tokenizer {name}: " + _line(metrics))
                sweep.record(run_id, variables, metrics)
        return sweep.finish(lambda table: _bars(table, "tokenizer", [
            ("val_loss_per_note", "val loss per note"), ("ioi_ratio", "IOI ratio (1 = prompt's pace)"),
            ("continuation_on_grid", "on-grid fraction (prompt: dashed)")]))


def _held_out(shards: Path, tokenizer: AbsTokenizer, count: int) -> list:
    """The notes of the first ``count`` files of the test split (the val split when test is empty)."""
    split = "test" if read_manifest(shards)["splits"]["test"]["files"] else "val"
    performances = []
    for path in shard_paths(shards, split):
        for ids in pq.read_table(path, columns=["ids"])["ids"].to_numpy(zero_copy_only=False):
            if len(performances) == count:
                return performances
            performances.append(tokenizer.detokenize_ids(ids))
    return performances


def _mean_drift(rows: list[dict[str, float]]) -> dict[str, float]:
    """Means over the continuations (NaN-skipping: a continuation with too few events has none)."""
    keys = ("ioi_ratio", "prompt_on_grid", "continuation_on_grid")
    with np.errstate(all="ignore"):
        means = {key: float(np.nanmean([row[key] for row in rows])) if rows else math.nan for key in keys}
    return {**means, "continuations": len(rows)}


def _bars(table: pa.Table, x: str, panels: Sequence[tuple[str, str]]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.0 * len(panels), 3.4), dpi=100)
    FigureCanvasAgg(figure)
    labels = table[x].to_pylist()
    for index, (column, title) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        axes.bar(labels, table[column].to_pylist())
        if column == "continuation_on_grid":
            axes.hlines(table["prompt_on_grid"].to_pylist(), [i - 0.4 for i in range(len(labels))],
                        [i + 0.4 for i in range(len(labels))], colors="black", linestyles="dashed")
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def _line(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
