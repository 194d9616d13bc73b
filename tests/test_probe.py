"""Probe side of the evaluation: labeled datasets and piece-disjoint splits, handcrafted features,
Aria's linear probe, its metrics and the majority baseline."""

import json
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from aria_model.demo_corpus import METADATA_FILE, DemoCorpusConfig, build_demo_corpus
from aria_model.features import (
    FEATURE_BLOCKS,
    FEATURE_NAMES,
    feature_columns,
    features_of_files,
    handcrafted_features,
)
from aria_model.midi import Performance, load_midi
from aria_model.probe import (
    HANDCRAFTED_PROBE,
    RESULT_COLUMNS,
    ProbeConfig,
    confusion_matrix,
    linear_probe,
    macro_f1,
    majority_baseline,
    majority_task,
    per_class_metrics,
    plot_confusion,
    probe_task,
    results_table,
    train_linear_probe,
    write_results,
)
from aria_model.probe_data import (
    PROBE_SCHEMA,
    TARGET_PER_CLASS,
    DemoTask,
    ProbeDataError,
    ProbeDataset,
    build_demo_probe_dataset,
    clusters_in_several_splits,
    cue_report,
    file_cues,
    read_eval_splits,
    read_probe_dataset,
    stratified_cluster_split,
    write_probe_dataset,
)
from aria_model.sources import sha256_file
from tests.conftest import GOLDEN_DIR
from tests.midi_builders import notes_file

# ---------------------------------------------------------------------------------------------
# Split


def _clustered_labels(seed: int = 0) -> tuple[dict[str, str], dict[str, str]]:
    """150 files in 3 classes, grouped into clusters of 1-4 files of one class."""
    rng = np.random.default_rng(seed)
    labels, clusters = {}, {}
    for label in ("a", "b", "c"):
        made = 0
        while made < 50:
            size = min(int(rng.integers(1, 5)), 50 - made)
            cluster_id = f"{label}-cluster-{made}"
            for member in range(size):
                file_id = f"{label}-{made + member:03d}"
                labels[file_id] = label
                clusters[file_id] = cluster_id
            made += size
    return labels, clusters


def test_split_keeps_every_cluster_in_one_split_and_is_stratified():
    labels, clusters = _clustered_labels()
    split = stratified_cluster_split(labels, clusters, test_fraction=0.2, seed=42)

    splits_of_cluster = defaultdict(set)
    for file_id, which in split.items():
        splits_of_cluster[clusters[file_id]].add(which)
    assert all(len(splits) == 1 for splits in splits_of_cluster.values())
    for label in ("a", "b", "c"):
        in_test = sum(1 for f, which in split.items() if labels[f] == label and which == "test")
        assert 8 <= in_test <= 10, (label, in_test)  # round(0.2 x 50) = 10, whole clusters only

    # Same answer whatever order the files come in; another seed gives another split.
    shuffled = dict(reversed(list(labels.items())))
    assert stratified_cluster_split(shuffled, clusters, 0.2, 42) == split
    assert stratified_cluster_split(labels, clusters, 0.2, 7) != split


def test_split_without_clusters_treats_each_file_as_its_own_piece():
    labels = {f"{label}{i:02d}": label for label in "xy" for i in range(20)}
    split = stratified_cluster_split(labels)
    assert Counter((labels[f], s) for f, s in split.items()) == {
        ("x", "train"): 16, ("x", "test"): 4, ("y", "train"): 16, ("y", "test"): 4}


def test_split_keeps_a_cluster_bigger_than_the_test_share_and_still_tests_the_class():
    labels = {f"f{i}": "a" for i in range(10)}
    clusters = {f"f{i}": "big" if i < 7 else "small" for i in range(10)}
    split = stratified_cluster_split(labels, clusters, test_fraction=0.2)
    assert {split[f"f{i}"] for i in range(7)} == {"train"}
    assert {split[f"f{i}"] for i in range(7, 10)} == {"test"}


