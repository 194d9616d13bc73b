"""Embedded demo corpus: real music from music21's bundled corpus, written as piano MIDI.

No dataset can be downloaded at run time, so the demo pipeline's music comes from the corpus that
`pip install music21` brings (BSD, no network). This module picks a fixed, seeded subset of five
collections, converts each piece to a MIDI file in parallel worker processes, and keeps the labels
the music itself carries (composer collection, title, ABC tune type `R:` and origin `O:`):

    collection      source files                     one piece is          labels
    bach            .mxl / .xml / .krn chorales      a file                composer, title
    palestrina      .krn mass movements              a file                composer, title
    ryansMammoth    .abc, one tune per file          a file                title, tune_type
    essenFolksong   .abc opus, ~300 tunes per file   a tune (X: block)     title, region, origin
    oneills1850     .abc opus, ~50 tunes per file    a tune (X: block)     title, tune_type

Every part is written as piano (program 0, never the drum channel 9): music21 writes vocal
collections as Voice Oohs (program 53), and a model or probe would read the label off the
instrument instead of the music.

Output: `<out_dir>/<collection>/<slug>.mid` plus `<out_dir>/demo_metadata.json`:

    {"version": 1,                      # FORMAT_VERSION: bumping it rebuilds every cached file
     "config": {"collections": [...], "pieces_per_collection": 80, "seed": 0},
     "pieces": {"bach/bwv1.6.mid": {"collection", "composer", "title", "tune_type", "region",
                                    "origin", "source", "tune_index", "tune_number",
                                    "repeats_expanded", "music21_version"}},
     "failed": {"<relpath>": "<error message>"}}

The metadata file is the index of the build: it lists exactly the pieces the config selects.
Files left from an earlier, bigger config stay on disk (as cache) but are not listed, so read the
metadata rather than globbing for `*.mid`.

The build is cached and resumable: a piece whose file exists and is listed in the metadata of the
same FORMAT_VERSION and music21 version is not converted again; the metadata is checkpointed every
CHECKPOINT_EVERY pieces, so a killed build loses little. Selection is a seeded shuffle of the
sorted, de-duplicated listing, cut to size, so a bigger count keeps every piece of a smaller one
(tiny ⊂ demo ⊂ full) and growing a config converts only the new pieces.

Presets (music21 10.5.1, fresh output folder, 2 cores; CPU time is the sum over both workers):
    tiny    3 per collection,     15 pieces: ~2 s
    demo   80 per collection,    400 pieces: 80-87 CPU-s; 79-90 s wall measured while other jobs
                                             held about one of the two cores (~45 s when idle)
    full   everything,        13,121 pieces: ~35 CPU-min (0 failures; 38 tunes with malformed
                                             repeat marks are played through once)
Palestrina dominates (~0.55 CPU-s a piece, Bach ~0.16, an ABC tune 0.06-0.25).

Run:
    python -m aria_model.demo_corpus OUT_DIR [--preset demo] [--workers N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import mido
import music21
from music21 import bar, converter, corpus, instrument, key, meter, midi, repeat, spanner, stream, tempo

from aria_model.atomic_io import remove_partial_files, write_bytes_atomic

FORMAT_VERSION = 1  # bump when conversion changes, so cached files are rebuilt
METADATA_FILE = "demo_metadata.json"
COLLECTIONS = ("bach", "palestrina", "ryansMammoth", "essenFolksong", "oneills1850")
DRUM_CHANNEL = 9  # General MIDI channel 10, 0-indexed
TUNES_PER_TASK = 50  # ABC tunes converted per worker task (the file is read and split once)
CHECKPOINT_EVERY = 200  # pieces between metadata checkpoints, so a killed full build resumes

# music21 files these collections under a composer (`corpus.getComposer`); the scores' own
# composer fields are inconsistent ("J.S. Bach", "Bach, Johann Sebastian", or missing).
COMPOSER_OF_COLLECTION = {"bach": "bach", "palestrina": "palestrina"}

# Preferred format first: a chorale shipped as both .mxl and .krn is converted once, from .mxl.
# Suffixes not listed (.rntxt harmonic analyses) are skipped.
SUFFIX_PREFERENCE = {".mxl": 0, ".xml": 1, ".krn": 2, ".abc": 0}

# Spellings of one dance in the R: fields. O'Neill and Ryan write "jig" and "double jig" for the
# same 6/8 double jig; "fling" is the highland fling.
TUNE_TYPE_ALIASES = {"slipjig": "slip jig", "double jig": "jig", "fling": "highland fling"}
COLLECTIONS_WITH_TUNE_TYPE = {"ryansMammoth", "oneills1850"}  # Essen's R: holds song genres

ABC_FIELD = re.compile(r"^([A-Za-z]):(.*)$")
ONEILL_NUMBER = re.compile(r"o'neill's\s+(\d+)", re.IGNORECASE)
UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
CONTEXT_MARKS = (meter.TimeSignature, key.KeySignature, tempo.MetronomeMark)


@dataclass(frozen=True)
class DemoCorpusConfig:
    """Which pieces to build: `pieces_per_collection` from each collection (None = all)."""

    collections: tuple[str, ...] = COLLECTIONS
    pieces_per_collection: int | None = 80  # 400 pieces: about a minute on 2 cores
    seed: int = 0
    workers: int | None = None  # None: os.cpu_count(); 1: convert in this process

    def __post_init__(self) -> None:
        # Accept a list, store a tuple: the config stays hashable and compares equal either way.
        object.__setattr__(self, "collections", tuple(self.collections))
        unknown = set(self.collections) - set(COLLECTIONS)
        if unknown:
            raise ValueError(f"unknown collections {sorted(unknown)}; known: {COLLECTIONS}")
        if self.pieces_per_collection is not None and self.pieces_per_collection < 0:
            raise ValueError("pieces_per_collection must be >= 0 or None")
        if self.workers is not None and self.workers < 1:
            raise ValueError("workers must be >= 1 or None")

    @classmethod
    def preset(cls, name: str) -> DemoCorpusConfig:
        presets = {
            "tiny": cls(pieces_per_collection=3),
            "demo": cls(),
            "full": cls(pieces_per_collection=None),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(presets)}")
        return presets[name]

    def selection(self) -> dict:
        """The fields that decide what is built (workers only decide how fast)."""
        return {
            "collections": list(self.collections),
            "pieces_per_collection": self.pieces_per_collection,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class DemoPiece:
    """One piece to build: a score file, or one tune (X: block) of an ABC file."""

    collection: str
    source: str  # path inside music21's corpus folder, e.g. "bach/bwv1.6.mxl"
    tune_index: int  # 1-based position of the tune in its source file (1 for one-piece files)
    tune_number: str | None  # the ABC X: field
    slug: str
    abc_title: str | None = None
    tune_type: str | None = None
    region: str | None = None
    origin: str | None = None

    @property
    def relpath(self) -> str:
        return f"{self.collection}/{self.slug}.mid"


@dataclass(frozen=True)
class DemoCorpusReport:
    selected: int
    converted: int
    cached: int
    failed: int
    per_collection: dict[str, dict[str, int]]  # collection -> selected/converted/cached/failed
    failures: dict[str, str]  # relpath -> error message
    seconds: float
    metadata_path: Path


@dataclass(frozen=True)
class AbcTune:
    """One tune of an ABC file: its 1-based position, header fields and full text."""

    index: int
    header: dict[str, str]  # first value of each header field, e.g. {"T": ..., "R": ...}
    text: str


@dataclass
class _PieceResult:
    relpath: str
    labels: dict | None = None
    error: str | None = None


@dataclass
class _BuildState:
    """What the metadata file will say, filled in as results arrive."""

    config: DemoCorpusConfig
    pieces: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def corpus_root() -> Path:
    return Path(music21.__file__).parent / "corpus"


# ---------------------------------------------------------------------------------------------
# Listing and selection


def list_demo_pieces(config: DemoCorpusConfig) -> list[DemoPiece]:
    """The pieces `config` selects, in corpus order per collection; converts nothing."""
    pieces = []
    for collection in config.collections:
        candidates = _collection_candidates(collection)
        pieces += _seeded_subset(candidates, config.pieces_per_collection, f"{config.seed}:{collection}")
    return pieces


def _seeded_subset(candidates: tuple[DemoPiece, ...], count: int | None, seed: str) -> list[DemoPiece]:
    if count is None or count >= len(candidates):
        return list(candidates)
    # A shuffle (not random.sample) so that a bigger count extends a smaller one's choice.
    positions = list(range(len(candidates)))
    random.Random(seed).shuffle(positions)
    return [candidates[position] for position in sorted(positions[:count])]


@functools.cache  # the installed corpus does not change while a process runs
def _collection_candidates(collection: str) -> tuple[DemoPiece, ...]:
    """Every distinct piece of a collection, in sorted source order."""
    seen_identities = set()
    pieces = []
    for path in _collection_sources(collection):
        for piece, identity in _pieces_in_source(collection, path):
            if identity not in seen_identities:
                seen_identities.add(identity)
                pieces.append(piece)
    slugs = [piece.slug for piece in pieces]
    if len(set(slugs)) != len(slugs):
        raise RuntimeError(f"{collection}: two pieces share a file name")
    return tuple(pieces)


def _collection_sources(collection: str) -> list[Path]:
    paths = [
        path
        for path in corpus.getComposer(collection)
        if path.suffix in SUFFIX_PREFERENCE
    ]
    return sorted(paths, key=lambda path: (path.stem, SUFFIX_PREFERENCE[path.suffix], path.name))


def _pieces_in_source(collection: str, path: Path) -> Iterable[tuple[DemoPiece, tuple]]:
    source = path.relative_to(corpus_root()).as_posix()
    if path.suffix != ".abc":
        # Same stem = same chorale in another format.
        yield DemoPiece(collection, source, 1, None, _safe_name(path.stem)), (path.stem,)
        return
    tunes = read_abc_tunes(path)
    for tune in tunes:
        slug = _safe_name(path.stem if len(tunes) == 1 else f"{path.stem}_{tune.index:04d}")
        yield _abc_piece(collection, source, slug, tune), _tune_identity(collection, source, tune)


def _abc_piece(collection: str, source: str, slug: str, tune: AbcTune) -> DemoPiece:
    origin = tune.header.get("O") or None
    tune_type = tune.header.get("R") if collection in COLLECTIONS_WITH_TUNE_TYPE else None
    return DemoPiece(
        collection=collection,
        source=source,
        tune_index=tune.index,
        tune_number=tune.header.get("X"),
        slug=slug,
        abc_title=tune.header.get("T") or None,
        tune_type=normalise_tune_type(tune_type),
        region=_most_specific_place(origin),
        origin=origin,
    )


def _tune_identity(collection: str, source: str, tune: AbcTune) -> tuple:
    """Key under which two ABC tunes are the same piece (first in sorted order is kept)."""
    if collection == "oneills1850":
        # Overlapping files (0626-0635 / 0626-0700, *_bs / *_mh) transcribe the same numbers.
        number = ONEILL_NUMBER.search(tune.header.get("B", ""))
        if number:
            return ("oneill", int(number.group(1)))
    if collection == "essenFolksong":
        # music21's test*.abc fixtures repeat tunes of the other files; N: is the Essen id,
        # shared by regional variants that differ in O:.
        return ("essen", tune.header.get("N"), tune.header.get("O"), tune.header.get("T"))
    return (source, tune.index)


def read_abc_tunes(path: Path) -> list[AbcTune]:
    """Split an ABC file into its tunes (blocks starting at `X:`), with their header fields."""
    blocks = re.split(r"(?m)^(?=X:)", path.read_text(encoding="utf-8"))
    tune_blocks = [block for block in blocks if block.startswith("X:")]
    return [AbcTune(index, _abc_header(block), block) for index, block in enumerate(tune_blocks, 1)]


def _abc_header(tune_text: str) -> dict[str, str]:
    header: dict[str, str] = {}
    for line in tune_text.splitlines():
        match = ABC_FIELD.match(line)
        if match:
            header.setdefault(match.group(1), match.group(2).strip())
        if line.startswith("K:"):  # the key line ends the header
            break
    return header


def _most_specific_place(origin: str | None) -> str | None:
    """"Europa, Mitteleuropa, Deutschland" -> "Deutschland"; the O: field runs wide to narrow."""
    place = origin.split(",")[-1].strip() if origin else ""
    return place or None


def normalise_tune_type(raw: str | None) -> str | None:
    if not raw:
        return None
    spelled = " ".join(raw.lower().split())
    return TUNE_TYPE_ALIASES.get(spelled, spelled)


def _safe_name(name: str) -> str:
    return UNSAFE_FILENAME_CHARS.sub("_", name)


# ---------------------------------------------------------------------------------------------
# Conversion (runs in worker processes)


def _convert_source(source: str, pieces: list[DemoPiece], out_dir: Path) -> list[_PieceResult]:
    """Convert the selected pieces of one source file; an ABC opus is read and split once."""
    path = corpus_root() / source
    tunes = {tune.index: tune for tune in read_abc_tunes(path)} if path.suffix == ".abc" else None
    return [_convert_piece(piece, path, tunes, out_dir) for piece in pieces]


def _convert_piece(
    piece: DemoPiece, path: Path, tunes: dict[int, AbcTune] | None, out_dir: Path
) -> _PieceResult:
    try:
        score = parse_piece(path, tunes[piece.tune_index].text if tunes is not None else None)
        midi_bytes, repeats_expanded = score_to_piano_midi(score)
        write_bytes_atomic(out_dir / piece.relpath, midi_bytes)
        return _PieceResult(piece.relpath, labels=_labels(piece, score, repeats_expanded))
    except Exception as error:  # one bad piece must not stop the build
        return _PieceResult(piece.relpath, error=f"{type(error).__name__}: {error}")


def parse_piece(path: Path, abc_tune_text: str | None) -> stream.Score:
    if abc_tune_text is not None:
        return converter.parseData(abc_tune_text, format="abc")
    # No pickle cache: it would write into music21's scratch folder from several processes.
    return converter.parse(path, forceSource=True, storePickle=False)


def score_to_piano_midi(score: stream.Score) -> tuple[bytes, bool]:
    """MIDI bytes of `score` played on piano, and whether its repeats could be expanded."""
    _set_piano(score)
    _unshare_context_marks(score)
    try:
        music21_midi, repeats_expanded = midi.translate.streamToMidiFile(score), True
    except repeat.ExpanderException:
        # Malformed repeat marks (e.g. a lone `:|`): play each written bar once instead.
        _strip_repeats(score)
        music21_midi, repeats_expanded = midi.translate.streamToMidiFile(score), False
    midi_file = mido.MidiFile(file=io.BytesIO(music21_midi.writestr()))
    # music21 already writes program 0 off channel 9 after _set_piano; enforcing it on the
    # bytes keeps the guarantee whatever a music21 version does with instruments.
    force_piano(midi_file)
    if not any(message.type == "note_on" for track in midi_file.tracks for message in track):
        raise ValueError("no notes")
    return _midi_bytes(midi_file), repeats_expanded


def _set_piano(score: stream.Score) -> None:
    for container in score.recurse(streamsOnly=True, includeSelf=True):
        container.removeByClass(instrument.Instrument)
    for part in score.parts or [score]:
        part.insert(0, instrument.Piano())


def _unshare_context_marks(score: stream.Score) -> None:
    """Give each bar its own meter/key/tempo object.

    music21's ABC reader puts one TimeSignature object into every bar that repeats a meter
    change, and its MIDI writer then fails inserting that object twice into the conductor track.
    """
    seen = set()
    for container in score.recurse(streamsOnly=True, includeSelf=True):
        for mark in list(container.getElementsByClass(CONTEXT_MARKS)):
            if id(mark) in seen:
                container.replace(mark, copy.deepcopy(mark))
            seen.add(id(mark))


def _strip_repeats(score: stream.Score) -> None:
    for measure in score.recurse().getElementsByClass(stream.Measure):
        if isinstance(measure.leftBarline, bar.Repeat):
            measure.leftBarline = None
        if isinstance(measure.rightBarline, bar.Repeat):
            measure.rightBarline = bar.Barline("regular")
    for container in score.recurse(streamsOnly=True, includeSelf=True):
        container.removeByClass((spanner.RepeatBracket, repeat.RepeatExpression))


def force_piano(midi_file: mido.MidiFile) -> None:
    """Rewrite every program change to piano and move channel-9 messages to a free channel."""
    used_channels = {
        message.channel for track in midi_file.tracks for message in track if hasattr(message, "channel")
    }
    free_channel = next(
        (channel for channel in range(16) if channel != DRUM_CHANNEL and channel not in used_channels), 0
    )
    for track in midi_file.tracks:
        for message in track:
            if message.type == "program_change":
                message.program = 0
            if getattr(message, "channel", None) == DRUM_CHANNEL:
                message.channel = free_channel


def _midi_bytes(midi_file: mido.MidiFile) -> bytes:
    buffer = io.BytesIO()
    midi_file.save(file=buffer)
    return buffer.getvalue()


def _labels(piece: DemoPiece, score: stream.Score, repeats_expanded: bool) -> dict:
    title = (score.metadata.title if score.metadata else None) or piece.abc_title
    return {
        "collection": piece.collection,
        "composer": COMPOSER_OF_COLLECTION.get(piece.collection),
        "title": title or Path(piece.source).stem,  # unnamed chorales: the BWV number
        "tune_type": piece.tune_type,
        "region": piece.region,
        "origin": piece.origin,
        "source": piece.source,
        "tune_index": piece.tune_index,
        "tune_number": piece.tune_number,
        "repeats_expanded": repeats_expanded,
        "music21_version": music21.__version__,
    }


# ---------------------------------------------------------------------------------------------
# Build


def build_demo_corpus(
    out_dir: Path,
    config: DemoCorpusConfig,
    progress: Callable[[int, int], None] | None = None,
) -> DemoCorpusReport:
    """Convert the pieces `config` selects into `out_dir`, reusing files of earlier builds.

    `progress(done, total)` is called as pieces to convert finish (cached pieces not counted).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_files(out_dir)
    selected = list_demo_pieces(config)
    cached_labels = _cached_labels(out_dir, selected)
    state = _BuildState(config, pieces=dict(cached_labels))
    to_convert = [piece for piece in selected if piece.relpath not in cached_labels]
    for done, result in enumerate(_convert_all(to_convert, out_dir, config.workers), 1):
        _record(state, result)
        if done % CHECKPOINT_EVERY == 0:
            _write_metadata(out_dir, state)
        if progress:
            progress(done, len(to_convert))
    _write_metadata(out_dir, state)
    return _report(selected, state, set(cached_labels), out_dir, time.perf_counter() - started)


