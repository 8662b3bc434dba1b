"""Sample-set distances against scipy and brute-force references."""
import jax
import numpy as np
import pytest
from jax import enable_x64
from scipy.spatial.distance import cdist
from scipy.stats import energy_distance as scipy_energy_distance
from scipy.stats import wasserstein_distance

from zmagic_jax.metrics import energy_distance, frechet_distance, sliced_wasserstein

KEY = jax.random.PRNGKey(0)


@pytest.fixture(autouse=True)
def x64():
    with enable_x64():
        yield


def ref_energy_distance_squared(x, y):
    return 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()


def test_energy_distance_matches_scipy_in_1d():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(0.3, 1.5, size=70)
    expected = scipy_energy_distance(x, y)
    np.testing.assert_allclose(energy_distance(x[:, None], y[:, None]), expected, rtol=1e-10)
    np.testing.assert_allclose(energy_distance(x[:, None], y[:, None], squared=True), expected ** 2,
                               rtol=1e-10)


def test_energy_distance_matches_brute_force_across_blocks():
    # m * d = 128000 makes each block 32 rows, so 300 rows leave a partial last block.
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 64)), rng.normal(0.1, 1.0, size=(2000, 64))
    np.testing.assert_allclose(energy_distance(x, y, squared=True),
                               ref_energy_distance_squared(x, y), rtol=1e-9)


def test_energy_distance_zero_symmetric_and_grows_with_shift():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(200, 3)), rng.normal(size=(150, 3))
    # Equal sets: the three mean distances are the same sums, but XLA may order the reductions of
    # the three calls differently (it does on jax 0.12), so D^2 is zero to float64 round-off.
    assert float(energy_distance(x, x.copy(), squared=True)) <= 1e-14
    np.testing.assert_allclose(energy_distance(x, y), energy_distance(y, x), rtol=1e-12)
    values = [float(energy_distance(x, y + shift)) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert np.all(np.diff(values) > 0) and values[-1] > 5 * values[0]


def test_energy_distance_handles_4000_samples_in_64d():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4000, 64)).astype(np.float32)
    y = rng.normal(0.2, 1.0, size=(500, 64)).astype(np.float32)
    with enable_x64(False):  # the float32 setting of real runs
        value = energy_distance(x, y, squared=True)
    assert value.dtype == np.float32
    np.testing.assert_allclose(value, ref_energy_distance_squared(x.astype(float), y.astype(float)),
                               rtol=1e-2)


def test_sliced_w1_is_scipy_wasserstein_in_1d():
    rng = np.random.default_rng(4)
    for n, m in [(40, 40), (37, 53), (1, 9), (100, 7)]:
        x, y = rng.normal(size=n), rng.normal(0.5, 2.0, size=m)
        np.testing.assert_allclose(
            sliced_wasserstein(KEY, x[:, None], y[:, None], p=1),
            wasserstein_distance(x, y), rtol=1e-10)


def test_sliced_w2_in_1d_is_exact_quantile_coupling():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=30), rng.normal(1.0, 0.5, size=30)
    np.testing.assert_allclose(sliced_wasserstein(KEY, x[:, None], y[:, None], p=2),
                               np.sqrt(np.mean((np.sort(x) - np.sort(y)) ** 2)), rtol=1e-10)
    # Unequal sizes: replicating x m times and y n times gives equal-size sets with the same
    # empirical distributions, where the sorted matching is exact.
    x, y = rng.normal(size=6), rng.normal(size=4)
    expected = np.sqrt(np.mean((np.sort(np.repeat(x, 4)) - np.sort(np.repeat(y, 6))) ** 2))
    np.testing.assert_allclose(sliced_wasserstein(KEY, x[:, None], y[:, None], p=2), expected,
                               rtol=1e-10)


def test_sliced_wasserstein_unequal_sizes_equal_replicated_sets():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(9, 4))
    np.testing.assert_allclose(sliced_wasserstein(KEY, x, y),
                               sliced_wasserstein(KEY, np.repeat(x, 3, 0), np.repeat(y, 2, 0)),
                               rtol=1e-10)


def test_sliced_wasserstein_zero_symmetric_and_shift():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(300, 8))
    assert float(sliced_wasserstein(KEY, x, x.copy(), num_projections=1000)) == 0.0
    np.testing.assert_allclose(sliced_wasserstein(KEY, x, y, num_projections=1000),
                               sliced_wasserstein(KEY, y, x, num_projections=1000), rtol=1e-12)
    values = [float(sliced_wasserstein(KEY, x, y + s, num_projections=1000))
              for s in (0.0, 0.5, 1.0, 2.0)]
    assert np.all(np.diff(values) > 0)
    # A pure shift s moves every projection by theta . s, so SW_2^2 = E (theta . s)^2 = |s|^2 / d.
    shift = np.full(8, 0.5)
    value = sliced_wasserstein(KEY, x, x + shift, num_projections=1000)
    # Monte Carlo over directions: relative std of the estimate is about 2% here.
    np.testing.assert_allclose(value, np.linalg.norm(shift) / np.sqrt(8), rtol=0.08)


def test_validation():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="same d"):
        energy_distance(x, np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"x\[:, None\]"):
        sliced_wasserstein(KEY, np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="at least one sample"):
        energy_distance(x, np.zeros((0, 3)))
    with pytest.raises(ValueError, match="p must be >= 1"):
        sliced_wasserstein(KEY, x, x, p=0.5)
    with pytest.raises(ValueError, match="num_projections must be >= 1"):
        sliced_wasserstein(KEY, x, x, num_projections=0)


def test_frechet_distance_matches_scipy_sqrtm_formula():
    from scipy.linalg import sqrtm
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    y = 0.5 + rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(cx + cy - 2 * np.real(sqrtm(cx @ cy)))
    assert abs(frechet_distance(x, y) - ref) < 1e-8 * ref
    assert frechet_distance(x, x) < 1e-9 * np.trace(cx)
    assert abs(frechet_distance(x, y) - frechet_distance(y, x)) < 1e-9 * ref
    one_d = frechet_distance(x[:, :1], y[:, :1])
    assert abs(one_d - ((x[:, 0].mean() - y[:, 0].mean()) ** 2 + (x[:, 0].std(ddof=1) - y[:, 0].std(ddof=1)) ** 2)) < 1e-9
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(x[:1], y)
