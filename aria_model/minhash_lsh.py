"""MinHash signatures and LSH candidate pairs for a whole corpus at once, compiled with numba.

datasketch stays the reference: ``signatures`` gives the hash values of ``MinHash.bulk(sets,
num_perm, seed, hashfunc=int)`` bit for bit (datasketch 2.0's default "affine32" scheme, uint32
values), and ``banded_pairs`` the pairs that ``MinHashLSH(threshold, num_perm)`` would return
after inserting every signature and querying each: the same bands and rows (``band_params`` asks
a MinHashLSH for them), a pair being a candidate when all the values of one of its bands agree.
tests/test_minhash_lsh.py checks both against datasketch.

Why not datasketch's own objects: ``MinHash.bulk`` hashes each element through a Python call, and
MinHashLSH keeps Python dicts per band: ~150 us of CPU and ~5.6 KiB per signature (7 GB for
Aria-MIDI's 1.2M files). Here a signature is one row of a uint32 matrix (num_perm x 4 bytes), and
a band is one sort of the corpus's band values, so candidates are runs of equal values; each pair
is counted in the first band it shares only, as a set of query results would count it once.
Measured (2-core Xeon VM): 13-15 ns an element at 128 permutations, against 220-340 for ``MinHash.bulk``
with an identity hash (reference/orchestration.md §6), and ~6-9 us a signature for all 28 bands
at threshold 0.2 with ~20 candidate pairs each, against ~140 us for MinHashLSH insert + query.

    values = signatures(shingles, offsets, num_perm=128, seed=1)        # files x 128, uint32
    pairs, candidates = near_duplicate_pairs(values, threshold=0.2)     # rows (i, j), i < j, estimated J >= 0.2

Each band is an independent sort: split by band, the work spreads over processes or machines
(datatrove's minhash stages do the same), which is the way out if one machine's memory no longer
holds the signature matrix.
"""

from __future__ import annotations

import functools

import numpy as np
from datasketch import MinHash, MinHashLSH
from numba import njit

SCHEME = "affine32"  # datasketch 2.0's default: the scheme of every signature here
EMPTY = np.uint32(0xFFFFFFFF)  # the value of a permutation no element reached: datasketch's empty MinHash
_MIX = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: mixes a band of more than two values into a key


@functools.lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own permutations ``a * h + b mod 2^32`` of MinHash(num_perm, seed), uint32."""
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations
    return a, b


@functools.lru_cache(maxsize=8)
def band_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for ``threshold`` and ``num_perm``."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


@njit(cache=True)
def _fmix32(value):
    """MurmurHash3's finaliser, which affine32 applies once to each input hash (datasketch.minhash._fmix)."""
    value ^= value >> np.uint32(16)
    value = np.uint32(value * np.uint32(0x85EBCA6B))
    value ^= value >> np.uint32(13)
    value = np.uint32(value * np.uint32(0xC2B2AE35))
    return value ^ (value >> np.uint32(16))


@njit(cache=True)
def minhash_into(elements, a, b, values):
    """``values[p]`` = min over ``elements`` of ``a[p] * fmix(e) + b[p] mod 2^32`` (``EMPTY`` if none).

    The identity hash: elements are uint32 already. The inner loop runs over the permutations,
    which the compiler vectorises (~13 ns an element at 128 permutations).
    """
    values[:] = EMPTY
    for element in elements:
        hashed = _fmix32(np.uint32(element))
        for p in range(len(a)):
            values[p] = min(values[p], np.uint32(a[p] * hashed + b[p]))


@njit(cache=True)
def _minhash_rows(elements, offsets, a, b, values):
    for row in range(len(offsets) - 1):
        minhash_into(elements[offsets[row]: offsets[row + 1]], a, b, values[row])


