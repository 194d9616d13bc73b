"""DuckDB 2.0's ``entropy`` / ``list_entropy`` reproduced bit for bit in compiled code (numba).

An entropy is a sum of floats, and a sum's last bit depends on the order of its terms. DuckDB
counts the values in a libstdc++ ``std::unordered_map`` keyed with its own hash (its MurmurHash64
finaliser, ``_duckdb_hash`` below), then adds ``(n / total) * log2(total / n)`` over the map in
iteration order, multiply and add fused into one rounding (its x86-64 wheel is built with FMA).
All three were found by matching DuckDB's results; pyproject pins duckdb 2.0, and another release
that hashes or sums otherwise fails the differential tests. This module replays that map:

- libstdc++ keeps every node on one singly linked list, grouped by bucket; a new key goes first in
  its bucket, or first of all when its bucket is empty;
- the table starts with 13 buckets and, when a key would make more keys than buckets, grows to the
  next of BUCKET_COUNTS (libstdc++'s prime rehash policy: the first listed prime >= twice the
  buckets), relinking the nodes in list order.

Only the order in which distinct keys first appear matters, so the keys are counted with a plain
table first and the map is replayed over the distinct keys. The differential tests of the quality
engines (tests/test_quality.py) compare every entropy exactly, and test the map against DuckDB.

    space = workspace(len(keys))  # once, for any number of calls with at most that many keys
    bits = entropy(keys, False, space)  # keys as BIGINT; True: as DOUBLE
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# libstdc++'s bucket counts for a map that grows one key at a time (13 at the first key, then the
# first prime of its list >= twice the count): far more than a list of 2^31 values can need.
BUCKET_COUNTS = np.array([
    13, 29, 59, 127, 257, 541, 1109, 2357, 5087, 10273, 20753, 42043, 85229, 172933, 351061, 712697,
    1447153, 2938679, 5967347, 12117689, 24607243, 49969847, 101473717, 206062531, 418451333,
    849749479, 1725587117, 3504151727,
], np.uint64)
EMPTY = -1  # a bucket without nodes, or no next node in a bucket
MURMUR_MULTIPLIER = np.uint64(0xD6E8FEB86659FD93)
DENSE_KEYS = 1 << 16  # keys within this of the smallest are counted in a table slot each
CACHED_TERMS = 64  # a term depends on its count alone: those of counts below this are kept

# A helper of a compiled loop is inlined into it: a call passing arrays costs their atomic reference
# counts, ~100 ns a call on this 2-core VM, more than many helpers' work on a file of a few hundred notes.
inlined = njit(cache=True, inline="always")


@intrinsic
def fused_multiply_add(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma: the FMA instruction, or libm's fma without one)."""
    signature = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, sig, args):
        double = ir.DoubleType()
        fma = builder.module.declare_intrinsic("llvm.fma", [double], ir.FunctionType(double, [double] * 3))
        return builder.call(fma, args)

    return signature, codegen


@intrinsic
def _high_product(typingctx, a, b):
    """The high 64 bits of the 128-bit product of two uint64 (one ``mul`` instruction)."""
    signature = types.uint64(types.uint64, types.uint64)

    def codegen(context, builder, sig, args):
        wide = ir.IntType(128)
        product = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
        return builder.trunc(builder.lshr(product, ir.Constant(wide, 64)), ir.IntType(64))

    return signature, codegen


@njit(cache=True)
def workspace(most_keys):
    """The arrays ``entropy`` works in, for up to ``most_keys`` keys a call: allocated once, reused."""
    level = 0
    while BUCKET_COUNTS[level] < most_keys:
        level += 1
    return (
        np.full(DENSE_KEYS, -1, np.int64),  # slot of each dense key seen (-1: none), reset after use
        np.empty(most_keys, np.int64),  # the distinct keys, first seen first
        np.empty(most_keys, np.int64),  # how often each occurs
        np.empty(most_keys, np.float64),  # the keys as DOUBLE
        np.empty(most_keys, np.uint64),  # their hash codes
        np.empty((3, most_keys), np.int64),  # map replay: list order, next node in bucket, buckets used
        np.full(np.int64(BUCKET_COUNTS[level]), EMPTY, np.int64),  # map replay: each bucket's newest node
        np.empty((2, CACHED_TERMS)),  # each small count's share and log
    )


