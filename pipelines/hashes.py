"""Stable 64-bit hashes of strings: to count or match keys (skus, inputs) across processes
with 8 bytes a key instead of shuffling the strings. blake2b, not Python's `hash`, which
differs per process. Two keys sharing a hash (odds ~3e-6 among 10M keys) count as one."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def hash64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def hash64_array(keys: Iterable[str]) -> np.ndarray:
    return np.fromiter((hash64(k) for k in keys), np.uint64)


class DistinctHashes:
    """A growing set of hashes as sorted arrays; duplicates are folded every few million."""

    FOLD_EVERY = 4_000_000

    def __init__(self):
        self._parts: list[np.ndarray] = []
        self._pending = 0

    def add(self, hashes: np.ndarray) -> None:
        self._parts.append(hashes)
        self._pending += len(hashes)
        if self._pending > self.FOLD_EVERY:
            self._parts, self._pending = [self.distinct()], 0

    def distinct(self) -> np.ndarray:
        return np.unique(np.concatenate(self._parts)) if self._parts else np.zeros(0, np.uint64)

    def count(self) -> int:
        return len(self.distinct())
