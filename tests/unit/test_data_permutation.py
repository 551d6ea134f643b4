"""The keyed bijection behind the global order (data/permutation.py)."""

import numpy as np
import pytest

from data.permutation import IndexPermutation, derive_keys, uniform


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 100, 1000, 4097, 65537, 300_007])
def test_every_size_gets_a_bijection(n):
    perm = IndexPermutation(n, derive_keys("test", n))
    out = perm(np.arange(n))
    assert out.dtype == np.int64
    assert np.array_equal(np.sort(out), np.arange(n))


def test_random_access_equals_the_full_permutation():
    perm = IndexPermutation(10_001, derive_keys("k"))
    full = perm(np.arange(10_001))
    picks = np.array([0, 1, 5000, 9999, 10_000, 7, 7])
    assert np.array_equal(perm(picks), full[picks])
    assert np.array_equal(perm(np.arange(3000, 3100)), full[3000:3100])


def test_order_depends_on_the_key_only():
    n = 50_000
    a1 = IndexPermutation(n, derive_keys("fp", 0, 0))(np.arange(n))
    a2 = IndexPermutation(n, derive_keys("fp", 0, 0))(np.arange(n))
    b = IndexPermutation(n, derive_keys("fp", 0, 1))(np.arange(n))  # next epoch
    c = IndexPermutation(n, derive_keys("other-dataset", 0, 0))(np.arange(n))
    assert np.array_equal(a1, a2)
    assert (a1 != b).mean() > 0.99 and (a1 != c).mean() > 0.99


def test_it_shuffles_globally():
    n = 100_000
    out = IndexPermutation(n, derive_keys("shuffle"))(np.arange(n))
    # Neighbouring positions land far apart, and the order is uncorrelated with the position.
    assert np.median(np.abs(np.diff(out))) > n / 10
    assert abs(np.corrcoef(np.arange(n), out)[0, 1]) < 0.02
    # Every tenth of the dataset is represented evenly in the first 10% of positions.
    counts = np.bincount(out[: n // 10] * 10 // n, minlength=10)
    assert counts.min() > 0.8 * n / 100 and counts.max() < 1.2 * n / 100


def test_out_of_range_position_is_refused():
    with pytest.raises(IndexError):
        IndexPermutation(10, derive_keys("x"))(np.array([10]))


def test_uniform_is_deterministic_and_in_range():
    idx = np.arange(100_000, dtype=np.uint64)
    u = uniform(3, 1, idx)
    assert np.array_equal(u, uniform(3, 1, idx))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert not np.array_equal(u, uniform(4, 1, idx)) and not np.array_equal(u, uniform(3, 2, idx))