# ---------------------------------------------------------------------------------------------
# Demo tasks on a hand-made demo folder (fast, no music21)


def _fake_demo(root: Path, pieces: dict[str, tuple[dict, bytes]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for relpath, (_, data) in pieces.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)
    metadata = {"version": 1, "config": {}, "pieces": {relpath: labels for relpath, (labels, _) in pieces.items()},
                "failed": {}}
    (root / METADATA_FILE).write_text(json.dumps(metadata))
    return root


def _tune(i: int) -> bytes:
    return notes_file([(60 + i % 12, 0, 100), (62 + i % 7, 100, 200 + i)])


def test_demo_tasks_label_only_what_the_metadata_says(tmp_path):
    pieces = {}
    for i in range(6):
        pieces[f"bach/b{i}.mid"] = ({"collection": "bach"}, _tune(i))
        pieces[f"ryansMammoth/r{i}.mid"] = ({"collection": "ryansMammoth", "tune_type": "reel" if i % 2 else "jig"},
                                            _tune(100 + i))
        pieces[f"essenFolksong/de{i}.mid"] = (
            {"collection": "essenFolksong", "origin": "Europa, Mitteleuropa, Deutschland, Schlesien"}, _tune(200 + i))
    pieces["essenFolksong/china.mid"] = ({"collection": "essenFolksong", "origin": "China, Shanxi"}, _tune(300))
    pieces["essenFolksong/both.mid"] = (
        {"collection": "essenFolksong", "origin": "Mitteleuropa, Deutschland / Frankreich, Lothringen"}, _tune(301))
    pieces["oneills1850/air.mid"] = ({"collection": "oneills1850", "tune_type": "air"}, _tune(302))
    pieces["oneills1850/copy.mid"] = ({"collection": "oneills1850", "tune_type": "jig"}, _tune(101))  # = r1's bytes
    root = _fake_demo(tmp_path / "demo", pieces)

    style = DemoTask.preset("style", more_classes=True, min_per_class=2)
    tune_type = DemoTask.preset("tune_type", min_per_class=2)
    dataset = build_demo_probe_dataset(root, [style, tune_type])

    rows = {(row["task"], Path(row["path"]).relative_to(root).as_posix()): row for row in dataset.table.to_pylist()}
    assert rows[("style", "bach/b0.mid")]["label"] == "bach"
    assert rows[("style", "essenFolksong/de0.mid")]["label"] == "german_folk"
    assert ("style", "essenFolksong/china.mid") not in rows
    assert ("style", "essenFolksong/both.mid") not in rows  # German and Lorraine: ambiguous
    assert rows[("style", "bach/b0.mid")]["file_id"] == sha256_file(root / "bach/b0.mid")
    assert rows[("style", "bach/b0.mid")]["cluster_id"] == rows[("style", "bach/b0.mid")]["file_id"]

    report = dataset.reports["style"]
    # r1 and oneills1850/copy.mid are the same bytes with the same style label: one piece.
    assert report.classes["irish"]["pieces"] == 7 and report.duplicate_files == 1
    assert report.classes["bach"] == {"pieces": 6, "test": 1, "train": 5}
    assert report.unlabeled == 1 and report.ambiguous == 1
    assert report.dropped_classes == {"palestrina": 0, "luxembourg_folk": 0, "lorraine_folk": 0}
    assert set(report.below_target) == {"bach", "irish", "german_folk"}
    assert "below 100 pieces per class" in dataset.describe()

    # The same bytes as a reel (r1) and as a jig (copy): conflicting labels, both left out.
    tune_report = dataset.reports["tune_type"]
    assert tune_report.conflicting_files == 2
    assert tune_report.classes["reel"]["pieces"] == 2 and tune_report.classes["jig"]["pieces"] == 3
    assert tune_report.dropped_classes == {"hornpipe": 0, "strathspey": 0}
    assert tune_report.unlabeled == 1 + 6 + 6 + 2  # the air, Bach, Essen


def test_demo_dataset_takes_clusters_from_dedup(tmp_path):
    pieces = {f"bach/b{i}.mid": ({"collection": "bach"}, _tune(i)) for i in range(10)}
    root = _fake_demo(tmp_path / "demo", pieces)
    ids = {i: sha256_file(root / f"bach/b{i}.mid") for i in range(10)}
    clusters = {ids[i]: ids[0] for i in range(5)}  # b0-b4 are one piece
    dataset = build_demo_probe_dataset(root, [DemoTask.preset("style", min_per_class=2)], clusters=clusters)
    assert not clusters_in_several_splits(dataset.table)
    cluster_rows = [row for row in dataset.table.to_pylist() if row["cluster_id"] == ids[0]]
    assert len(cluster_rows) == 5 and len({row["split"] for row in cluster_rows}) == 1


def test_probe_dataset_round_trips_with_its_content_hash(tmp_path):
    pieces = {f"bach/b{i}.mid": ({"collection": "bach"}, _tune(i)) for i in range(5)}
    pieces |= {f"palestrina/p{i}.mid": ({"collection": "palestrina"}, _tune(50 + i)) for i in range(5)}
    root = _fake_demo(tmp_path / "demo", pieces)
    dataset = build_demo_probe_dataset(root, [DemoTask.preset("style", min_per_class=2)])
    path = tmp_path / "out" / "probe_dataset.parquet"
    digest = write_probe_dataset(dataset, path)
    assert [p.name for p in path.parent.iterdir()] == ["probe_dataset.parquet"]

    again = read_probe_dataset(path)
    assert again.table.equals(dataset.table) and again.content_hash == digest == dataset.content_hash
    assert again.reports["style"].classes == dataset.reports["style"].classes

    # The hash covers labels and splits, not where the corpus lies.
    moved = shutil.copytree(root, tmp_path / "moved")
    assert build_demo_probe_dataset(moved, [DemoTask.preset("style", min_per_class=2)]).content_hash == digest

    table = pq.read_table(path)
    labels = table["label"].to_pylist()
    labels[0] = "palestrina" if labels[0] == "bach" else "bach"
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", [labels]), path)
    with pytest.raises(ProbeDataError, match="content hash"):
        read_probe_dataset(path)


# ---------------------------------------------------------------------------------------------
# User splits: Aria's eval-splits layout


def _eval_splits_root(tmp_path: Path) -> Path:
    root = tmp_path / "eval-splits"
    layout = {
        "genre/classical/bwv66.mid": "bwv66.6.mxl.mid",
        "genre/classical/arabesque.mid": "arabesque.mid",
        "genre/jazz/pop909_008.mid": "miditok1_POP909_008.mid",
        "genre/jazz/pop909_010.mid": "miditok1_POP909_010.mid",
    }
    for relpath, golden in layout.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(GOLDEN_DIR / "midi" / golden, root / relpath)
    metadata = {
        "genre": {
            "train": {"genre/classical/bwv66.mid": "classical", "genre/jazz/pop909_008.mid": "jazz"},
            "test": {"genre/classical/arabesque.mid": "classical", "genre/jazz/pop909_010.mid": "jazz"},
        },
        "music_period": {"train": {"genre/classical/bwv66.mid": "baroque"},
                         "test": {"genre/classical/arabesque.mid": "impressionist"}},
    }
    (root / "metadata.json").write_text(json.dumps(metadata))
    return root


def test_eval_splits_layout_is_read_as_given(tmp_path):
    root = _eval_splits_root(tmp_path)
    dataset = read_eval_splits(root)
    assert dataset.tasks == ["genre", "music_period"]
    got = {(row["task"], Path(row["path"]).relative_to(root).as_posix(), row["split"], row["label"])
           for row in dataset.table.to_pylist()}
    assert got == {
        ("genre", "genre/classical/bwv66.mid", "train", "classical"),
        ("genre", "genre/jazz/pop909_008.mid", "train", "jazz"),
        ("genre", "genre/classical/arabesque.mid", "test", "classical"),
        ("genre", "genre/jazz/pop909_010.mid", "test", "jazz"),
        ("music_period", "genre/classical/bwv66.mid", "train", "baroque"),
        ("music_period", "genre/classical/arabesque.mid", "test", "impressionist"),
    }
    for row in dataset.table.to_pylist():
        assert row["file_id"] == sha256_file(row["path"]) == row["cluster_id"]
    assert dataset.reports["genre"].classes["jazz"] == {"pieces": 2, "test": 1, "train": 1}

    # Given clusters are kept, and a cluster the given split puts on both sides is reported.
    ids = {Path(row["path"]).name: row["file_id"] for row in dataset.table.to_pylist()}
    linked = read_eval_splits(root, clusters={ids["pop909_010.mid"]: ids["pop909_008.mid"]})
    assert linked.reports["genre"].clusters_in_several_splits == 1
    assert clusters_in_several_splits(linked.table) == {"genre": [ids["pop909_008.mid"]]}


def test_eval_splits_missing_files_and_bad_shapes(tmp_path):
    root = _eval_splits_root(tmp_path)
    (root / "genre/jazz/pop909_010.mid").unlink()
    with pytest.raises(ProbeDataError, match="1 files of 'genre' are not under"):
        read_eval_splits(root)
    skipped = read_eval_splits(root, missing="skip")
    assert skipped.reports["genre"].missing_files == 1
    assert len(skipped.rows("genre")) == 3

    (root / "metadata.json").write_text(json.dumps({"genre": ["not", "a", "split"]}))
    with pytest.raises(ProbeDataError, match="expected"):
        read_eval_splits(root)


# ---------------------------------------------------------------------------------------------
# Features


def _example_performance() -> Performance:
    # onset ms, duration ms, pitch, velocity. Events (onsets chained within 50 ms): 0, 500,
    # 1000 (+1020), 2000, whose top pitches 64, 67, 72, 59 give intervals +3, +5, -13.
    notes = [(0, 500, 60, 80), (0, 1000, 64, 100), (500, 500, 67, 80), (1000, 1000, 72, 100),
             (1020, 980, 48, 60), (2000, 500, 59, 100)]
    onset, duration, pitch, velocity = (np.array(column) for column in zip(*notes))
    zeros = np.zeros(len(notes), np.uint8)
    return Performance.from_ms(onset, duration, pitch, velocity, zeros, zeros, ("piano",))


def test_handcrafted_features_match_a_hand_computed_example():
    vector = handcrafted_features(_example_performance())
    assert vector.dtype == np.float32 and vector.shape == (len(FEATURE_NAMES),) == (54,)
    named = dict(zip(FEATURE_NAMES, vector.tolist()))

    pitch_classes = vector[FEATURE_BLOCKS["pitch_class"]]
    # C: 60, 72, 48; E: 64; G: 67; B: 59.
    expected = np.zeros(12)
    expected[[0, 4, 7, 11]] = [3 / 6, 1 / 6, 1 / 6, 1 / 6]
    np.testing.assert_allclose(pitch_classes, expected, rtol=1e-6)

    intervals = {name: value for name, value in named.items()
                 if name.startswith("interval_") and name[9] in "+-" and value}
    assert intervals == pytest.approx({"interval_+3": 1 / 3, "interval_+5": 1 / 3, "interval_-12": 1 / 3})
    assert [named[f"interval_{kind}"] for kind in ("unison", "step", "third", "leap", "over_octave")] == \
        pytest.approx([0, 0, 1 / 3, 1 / 3, 1 / 3])

    # 6 notes and 4 events over 2.5 s (0 ms to the end of the last note at 2500 ms).
    assert named["notes_per_second"] == pytest.approx(2.4)
    assert named["onsets_per_second"] == pytest.approx(1.6)
    # Velocities 80 100 80 100 60 100: mean 86.67, variance 1333.33 / 6.
    assert named["velocity_mean"] == pytest.approx(260 / 3, rel=1e-6)
    assert named["velocity_std"] == pytest.approx(math.sqrt(1333.3333 / 6), rel=1e-5)
    # Durations 500 1000 500 1000 980 500 ms: mean 746.67 ms, variance 365333.33 / 6 ms^2.
    assert named["duration_mean_s"] == pytest.approx(4480 / 6 / 1000, rel=1e-6)
    assert named["duration_std_s"] == pytest.approx(math.sqrt(365333.33 / 6) / 1000, rel=1e-5)
    # Pitches 60 64 67 72 48 59: mean 61.67, variance 337.33 / 6.
    assert [named[n] for n in ("pitch_mean", "pitch_min", "pitch_max")] == pytest.approx([370 / 6, 48, 72])
    assert named["pitch_std"] == pytest.approx(math.sqrt(337.3333 / 6), rel=1e-5)
    # Sounding at onsets 0, 500, 1000, 1020, 2000: 2, 2, 1, 2, 1 (a note ending at t is over at t).
    assert named["polyphony_mean"] == pytest.approx(1.6)
    assert named["polyphony_max"] == 2


def test_feature_blocks_and_column_selection():
    assert sum(s.stop - s.start for s in FEATURE_BLOCKS.values()) == len(FEATURE_NAMES)
    columns = feature_columns(exclude=("velocity",))
    assert [FEATURE_NAMES[c] for c in columns if "velocity" in FEATURE_NAMES[c]] == []
    assert len(columns) == len(FEATURE_NAMES) - 2
    assert [FEATURE_NAMES[c] for c in feature_columns(["pitch"])] == ["pitch_mean", "pitch_std", "pitch_min",
                                                                      "pitch_max"]
    with pytest.raises(ValueError, match="unknown feature blocks"):
        feature_columns(["timbre"])
    empty = Performance.from_ms(*(np.zeros(0, np.int64) for _ in range(6)), ("piano",))
    assert not handcrafted_features(empty).any()


def test_features_of_real_files_are_finite():
    paths = {name: GOLDEN_DIR / "midi" / name for name in ("bwv66.6.mxl.mid", "miditok1_POP909_008.mid")}
    features = features_of_files(paths)
    for vector in features.values():
        assert np.isfinite(vector).all()
        assert vector[FEATURE_BLOCKS["pitch_class"]].sum() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_array_equal(features["bwv66.6.mxl.mid"],
                                  handcrafted_features(load_midi(paths["bwv66.6.mxl.mid"])))


# ---------------------------------------------------------------------------------------------
# Probe and metrics


def _blobs(n_per_class: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Three tight clusters in 16 dimensions, like an embedding: the class shows in every dimension.

    (Aria's probe moves each weight by at most ~lr x steps = 0.2 here, so in a few dimensions the
    random initial weights would outweigh what it learns.)"""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((3, 16))
    x = np.concatenate([centre + 0.3 * rng.standard_normal((n_per_class, 16)) for centre in centres])
    return x.astype(np.float32), [label for label in ("a", "b", "c") for _ in range(n_per_class)]


def test_linear_probe_separates_linearly_separable_data():
    train_x, train_y = _blobs(40, seed=0)
    test_x, test_y = _blobs(20, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, task="blobs", method="probe")
    assert result.accuracy == 1.0 and result.macro_f1 == 1.0
    assert (result.n_train, result.n_test, result.classes) == (120, 60, ("a", "b", "c"))
    np.testing.assert_array_equal(result.confusion, np.diag([20, 20, 20]))
    standardised = linear_probe(train_x, train_y, test_x, test_y, task="blobs", method="probe",
                                config=HANDCRAFTED_PROBE)
    assert standardised.accuracy == 1.0


def test_linear_probe_is_deterministic_given_the_seed():
    train_x, train_y = _blobs(10, seed=0)
    y = np.array(["abc".index(label) for label in train_y])
    config = ProbeConfig(epochs=3)
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    first = train_linear_probe(train_x, y, 3, config)
    assert torch.equal(torch.rand(1), expected_draw)  # the caller's RNG stream is not disturbed
    second = train_linear_probe(train_x, y, 3, config)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    other = train_linear_probe(train_x, y, 3, ProbeConfig(epochs=3, seed=1))
    assert not torch.equal(first.weight, other.weight)


def test_macro_f1_against_a_hand_computed_confusion_matrix():
    confusion = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    # Class 0: P 5/7, R 5/6 -> F1 10/13. Class 1: P 3/4, R 3/6 -> 3/5. Class 2: P 4/5, R 1 -> 8/9.
    assert macro_f1(confusion) == pytest.approx((10 / 13 + 3 / 5 + 8 / 9) / 3)
    rows = per_class_metrics(confusion, ["x", "y", "z"])
    assert rows[1] == pytest.approx({"class": "y", "support": 6, "precision": 0.75, "recall": 0.5, "f1": 0.6})
    true = np.array([0] * 6 + [1] * 6 + [2] * 4)
    predicted = np.array([0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(confusion_matrix(true, predicted, 3), confusion)
    # A class that is neither present nor predicted still counts (F1 0), as in Aria's evaluation.
    padded = np.zeros((4, 4), np.int64)
    padded[:3, :3] = confusion
    assert macro_f1(padded) == pytest.approx((10 / 13 + 3 / 5 + 8 / 9) / 4)


def test_majority_baseline():
    result = majority_baseline(["a"] * 3 + ["b"] * 5 + ["c"] * 2, ["b", "b", "a", "c"], task="t")
    assert result.method == "majority" and result.config == {"predicts": "b"}
    assert result.accuracy == 0.5
    # b: P 2/4, R 1 -> F1 2/3; a and c: 0.
    assert result.macro_f1 == pytest.approx(2 / 9)
    np.testing.assert_array_equal(result.confusion, [[0, 1, 0], [0, 2, 0], [0, 1, 0]])
    assert majority_baseline(["b", "a"], ["a"], task="t").config == {"predicts": "a"}  # tie: sorted first


def test_results_table_file_and_plot(tmp_path):
    train_x, train_y = _blobs(10, seed=0)
    probe = linear_probe(train_x, train_y, train_x, train_y, task="blobs", method="probe",
                         config=ProbeConfig(epochs=2))
    baseline = majority_baseline(train_y, train_y, task="blobs")
    table = results_table([probe, baseline])
    assert tuple(table.column_names[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS == (
        "task", "method", "accuracy", "macro_f1", "n_train", "n_test")
    assert table["method"].to_pylist() == ["probe", "majority"]
    assert table["confusion"].to_pylist()[1] == baseline.confusion.tolist()

    path = write_results([probe, baseline], home=tmp_path)
    assert path == tmp_path / "probe_eval" / "results.parquet"
    assert pq.read_table(path).equals(table)
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.parquet"]

    png = plot_confusion(probe, tmp_path / "probe_eval" / "blobs.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# The real demo corpus


@pytest.fixture(scope="module")
def small_demo_corpus(tmp_path_factory, tiny_demo_corpus) -> Path:
    """16 pieces per collection (the tiny preset's 3 are reused): enough for every style class."""
    out = tmp_path_factory.mktemp("probe_demo")
    shutil.copytree(tiny_demo_corpus, out, dirs_exist_ok=True)
    report = build_demo_corpus(out, DemoCorpusConfig(pieces_per_collection=16, workers=2))
    assert report.failed == 0, report.failures
    return out


def _probe_vs_majority(demo_dir: Path, task: str, min_per_class: int):
    dataset = build_demo_probe_dataset(demo_dir, [DemoTask.preset(task, min_per_class=min_per_class)])
    paths = dict(zip(dataset.table["file_id"].to_pylist(), dataset.table["path"].to_pylist()))
    performances = {file_id: load_midi(path) for file_id, path in paths.items()}
    features = {file_id: handcrafted_features(perf) for file_id, perf in performances.items()}
    result = probe_task(dataset, task, features, method="handcrafted", config=HANDCRAFTED_PROBE,
                        columns=feature_columns(exclude=("velocity",)))
    return dataset, performances, result, majority_task(dataset, task)


def test_demo_corpus_style_probe_beats_the_majority_class(small_demo_corpus):
    dataset, performances, result, majority = _probe_vs_majority(small_demo_corpus, "style", min_per_class=5)
    report = dataset.reports["style"]
    assert set(report.classes) == {"bach", "palestrina", "irish", "german_folk"}
    assert report.classes["bach"]["pieces"] == 16 and report.classes["irish"]["pieces"] == 32
    assert report.below_target == list(report.classes)  # 16 per collection is far under 100
    assert not clusters_in_several_splits(dataset.table)
    assert result.n_test == majority.n_test >= 8
    assert result.accuracy >= majority.accuracy + 0.3, (result.accuracy, majority.accuracy)
    assert result.macro_f1 > majority.macro_f1 + 0.3

    # No trivial cue: ticks per beat, instrument, channels and tempo changes are the same for every
    # class. The velocity set is not (ABC accent marks), which is why the probe above leaves the
    # velocity features out.
    cues = {file_id: file_cues(perf) for file_id, perf in performances.items()}
    checks = {check.cue: check for check in cue_report(dataset, cues, "style")}
    for cue in ("ticks_per_beat", "instruments", "channels", "tempo_changes"):
        assert len(checks[cue].values) == 1 and not checks[cue].leaks, checks[cue]
    assert checks["instruments"].values == {"piano": dict(Counter(r["label"] for r in dataset.rows("style")))}
    accented = {label for value, labels in checks["velocities"].values.items() if value != "90" for label in labels}
    assert accented <= {"irish"}


def test_cue_report_flags_a_value_only_one_class_has():
    pieces = {f"f{i}": "a" if i < 10 else "b" for i in range(20)}
    table = pa.Table.from_pylist([
        {"task": "t", "file_id": f, "path": f, "label": label, "split": "train", "cluster_id": f}
        for f, label in pieces.items()], PROBE_SCHEMA)
    cues = {f: {"format": "same", "tempo": "fast" if f in ("f0", "f1", "f2", "f3", "f4", "f5") else "slow",
                "rare": "x" if f == "f0" else "y"} for f in pieces}
    checks = {c.cue: c for c in cue_report(ProbeDataset(table, {}), cues, "t")}
    assert not checks["format"].leaks
    assert checks["tempo"].leaks and checks["tempo"].pure_fraction == pytest.approx(6 / 20)
    assert not checks["rare"].leaks  # one piece with a value proves nothing (min_count 5)


@pytest.mark.slow
def test_default_demo_corpus_probes(demo_corpus_dir):
    """The default demo preset (80 per collection): style is easy, and the counts are reported."""
    dataset, _, result, majority = _probe_vs_majority(demo_corpus_dir, "style", min_per_class=20)
    counts = {label: c["pieces"] for label, c in dataset.reports["style"].classes.items()}
    assert counts == {"bach": 80, "palestrina": 80, "irish": 160, "german_folk": 41}
    assert dataset.reports["style"].below_target == ["bach", "palestrina", "german_folk"]
    assert TARGET_PER_CLASS == 100
    assert result.accuracy >= 0.85 and result.accuracy > majority.accuracy + 0.3