def signatures(elements: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """MinHash values (sets x num_perm, uint32) of the sets ``elements[offsets[i]: offsets[i + 1]]``."""
    a, b = permutations(num_perm, seed)
    values = np.empty((len(offsets) - 1, num_perm), np.uint32)
    _minhash_rows(np.asarray(elements, np.uint32), np.asarray(offsets, np.int64), a, b, values)
    return values


def near_duplicate_pairs(values: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """MinHashLSH(threshold)'s candidate pairs whose estimated Jaccard similarity reaches ``threshold``.

    Returns (pairs, candidates): the pairs (i, j), i < j, of rows of ``values`` (int32, in the
    order the bands find them), and the number of candidate pairs before the similarity check.
    """
    bands, rows = band_params(threshold, values.shape[1])
    return banded_pairs(values, bands, rows, threshold)


def banded_pairs(values: np.ndarray, bands: int, rows: int, min_similarity: float) -> tuple[np.ndarray, int]:
    """Pairs of rows that agree on all ``rows`` values of one of the first ``bands`` bands and on at
    least ``min_similarity`` of all values (0: every candidate), and the number of candidates.

    Memory beyond ``values``: one band's keys and sort order (16 bytes a row) and the pairs found
    (8 bytes each, twice while they are joined at the end).
    """
    if bands * rows > values.shape[1]:
        raise ValueError(f"{bands} bands of {rows} rows need {bands * rows} values per signature, not {values.shape[1]}")
    if len(values) > np.iinfo(np.int32).max:
        raise ValueError(f"{len(values):,} signatures: more than one machine's LSH holds, split the corpus by band")
    found, candidates = [np.zeros((0, 2), np.int32)], 0
    for band in range(bands):
        keys = _band_keys(values, band * rows, rows)
        pairs, new = _band_pairs(values, keys, np.argsort(keys), band, rows, min_similarity)
        found.append(pairs)
        candidates += new
    return np.concatenate(found), candidates


@njit(cache=True)
def _band_keys(values, first, rows):
    """One uint64 per signature: its band's values side by side (exact up to two rows), else mixed."""
    keys = np.zeros(len(values), np.uint64)
    for i in range(len(values)):
        key = np.uint64(0)
        for column in range(first, first + rows):
            if rows <= 2:
                key = (key << np.uint64(32)) | np.uint64(values[i, column])
            else:  # two bands can share a key: _band_pairs compares the values themselves
                key = (key ^ np.uint64(values[i, column])) * _MIX
        keys[i] = key
    return keys


@njit(cache=True)
def _agree(values, i, j, start, stop):
    for column in range(start, stop):
        if values[i, column] != values[j, column]:
            return False
    return True


@njit(cache=True)
def _first_shared_band(values, i, j, bands, rows):
    for band in range(bands):
        if _agree(values, i, j, band * rows, (band + 1) * rows):
            return band
    return bands


@njit(cache=True)
def _similarity(values, i, j):
    """Share of equal values: the estimated Jaccard similarity (datasketch's MinHash.jaccard)."""
    equal = 0
    for column in range(values.shape[1]):
        equal += values[i, column] == values[j, column]
    return equal / values.shape[1]


@njit(cache=True)
def _band_pairs(values, keys, order, band, rows, min_similarity):
    """The pairs of one band: rows with the same key, sharing no earlier band, similar enough."""
    pairs = np.empty((max(len(order), 16), 2), np.int32)
    found = candidates = 0
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and keys[order[stop]] == keys[order[start]]:
            stop += 1
        for x in range(start, stop):
            for y in range(x + 1, stop):
                i, j = min(order[x], order[y]), max(order[x], order[y])
                if _first_shared_band(values, i, j, band + 1, rows) != band:
                    continue  # another band's key (rows > 2), or found in an earlier band
                candidates += 1
                if _similarity(values, i, j) >= min_similarity:
                    if found == len(pairs):
                        pairs = np.concatenate((pairs, np.empty_like(pairs)))
                    pairs[found, 0], pairs[found, 1] = i, j
                    found += 1
        start = stop
    return pairs[:found].copy(), candidates
