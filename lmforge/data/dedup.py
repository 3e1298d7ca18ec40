"""Duplicate detection: exact (a hash per document) and near (MinHash LSH over word shingles).

Signatures are pure functions of the text, so worker processes compute them; the `seen_before`
checks hold the state and run in one process, in corpus order, which keeps the output
deterministic whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

from lmforge.errors import LmforgeError

_SCHEME = "affine32"  # datasketch's default permutation scheme, named so signatures round-trip


def exact_signature(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, words_per_shingle: int = 5) -> set[bytes]:
    words = text.lower().split()
    n = words_per_shingle
    if len(words) <= n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def minhash_signature(text: str, num_perm: int = 128, words_per_shingle: int = 5) -> np.ndarray:
    # crc32 runs in C and is stable across runs (Python's hash() is salted per process).
    mh = MinHash(num_perm=num_perm, hashfunc=zlib.crc32, scheme=_SCHEME)
    mh.update_batch(list(shingles(text, words_per_shingle)))
    return mh.hashvalues


class ExactDuplicateFilter:
    """Remembers a 16-byte digest per kept document (~100 bytes each in a Python set)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def seen_before(self, digest: bytes) -> bool:
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


class NearDuplicateFilter:
    """Flags a document whose estimated Jaccard similarity to a kept one reaches `threshold`.

    LSH bands the signatures, so each check costs about the same however many documents
    were kept (memory grows by ~1 KB per kept document).
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 128) -> None:
        if not 0.0 < threshold <= 1.0:
            raise LmforgeError(f"--near-threshold must be in (0, 1], got {threshold}")
        if num_perm < 2:
            raise LmforgeError(f"--near-num-perm must be >= 2 (MinHash LSH needs two permutations), got {num_perm}")
        self.num_perm = num_perm
        try:
            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        except ValueError as e:  # datasketch: too few permutations to cut into >= 2 bands at this threshold
            raise LmforgeError(
                f"--near-num-perm {num_perm} is too few for --near-threshold {threshold} ({e}); "
                "raise --near-num-perm or lower --near-threshold"
            ) from None
        self._next_key = 0

    def seen_before(self, hashvalues: np.ndarray) -> bool:
        mh = MinHash(num_perm=self.num_perm, hashvalues=hashvalues, scheme=_SCHEME)
        if self._lsh.query(mh):
            return True
        self._lsh.insert(self._next_key, mh, check_duplication=False)
        self._next_key += 1
        return False
