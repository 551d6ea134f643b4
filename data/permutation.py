"""A seeded bijection of [0, n): the global shuffle without materialising a permutation.

Pretraining sets hold billions of sequences; a `np.random.permutation(n)` per epoch (what
OLMo-core writes to `global_indices.npy`, and Megatron-LM's `shuffle_idx`) costs O(n) memory
and time before the first batch. Instead, position p of an epoch maps to sequence
`perm(p)`, computed on demand:

- a balanced Feistel network over the smallest even-bit domain 2^(2h) ≥ n (any round function
  gives a bijection of the domain; ours is the splitmix64 finaliser keyed per round), then
- cycle walking: while the image lies outside [0, n), apply the network again. Walking along
  the domain permutation's cycles restricted to [0, n) is itself a bijection of [0, n)
  (Black & Rogaway, "Ciphers with Arbitrary Finite Domains", 2002). The domain is < 4n, so a
  walk averages under 4 steps.

So random access is O(1) per position (resuming anywhere is free), memory is O(batch), and the
order depends only on the key, never on how many ranks read it or how long the run is planned.
All arithmetic is vectorised uint64 numpy (wrapping multiplication is intended).
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al., 2014): a fast, well-avalanched uint64 → uint64 hash."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def uniform(seed: int, stream: int, index: np.ndarray) -> np.ndarray:
    """Deterministic floats in [0, 1) for (seed, stream, index): per-item randomness with no RNG state."""
    key = np.uint64((seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03) % 2**64)
    bits = mix64(mix64(np.asarray(index, dtype=np.uint64) ^ key))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def derive_keys(*parts: object, rounds: int = ROUNDS) -> np.ndarray:
    """Round keys from a SHA-256 of the parts (e.g. fingerprint, seed, epoch): stable across platforms."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    while len(digest) < 8 * rounds:
        digest += hashlib.sha256(digest).digest()
    return np.frombuffer(digest[: 8 * rounds], dtype="<u8").astype(np.uint64)


class IndexPermutation:
    """perm: [0, n) → [0, n), bijective, keyed. `perm(np.array([...]))` maps positions to indices."""

    def __init__(self, n: int, keys: np.ndarray):
        if n < 1:
            raise ValueError(f"permutation of {n} elements")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self._shift = np.uint64(self.half)
        self._mask = np.uint64((1 << self.half) - 1)
        self.keys = np.asarray(keys, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._shift, x & self._mask
        for k in self.keys:
            left, right = right, left ^ (mix64(right ^ k) & self._mask)
        return (left << self._shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"position {int(x.max())} outside [0, {self.n})")
        y = self._feistel(x)
        outside = np.flatnonzero(y >= self.n)
        while outside.size:  # cycle walking: only the stragglers are re-encrypted
            y[outside] = self._feistel(y[outside])
            outside = outside[y[outside] >= self.n]
        return y.astype(np.int64)