def _cached_labels(out_dir: Path, selected: list[DemoPiece]) -> dict[str, dict]:
    """Labels of selected pieces that an earlier build of this format already wrote."""
    metadata_path = out_dir / METADATA_FILE
    if not metadata_path.exists():
        return {}
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    if metadata.get("version") != FORMAT_VERSION:
        return {}
    previous = metadata.get("pieces", {})
    return {
        piece.relpath: previous[piece.relpath]
        for piece in selected
        if piece.relpath in previous
        and previous[piece.relpath].get("music21_version") == music21.__version__
        and (out_dir / piece.relpath).exists()
    }


def _convert_all(pieces: list[DemoPiece], out_dir: Path, workers: int | None) -> Iterable[_PieceResult]:
    """Yield one result per piece; a task is one source file (or up to 50 tunes of an opus)."""
    tasks = _group_by_source(pieces)
    worker_count = min(workers or os.cpu_count() or 1, max(len(tasks), 1))
    if worker_count == 1:
        # In-process: easier to debug and profile, and no pool start-up for tiny builds.
        for source, source_pieces in tasks:
            yield from _convert_source(source, source_pieces, out_dir)
        return
    # spawn, not fork: forking a threaded caller (Dagster, a notebook) can deadlock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(worker_count, mp_context=context) as executor:
        futures = {
            executor.submit(_convert_source, source, source_pieces, out_dir): source_pieces
            for source, source_pieces in tasks
        }
        for future in concurrent.futures.as_completed(futures):
            yield from _task_results(future, futures[future])


