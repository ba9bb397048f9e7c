"""Seeded, counter-based hashing: SplitMix64 (Steele, Lea & Flood 2014), the one home of its constants.

Every seeded draw in the project (template choice, noisy tools, split/negative sampling in
``prepare``, the synthetic world) is a hash of integer keys rather than a stateful RNG, so a
result never depends on how rows are partitioned across workers or processes (Python's
``hash()`` is salted per process and unusable here).

* :func:`mix64_` / :func:`mix64` -- the SplitMix64 finaliser on a uint64 array (in place / copy);
* :func:`splitmix64`             -- one SplitMix64 step: add the golden-ratio increment, finalise;
* :func:`hash_u64`               -- a multi-part key hash, ``h <- splitmix64(h + part)`` per part;
* :func:`mix64_int`              -- the finaliser on a Python int (scalar keys, no NumPy).

uint64 arithmetic wraps modulo 2**64, which is the point; nothing here imports from reasonrec.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN_INT = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: the SplitMix64 (Weyl) increment
MIX1_INT = 0xBF58476D1CE4E5B9  # finaliser multipliers (Stafford's "Mix13")
MIX2_INT = 0x94D049BB133111EB

GOLDEN = np.uint64(GOLDEN_INT)
MIX1 = np.uint64(MIX1_INT)
MIX2 = np.uint64(MIX2_INT)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix64_(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, IN PLACE on a uint64 array (no temporaries beyond one shift); returns
    ``x``. Only pass arrays you own (e.g. a fresh result of arithmetic)."""
    with np.errstate(over="ignore"):
        x ^= x >> _S30
        x *= MIX1
        x ^= x >> _S27
        x *= MIX2
        x ^= x >> _S31
    return x


def mix64(x) -> np.ndarray:
    """SplitMix64 finaliser on a copy of ``x`` (any integer array; negatives wrap to uint64)."""
    return mix64_(np.array(x).astype(np.uint64))


def splitmix64(x) -> np.ndarray:
    """One vectorised SplitMix64 step: ``mix64(x + GOLDEN)`` (``x`` integers, cast to uint64)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) + GOLDEN
    return mix64_(z)


def hash_u64(*parts) -> np.ndarray:
    """One well-mixed uint64 per element of the broadcast integer ``parts`` (at least 1-d):
    ``h = 0; h = splitmix64(h + part)`` for each part in order. Signed parts wrap to uint64."""
    h = np.zeros(np.broadcast_shapes(*(np.shape(x) for x in parts)) or (1,), np.uint64)
    for x in parts:
        x = np.asarray(x)
        with np.errstate(over="ignore"):
            h = h + GOLDEN + (x if x.dtype == np.uint64 else x.astype(np.int64).astype(np.uint64))
        mix64_(h)
    return h


def mix64_int(h: int) -> int:
    """SplitMix64 finaliser on a Python int in ``[0, 2**64)``."""
    h ^= h >> 30
    h = (h * MIX1_INT) & MASK64
    h ^= h >> 27
    h = (h * MIX2_INT) & MASK64
    return h ^ (h >> 31)
