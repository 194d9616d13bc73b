"""Scale rehearsal: the real ``ingest`` job on a synthetic Aria-MIDI-like corpus of 100k files.

1. Corpus (``bench/scale_corpus.py``): ``--files`` files of ~1,700 notes on average, re-performed
   demo and golden material, some corrupt; reused when ``<out>/corpus`` holds the same spec.
2. ``aria run ingest --source <out>/corpus --home <out>/home`` on a fresh home, as a subprocess, the
   way users run it: wall time, the peak RSS of its largest process and the peak memory of the
   whole process tree (PSS, sampled), each step's time from Dagster's event log (worker start-up
   apart from the work) and each asset's metadata (its own counts, seconds and peak RSS).
3. ``--add-share`` (1 %) more files in the same folder, and the job again: asserts from the assets'
   metadata that only the new files were hashed, parsed, evaluated and tokenized.
4. The extrapolation to Aria-MIDI (1,186,253 files, ~2B notes): every step's work grows by the
   larger of the file and note ratios, start-ups stay as they were; PASS/FAIL against 30 minutes
   on these cores and 4 GB.

Run it under the shared benchmark lock (another engineer benchmarks on this machine)::

    flock /tmp/aria-bench.lock .venv/bin/python bench/scale.py                   # 100k files, 10-30 min
    flock /tmp/aria-bench.lock .venv/bin/python bench/scale.py --files 5000 --out /tmp/aria-scale-5k

The corpus's material is the demo corpus (``--demo-dir``, built there once if missing: ~2 min)
plus the golden MIDI; ``--demo-dir none`` uses the golden files alone. ``--in-process`` runs
every step in the run's process instead of one process per step (the test does, to save the
start-ups).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from bench.common import ARIA_MIDI_FILES, ARIA_MIDI_NOTES
from bench.scale_corpus import (
    CORRUPT_KINDS,
    GOOD,
    CorpusSpec,
    built_spec,
    file_number,
    plan,
    relpath,
    source_pieces,
    trim_corpus,
    write_corpus,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_GOAL_S = 30 * 60
MEMORY_GOAL_MB = 4096
ASSETS = ("demo_corpus", "raw_midi_manifest", "midi_notes", "opus_dedup", "quality_filter", "token_shards")
IN_PROCESS_CONFIG = "execution:\n  config:\n    in_process: {}\n"


@dataclass
class Step:
    startup: float = 0.0  # worker process start to STEP_START: imports, loading the code location
    work: float = 0.0  # STEP_START to STEP_SUCCESS


@dataclass
class IngestRun:
    wall: float
    largest_process_mb: float  # ru_maxrss of the job's largest process (wait4 sees the whole tree)
    tree_peak_mb: float  # peak of the summed PSS of the job's processes, sampled
    steps: dict[str, Step]
    metadata: dict[str, dict]  # asset -> its materialization's metadata in this run
    failed_checks: list[str] = field(default_factory=list)

    @property
    def peak_mb(self) -> float:
        return max(self.largest_process_mb, self.tree_peak_mb)


# -- memory of a process tree ------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone between the listing and the read
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack += children.get(pid, [])
    return found


def _pss_mb(pid: int) -> float:
    """Proportional set size: shared pages (forked workers, libraries) counted once over the tree."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreeMemory(threading.Thread):
    """Samples the summed PSS of a process and its descendants until ``stop``."""

    def __init__(self, pid: int, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak_mb = pid, every_s, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.peak_mb = max(self.peak_mb, sum(_pss_mb(pid) for pid in _descendants(self.pid)))

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak_mb


# -- the job -------------------------------------------------------------------------------


def run_ingest(corpus: Path, home: Path, log: Path, in_process: bool) -> IngestRun:
    command = [sys.executable, "-m", "pipelines.cli", "run", "ingest", "--source", str(corpus), "--home", str(home)]
    if in_process:
        config = home.parent / "in_process.yaml"
        config.write_text(IN_PROCESS_CONFIG)
        command += ["-c", str(config)]
    env = {**os.environ, "DAGSTER_HOME": str(home / "dagster")}  # never the caller's instance
    started = time.perf_counter()
    with open(log, "w") as out:
        job = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        memory = TreeMemory(job.pid)
        memory.start()
        _, status, usage = os.wait4(job.pid, 0)
        job.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    tree_peak = memory.stop()
    if job.returncode:
        raise SystemExit(f"ingest failed ({job.returncode}); see {log}")
    steps, metadata, failed = _run_record(home / "dagster")
    return IngestRun(wall, usage.ru_maxrss / 1024, tree_peak, steps, metadata, failed)


def _run_record(dagster_home: Path) -> tuple[dict[str, Step], dict[str, dict], list[str]]:
    """Per step timings, per asset metadata and failed checks of the instance's latest run."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(dagster_home)
    with dg.DagsterInstance.get() as instance:
        run = instance.get_runs(limit=1)[0]
        steps: dict[str, Step] = {}
        launched: dict[str, float] = {}  # only where the step has a process of its own
        started: dict[str, float] = {}
        failed = []
        for entry in instance.all_logs(run.run_id):
            event, key = entry.dagster_event, entry.step_key
            if event is None or key is None:
                continue
            kind = event.event_type_value
            if kind == "STEP_WORKER_STARTING":
                launched[key] = entry.timestamp
            elif kind == "STEP_START":
                started[key] = entry.timestamp
            elif kind == "STEP_SUCCESS":
                startup = started[key] - launched.get(key, started[key])
                steps[key] = Step(startup, entry.timestamp - started[key])
            elif kind == "ASSET_CHECK_EVALUATION" and not event.event_specific_data.passed:
                failed.append(event.event_specific_data.check_name)
        metadata = {}
        for asset in (*ASSETS, "midi_quarantine"):
            record = instance.get_latest_materialization_event(dg.AssetKey(asset))
            if record is not None and record.run_id == run.run_id:
                metadata[asset] = {k: getattr(v, "value", v) for k, v in record.asset_materialization.metadata.items()}
    return steps, metadata, failed


# -- the corpus ----------------------------------------------------------------------------


def prepare_corpus(spec: CorpusSpec, root: Path, demo_dir: Path | None, workers: int | None) -> list:
    """Source pieces, and the corpus of ``spec`` at ``root`` (reused, trimmed or written)."""
    if demo_dir is not None and not (demo_dir / "demo_metadata.json").exists():
        from aria_model.demo_corpus import DemoCorpusConfig, build_demo_corpus

        print(f"building the demo corpus in {demo_dir} (once)", flush=True)
        build_demo_corpus(demo_dir, DemoCorpusConfig.preset("demo"))
    pieces = source_pieces(demo_dir)
    built, files = built_spec(root)
    if built == spec and files >= spec.files:
        if files > spec.files:
            trim_corpus(spec, root)
        print(f"corpus: reusing {root} ({spec.files:,} files)", flush=True)
        return pieces
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    stats = write_corpus(spec, root, pieces, workers=workers)
    seconds = time.perf_counter() - started
    print(f"corpus: {stats.files:,} files ({stats.by_kind}), {stats.notes:,} notes written "
          f"({stats.notes / max(stats.by_kind.get('good', 1), 1):,.0f} a good file), "
          f"{stats.bytes / 1e9:.2f} GB in {seconds:.0f} s, from {len(pieces)} source pieces", flush=True)
    return pieces


def quarantine_check(home: Path, spec: CorpusSpec, added: int) -> tuple[bool, str]:
    """Whether every good file was parsed and every corrupt one quarantined with its kind's reason
    (files without notes share one content, so one row), and the counts by reason."""
    import pyarrow.parquet as pq

    from aria_model.notes_table import part_files

    kinds = np.concatenate([plan(spec, 0, spec.files)[1], plan(spec, spec.files, added)[1]])
    good = int((kinds == GOOD).sum())
    rows = pq.read_table(part_files(home / "midi_quarantine"), columns=["path", "reason"]).to_pylist()
    wrong = [row for row in rows if CORRUPT_KINDS.get(kinds[file_number(row["path"])]) != row["reason"]]
    expected = sum(kind in ("truncated", "not_midi") for kind in kinds) + ("no_notes" in kinds)
    parsed = sum(pq.read_metadata(part).num_rows for part in part_files(home / "midi_notes"))
    by_reason = {reason: sum(row["reason"] == reason for row in rows) for reason in sorted({r["reason"] for r in rows})}
    ok = not wrong and len(rows) == expected and parsed == good
    return ok, f"quarantined {by_reason}, parsed {parsed:,} of {good:,} good files"


def new_contents(root: Path, ids: range, known: set[str]) -> int:
    """Distinct contents among the files ``ids`` that ``known`` lacks (files without notes share one)."""
    return len({hashlib.sha256((root / relpath(i)).read_bytes()).hexdigest() for i in ids} - known)


# -- report --------------------------------------------------------------------------------


def steps_by_asset(run: IngestRun) -> dict[str, Step]:
    """Each asset's own step, and its checks' steps summed under ``<asset> checks``."""
    grouped: dict[str, Step] = {}
    for key, step in run.steps.items():
        owner = key.replace("midi_quarantine", "midi_notes")  # one step materializes both
        name = key if key in ASSETS else f"{next(a for a in ASSETS if owner.startswith(a))} checks"
        total = grouped.setdefault(name, Step())
        total.startup += step.startup
        total.work += step.work
    return grouped


def print_run(title: str, run: IngestRun, files: int, notes: int) -> None:
    print(f"\n{title}: {run.wall:,.0f} s wall, {files / run.wall:,.0f} files/s, {notes / run.wall:,.0f} notes/s; "
          f"peak RSS {run.largest_process_mb:,.0f} MB (largest process), {run.tree_peak_mb:,.0f} MB (all processes, PSS)")
    print(f"  {'step':<26} {'start-up s':>10} {'work s':>8} {'files/s':>10} {'notes/s':>12} {'asset peak RSS MB':>18}")
    for name, step in steps_by_asset(run).items():
        meta = run.metadata.get(name, {})
        rss = meta.get("peak_rss_mb")
        children = meta.get("peak_rss_children_mb")
        rss_text = f"{rss:,.0f} / {children:,.0f}" if rss is not None else ""
        rate = (f"{files / step.work:10,.0f} {notes / step.work:12,.0f}" if step.work > 0.05 else f"{'':10} {'':12}")
        print(f"  {name:<26} {step.startup:10.1f} {step.work:8.1f} {rate} {rss_text:>18}")
    if run.failed_checks:
        print(f"  checks that did not pass: {', '.join(sorted(run.failed_checks))}")


def extrapolate(run: IngestRun, files: int, notes: int) -> tuple[float, float, float]:
    """(seconds for Aria-MIDI, the file ratio, the note ratio): the measured wall plus every step's
    work grown by the larger ratio. Steps that ran side by side are counted one after the other."""
    by_files, by_notes = ARIA_MIDI_FILES / files, ARIA_MIDI_NOTES / notes
    scale = max(by_files, by_notes)
    work = sum(step.work for step in run.steps.values())
    return run.wall + work * (scale - 1), by_files, by_notes


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def incremental_checks(second: IngestRun, added: int, expected_new: int, selected_new: int) -> list[tuple]:
    """(what, expected, got) of the rerun, each from an asset's metadata."""
    meta = second.metadata
    parsed = meta["midi_notes"]["new_files"]
    quarantined_new = meta["midi_quarantine"]["new"]
    return [
        ("files hashed (raw_midi_manifest)", added, meta["raw_midi_manifest"]["files_hashed"]),
        ("contents parsed (midi_notes)", expected_new, parsed),
        ("files evaluated (quality_filter)", parsed - quarantined_new, meta["quality_filter"]["evaluated"]),
        ("files tokenized (token_shards)", selected_new, meta["token_shards"]["files_tokenized"]),
    ]


def selected_among(home: Path, file_ids: set[str]) -> int:
    """How many of ``file_ids`` dedup keeps and the quality filter passes (what token_shards takes)."""
    from aria_model.shards import select_files

    return len(file_ids & select_files(home / "opus_dedup" / "dedup.parquet",
                                       home / "quality_filter" / "quality.parquet").keys())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--add-share", type=float, default=0.01, help="files added before the rerun")
    parser.add_argument("--corrupt-share", type=float, default=CorpusSpec.corrupt_share)
    parser.add_argument("--out", type=Path, default=Path("/tmp/aria-scale"))
    parser.add_argument("--demo-dir", default=None, help="default <out>/demo_corpus; 'none': golden files only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="corpus writer processes (default: all cores)")
    parser.add_argument("--in-process", action="store_true", help="every step in the run's process")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    args = parse_args(argv)
    out = args.out.resolve()
    demo_dir = None if args.demo_dir == "none" else Path(args.demo_dir or out / "demo_corpus").resolve()
    corpus, home, manifest = out / "corpus", out / "home", out / "home" / "raw_midi_manifest" / "manifest.parquet"
    spec = CorpusSpec(files=args.files, works=args.files, seed=args.seed, corrupt_share=args.corrupt_share)
    pieces = prepare_corpus(spec, corpus, demo_dir, args.workers)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)

    first = run_ingest(corpus, home, out / "ingest-1.log", args.in_process)
    files, notes = first.metadata["raw_midi_manifest"]["dagster/row_count"], first.metadata["midi_notes"]["new_notes"]
    parsed = first.metadata["midi_notes"]["dagster/row_count"]
    print(f"\ncorpus: {files:,} files, {parsed:,} parsed, {notes:,} notes, {notes / parsed:,.0f} notes a parsed file")
    print_run("ingest, fresh home", first, files, notes)

    known = set(pq.read_table(manifest, columns=["file_id"])["file_id"].to_pylist())
    added = math.ceil(args.files * args.add_share)
    write_corpus(spec, corpus, pieces, first_id=spec.files, files=added, workers=args.workers)
    expected_new = new_contents(corpus, range(spec.files, spec.files + added), known)
    second = run_ingest(corpus, home, out / "ingest-2.log", args.in_process)
    new_ids = set(pq.read_table(manifest, columns=["file_id"])["file_id"].to_pylist()) - known
    print_run(f"ingest again after adding {added:,} files", second, added, second.metadata["midi_notes"]["new_notes"])
    checks = incremental_checks(second, added, expected_new, selected_among(home, new_ids))
    for what, expected, got in checks:
        print(f"  {what}: {got:,} (expected {expected:,}) {verdict(got == expected)}")
    return summary(first, second, files, notes, checks, quarantine_check(home, spec, added))


def summary(first: IngestRun, second: IngestRun, files: int, notes: int, checks: list[tuple],
            quarantine: tuple[bool, str]) -> int:
    """The extrapolation and every verdict; the exit status (0: all pass)."""
    seconds, by_files, by_notes = extrapolate(first, files, notes)
    scale = max(by_files, by_notes)
    print(f"\nAria-MIDI ({ARIA_MIDI_FILES:,} files, {ARIA_MIDI_NOTES:,.0f} notes): x{by_files:.1f} by files, "
          f"x{by_notes:.1f} by notes; at x{scale:.1f} the ingest job takes {seconds / 60:,.1f} min on "
          f"{os.cpu_count()} cores (goal {JOB_GOAL_S / 60:.0f} min) {verdict(seconds < JOB_GOAL_S)}")
    for name, step in steps_by_asset(first).items():
        print(f"  {name:<26} {(step.startup + step.work * scale) / 60:8.1f} min")
    peak = max(first.peak_mb, second.peak_mb)
    incremental_ok = all(expected == got for _, expected, got in checks)
    verdicts = {
        f"peak memory {peak:,.0f} MB (goal {MEMORY_GOAL_MB:,} MB)": peak < MEMORY_GOAL_MB,
        "the rerun touched only the new files": incremental_ok,
        f"corrupt files quarantined with their reasons: {quarantine[1]}": quarantine[0],
        f"whole job extrapolated under {JOB_GOAL_S / 60:.0f} min": seconds < JOB_GOAL_S,
    }
    for what, ok in verdicts.items():
        print(f"{verdict(ok)}  {what}")
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