def _task_results(future: concurrent.futures.Future, pieces: list[DemoPiece]) -> list[_PieceResult]:
    try:
        return future.result()
    except Exception as error:  # a worker died: its pieces fail, the others go on
        return [_PieceResult(piece.relpath, error=f"{type(error).__name__}: {error}") for piece in pieces]


def _group_by_source(pieces: list[DemoPiece]) -> list[tuple[str, list[DemoPiece]]]:
    by_source: dict[str, list[DemoPiece]] = {}
    for piece in pieces:
        by_source.setdefault(piece.source, []).append(piece)
    # Chunked so a 700-tune Essen file does not keep one worker busy while the others idle.
    tasks = [
        (source, source_pieces[start : start + TUNES_PER_TASK])
        for source, source_pieces in by_source.items()
        for start in range(0, len(source_pieces), TUNES_PER_TASK)
    ]
    # Biggest tasks first, so no worker is left with a long one at the end.
    return sorted(tasks, key=lambda task: -len(task[1]))


def _record(state: _BuildState, result: _PieceResult) -> None:
    if result.error is None:
        state.pieces[result.relpath] = result.labels
    else:
        state.failed[result.relpath] = result.error


def _write_metadata(out_dir: Path, state: _BuildState) -> None:
    metadata = {
        "version": FORMAT_VERSION,
        "config": state.config.selection(),
        "pieces": dict(sorted(state.pieces.items())),
        "failed": dict(sorted(state.failed.items())),
    }
    text = json.dumps(metadata, indent=1, ensure_ascii=False)
    write_bytes_atomic(out_dir / METADATA_FILE, text.encode("utf-8"))