@inlined
def entropy(keys, as_double, space):
    """DuckDB's entropy (bits) of ``keys`` (int64) taken as BIGINT, or as DOUBLE (whole numbers, so
    their DOUBLE values differ as the keys do); 0 for no keys."""
    slot_of, distinct, counts, doubles, codes, links, buckets, terms = space
    n = _count_first_seen(keys, slot_of, distinct, counts)
    if as_double:
        doubles[:n] = distinct[:n]
        _duckdb_hash(doubles[:n].view(np.uint64), codes)  # -0.0 would hash as 0.0; whole numbers have none
    else:
        _duckdb_hash(distinct[:n].view(np.uint64), codes)
    total = float(len(keys))
    terms[0, :] = -1.0
    bits = 0.0
    for key in map_order(codes[:n], links, buckets):
        count = counts[key]
        if count < CACHED_TERMS:
            if terms[0, count] < 0:
                terms[0, count], terms[1, count] = count / total, math.log2(total / count)
            bits = fused_multiply_add(terms[0, count], terms[1, count], bits)
        else:
            bits = fused_multiply_add(count / total, math.log2(total / count), bits)
    return bits


@inlined
def _duckdb_hash(values, hashes):
    """DuckDB's 64-bit hash (its MurmurHash64 finaliser) of each uint64 into ``hashes``."""
    for i, x in enumerate(values):
        x ^= x >> np.uint64(32)
        x *= MURMUR_MULTIPLIER
        x ^= x >> np.uint64(32)
        x *= MURMUR_MULTIPLIER
        hashes[i] = x ^ (x >> np.uint64(32))


@inlined
def _count_first_seen(keys, slot_of, distinct, counts):
    """Distinct keys into ``distinct`` in the order they first appear, their counts into ``counts``;
    returns how many. Keys within DENSE_KEYS of the smallest take a slot each in ``slot_of`` (left
    all -1 again), others a hash table."""
    if len(keys) == 0:
        return 0
    low = keys.min()
    if keys.max() - low >= DENSE_KEYS:
        return _count_sparse(keys, distinct, counts)
    found = 0
    for key in keys:
        at = slot_of[key - low]
        if at < 0:
            slot_of[key - low] = found
            distinct[found] = key
            counts[found] = 1
            found += 1
        else:
            counts[at] += 1
    for i in range(found):
        slot_of[distinct[i] - low] = -1
    return found


@njit(cache=True)
def _count_sparse(keys, distinct, counts):
    bits = 4
    while (1 << bits) < 2 * len(keys):
        bits += 1
    mask = (1 << bits) - 1
    slots = np.full(1 << bits, -1, np.int64)
    found = 0
    for key in keys:
        slot = np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits))
        while True:
            at = slots[slot]
            if at < 0:
                slots[slot] = found
                distinct[found] = key
                counts[found] = 1
                found += 1
                break
            if distinct[at] == key:
                counts[at] += 1
                break
            slot = (slot + 1) & mask
    return found


@inlined
def map_order(codes, links, buckets):
    """Positions of keys inserted in this order, with these hash codes, in libstdc++'s iteration
    order. ``links`` (3 x keys) and ``buckets`` (the final table size, all EMPTY and left so) are
    work space."""
    sequence, next_in_bucket, buckets_used = links[0, :len(codes)], links[1, :len(codes)], links[2, :len(codes)]
    inserted, level = 0, 0
    while inserted < len(codes):  # a table size at a time
        n_buckets = BUCKET_COUNTS[level]
        stop = min(len(codes), np.int64(n_buckets))
        # a rehash relinks the nodes in list order exactly as inserting them anew would; the new
        # keys follow
        for key in range(inserted, stop):
            sequence[key] = key
        _relink(sequence[:stop], codes, n_buckets, next_in_bucket, buckets_used, buckets)
        inserted, level = stop, level + 1
    return sequence


@inlined
def _relink(nodes, codes, n_buckets, next_in_bucket, buckets_used, buckets):
    """The list the nodes make, inserted in this order into empty buckets, into ``nodes``: the
    buckets newest first (a node into an empty bucket goes first of all), each bucket's nodes newest
    first. The nodes are chained per bucket first, counting the buckets used with a select: the
    linked list's inserts would branch three ways at random."""
    reciprocal = np.uint64(0xFFFFFFFFFFFFFFFF) // n_buckets
    n_used = 0
    for node in nodes:
        bucket = _remainder(codes[node], n_buckets, reciprocal)
        newest = buckets[bucket]
        buckets_used[n_used] = bucket
        n_used += newest == EMPTY
        next_in_bucket[node] = newest
        buckets[bucket] = node
    at = 0
    for used in range(n_used - 1, -1, -1):
        bucket = buckets_used[used]
        node = buckets[bucket]
        buckets[bucket] = EMPTY
        while node != EMPTY:
            nodes[at] = node
            at += 1
            node = next_in_bucket[node]


@njit(cache=True)
def _remainder(code, divisor, reciprocal):
    """code % divisor by Barrett reduction (``reciprocal``: 2^64 - 1 // divisor): a 64-bit division
    costs tens of cycles, a multiply a few."""
    remainder = code - _high_product(code, reciprocal) * divisor  # the quotient is at most 2 short
    # selects, not a loop: how often it would run is random, and a mispredicted branch costs ~15 cycles
    remainder = remainder - divisor if remainder >= divisor else remainder
    return remainder - divisor if remainder >= divisor else remainder
