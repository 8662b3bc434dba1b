"""Shared fixtures: small closed-form denoisers and tiny random SD / CLIP models used across the suite."""
import os

# Nothing in the suite may reach for the Hugging Face hub: every model is a local folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import zmagic_jax as zm  # noqa: E402

# XLA options of the programs the SD / face / text-style tests compile: optimisation level 0
# compiles those programs several times faster, and they run a few times each. (Not for the
# digits task: its programs run long enough that level 0 makes the file slower overall.)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _mlp_apply(params, x, t):
    w1, b1, w2, wt = params
    h = jnp.tanh(w1 @ x + b1 + wt * jnp.sin(jnp.asarray(t, x.dtype) / 100.0))
    return 0.5 * x + w2 @ h


def mlp_denoiser(key, dim, hidden=16, dtype=jnp.float32):
    """A small random MLP noise predictor: its Jacobian is not symmetric, as for a real network."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = (jax.random.normal(k1, (hidden, dim), dtype) / jnp.sqrt(dim),
              0.1 * jax.random.normal(k2, (hidden,), dtype),
              jax.random.normal(k3, (dim, hidden), dtype) / jnp.sqrt(hidden),
              jax.random.normal(k4, (hidden,), dtype))
    return zm.Denoiser(_mlp_apply, params)


def _gaussian_apply(params, x, t):
    mean, var, alphas_cumprod = params
    ab = alphas_cumprod[t]
    score = -(x - jnp.sqrt(ab) * mean) / (ab * var + 1.0 - ab)
    return -jnp.sqrt(1.0 - ab) * score


def gaussian_denoiser(schedule, mean, var, dtype=jnp.float32):
    """Exact eps of the VP marginals of a Gaussian prior N(mean, diag(var))."""
    return zm.Denoiser(_gaussian_apply, (jnp.asarray(mean, dtype), jnp.asarray(var, dtype),
                                         jnp.asarray(schedule.alphas_cumprod, dtype)))


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
    with jax.enable_x64():
        yield


@pytest.fixture(scope="session")
def tiny_sd_dirs(tmp_path_factory):
    """A tiny random Stable Diffusion saved as a diffusers folder with safetensors weights
    (``path``) and the Flax params written (see ``experiments/tiny_models.py``; no PyTorch)."""
    from experiments.tiny_models import save_tiny_stable_diffusion
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd") / "sd")


@pytest.fixture(scope="session")
def tiny_clip_dirs(tmp_path_factory):
    """A tiny random CLIP saved as a transformers folder (``path``) and its Flax params."""
    from experiments.tiny_models import save_tiny_clip
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


@pytest.fixture(scope="session")
def canvas_assets(tmp_path_factory):
    """A canvas-assets folder of random weights of the real architectures, written by
    experiments/train_canvas_digits.py's own writer."""
    from experiments.tiny_models import save_sd_folder
    from experiments.train_canvas_digits import (EVALUATOR, LAYOUT_UNET, MAX_TOKENS, SCHEDULER, UNET, Nets,
                                                 text_config, vocabulary, write_assets)
    from zmagic_jax.checkpoint_io import save_params
    from zmagic_jax.models._digits import DigitClassifier, DigitClassifierConfig

    root = tmp_path_factory.mktemp("canvas")
    vocab, merges = vocabulary()
    folders = {}
    for seed, (name, unet) in enumerate((("text", UNET), ("layout", LAYOUT_UNET))):
        params = Nets(unet, text_config(vocab)).init(seed)
        folders[name] = save_sd_folder(root / "work" / name, unet=unet, unet_params=params["unet"],
                                       text=text_config(vocab), text_params=params["text"], vocab=vocab,
                                       merges=merges, scheduler=SCHEDULER, model_max_length=MAX_TOKENS)
    module = DigitClassifier(config=DigitClassifierConfig(**EVALUATOR))
    save_params(root / "work" / "evaluator.safetensors",
                module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"])
    write_assets(root / "assets", folders, root / "work" / "evaluator.safetensors", {}, {}, seed=0)
    return root / "assets"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Each test file runs whole on one pytest-xdist worker (``--dist loadgroup``), so its
    module-scoped fixtures and compiled programs are built once; files that share compiled
    programs name a common ``xdist_group`` (tests/test_cli.py and tests/tasks/test_digits.py)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