def _report(
    selected: list[DemoPiece], state: _BuildState, cached: set[str], out_dir: Path, seconds: float
) -> DemoCorpusReport:
    per_collection: dict[str, dict[str, int]] = {}
    for piece in selected:
        counts = per_collection.setdefault(
            piece.collection, {"selected": 0, "converted": 0, "cached": 0, "failed": 0}
        )
        counts["selected"] += 1
        if piece.relpath in cached:
            counts["cached"] += 1
        elif piece.relpath in state.failed:
            counts["failed"] += 1
        else:
            counts["converted"] += 1
    return DemoCorpusReport(
        selected=len(selected),
        converted=sum(counts["converted"] for counts in per_collection.values()),
        cached=len(cached),
        failed=len(state.failed),
        per_collection=per_collection,
        failures=dict(state.failed),
        seconds=seconds,
        metadata_path=out_dir / METADATA_FILE,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="demo", choices=["tiny", "demo", "full"])
    parser.add_argument("--workers", type=int, default=None, help="default: os.cpu_count()")
    args = parser.parse_args(argv)
    config = DemoCorpusConfig.preset(args.preset)
    if args.workers is not None:
        config = dataclasses.replace(config, workers=args.workers)

    def show_progress(done: int, total: int) -> None:
        print(f"\rconverted {done}/{total}", end="", flush=True)

    report = build_demo_corpus(args.out_dir, config, show_progress)
    print(
        f"\n{report.selected} selected: {report.converted} converted, {report.cached} cached, "
        f"{report.failed} failed in {report.seconds:.1f} s -> {report.metadata_path}"
    )
    for relpath, error in report.failures.items():
        print(f"  failed {relpath}: {error}")


if __name__ == "__main__":
    main()
