"""minhash_lsh against datasketch: the same MinHash values, the same LSH candidate pairs."""

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH

from aria_model import minhash_lsh


def planted_sets(seed: int = 0, originals: int = 150) -> list[np.ndarray]:
    """Random uint32 sets of 5-1500 elements, each with copies that share 40-100% of it, and empty sets.

    Copies at every degree of overlap put pairs on both sides of any threshold.
    """
    rng = np.random.default_rng(seed)
    sets = [np.zeros(0, np.uint32)] * 2  # empty: all values EMPTY, a candidate of each other
    for _ in range(originals):
        original = np.unique(rng.integers(0, 2**32, rng.integers(5, 1500), dtype=np.uint32))
        sets.append(original)
        for _ in range(rng.integers(0, 4)):
            kept = original[rng.random(len(original)) < rng.uniform(0.4, 1.0)]
            extra = rng.integers(0, 2**32, rng.integers(0, len(original) // 4 + 1), dtype=np.uint32)
            sets.append(np.unique(np.concatenate([kept, extra])))
    return [sets[i] for i in rng.permutation(len(sets))]


def packed(sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate(sets), np.concatenate([[0], np.cumsum([len(s) for s in sets])])


@pytest.mark.parametrize(("num_perm", "seed"), [(128, 1), (64, 7), (200, 0)])
def test_signatures_are_minhash_bulk_values(num_perm, seed):
    sets = planted_sets()
    values = minhash_lsh.signatures(*packed(sets), num_perm=num_perm, seed=seed)
    bulk = MinHash.bulk([s.tolist() for s in sets], num_perm=num_perm, seed=seed, hashfunc=int)
    assert values.dtype == np.uint32 and values.shape == (len(sets), num_perm)
    assert np.array_equal(values, np.stack([m.hashvalues for m in bulk]))
    assert all(m.scheme == minhash_lsh.SCHEME for m in bulk)


def lsh_candidates(values: np.ndarray, threshold: float) -> tuple[set[tuple[int, int]], list[LeanMinHash], MinHashLSH]:
    """Every pair a datasketch MinHashLSH returns when all signatures are inserted, then each queried."""
    lsh = MinHashLSH(threshold=threshold, num_perm=values.shape[1])
    sketches = [LeanMinHash(seed=1, hashvalues=row, scheme=minhash_lsh.SCHEME) for row in values]
    with lsh.insertion_session() as session:
        for key, sketch in enumerate(sketches):
            session.insert(key, sketch, check_duplication=False)
    pairs = {(i, j) for j, sketch in enumerate(sketches) for i in lsh.query(sketch) if i < j}
    return pairs, sketches, lsh


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])  # 28 bands x 2 rows, 25 x 5, 9 x 13 at 128 permutations
def test_banded_pairs_are_minhash_lsh_candidates(threshold):
    sets = planted_sets(seed=int(threshold * 10))
    values = minhash_lsh.signatures(*packed(sets), num_perm=128, seed=1)
    expected, sketches, lsh = lsh_candidates(values, threshold)
    assert (lsh.b, lsh.r) == minhash_lsh.band_params(threshold, 128)
    pairs, candidates = minhash_lsh.banded_pairs(values, lsh.b, lsh.r, min_similarity=0.0)
    assert len(expected) > 30 and candidates == len(expected)
    assert sorted(pairs.tolist()) == sorted(map(list, expected))  # each once, (i < j)
    verified, candidates = minhash_lsh.near_duplicate_pairs(values, threshold)
    assert candidates == len(expected)
    assert sorted(verified.tolist()) == sorted([i, j] for i, j in expected
                                               if sketches[i].jaccard(sketches[j]) >= threshold)


def test_bands_with_more_than_two_rows_tell_colliding_keys_apart(monkeypatch):
    # Five-row bands are mixed into one uint64 key: make every key collide and check nothing changes.
    values = minhash_lsh.signatures(*packed(planted_sets(seed=3, originals=60)), num_perm=128, seed=1)
    expected, _, _ = lsh_candidates(values, 0.5)
    monkeypatch.setattr(minhash_lsh, "_band_keys", lambda values, first, rows: np.zeros(len(values), np.uint64))
    pairs, candidates = minhash_lsh.banded_pairs(values, 25, 5, min_similarity=0.0)
    assert candidates == len(expected) and set(map(tuple, pairs.tolist())) == expected


def test_banded_pairs_of_nothing_and_bad_bands():
    pairs, candidates = minhash_lsh.near_duplicate_pairs(np.zeros((0, 128), np.uint32), 0.2)
    assert pairs.shape == (0, 2) and candidates == 0
    with pytest.raises(ValueError, match="30 bands of 5 rows need 150 values"):
        minhash_lsh.banded_pairs(np.zeros((3, 128), np.uint32), 30, 5, 0.0)
