"""Denoisers and priors: the exact Gaussian-mixture testbed model."""
from zmagic_jax.models._gmm import (
    GaussianMixture,
    component_x0_posterior,
    condition_on_linear,
    gaussian_mixture,
    linear_log_evidence,
    log_responsibilities,
    marginal_log_prob,
    marginal_score,
    mixture_eps_fn,
    posterior_mean_x0,
    responsibilities,
    sample_mixture,
    select_component,
    x0_posterior,
)
from zmagic_jax.models._stable_diffusion import (
    StableDiffusion,
    decode_latents,
    encode_prompt,
    latent_cfg_correction_fn,
    latent_eps_fn,
    load_stable_diffusion,
)
