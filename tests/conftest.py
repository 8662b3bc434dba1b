"""Shared fixtures: small closed-form denoisers and tiny random SD / CLIP models used across the suite."""
import os

# Nothing in the suite may reach for the Hugging Face hub: every model is a local folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def mlp_eps_fn(key, dim, hidden=16, dtype=jnp.float32):
    """A small random MLP noise predictor: its Jacobian is not symmetric, as for a real network."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w1 = jax.random.normal(k1, (hidden, dim), dtype) / jnp.sqrt(dim)
    b1 = 0.1 * jax.random.normal(k2, (hidden,), dtype)
    w2 = jax.random.normal(k3, (dim, hidden), dtype) / jnp.sqrt(hidden)
    wt = jax.random.normal(k4, (hidden,), dtype)

    def eps_fn(x, t):
        h = jnp.tanh(w1 @ x + b1 + wt * jnp.sin(jnp.asarray(t, dtype) / 100.0))
        return 0.5 * x + w2 @ h
    return eps_fn


def gaussian_eps_fn(schedule, mean, var):
    """Exact eps of the VP marginals of a Gaussian prior N(mean, diag(var))."""
    def eps_fn(x, t):
        ab = schedule.alphas_cumprod[t]
        score = -(x - jnp.sqrt(ab) * mean) / (ab * var + 1.0 - ab)
        return -jnp.sqrt(1.0 - ab) * score
    return eps_fn


def random_mixture_params(seed, num=3, dim=3, mean_std=1.5, jitter=0.1):
    """Positive weights, means and random SPD covariances of a mixture (numpy, float64)."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 2.0, num)
    means = rng.normal(0.0, mean_std, (num, dim))
    roots = rng.normal(size=(num, dim, dim))
    covs = roots @ roots.transpose(0, 2, 1) / dim + jitter * np.eye(dim)
    return weights, means, covs


@pytest.fixture
def x64():
    with jax.experimental.enable_x64():
        yield


@pytest.fixture(scope="session")
def tiny_sd_dirs(tmp_path_factory):
    """A tiny random Stable Diffusion saved as PyTorch (``pt``, ``pt_bin``) and Flax (``flax``)
    diffusers folders, plus its PyTorch modules (see ``experiments/tiny_models.py``)."""
    pytest.importorskip("torch")
    from experiments.tiny_models import save_tiny_stable_diffusion
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_clip_dirs(tmp_path_factory):
    """A tiny random CLIP saved as PyTorch (``pt``) and Flax (``flax``) folders."""
    pytest.importorskip("torch")
    from experiments.tiny_models import save_tiny_clip
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
