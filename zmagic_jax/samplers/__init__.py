"""Reverse-process solvers as pure step functions (their numbers are pytree leaves) and DDIM inversion."""
from zmagic_jax.samplers._base import Sampler, StepContext, step_context, step_contexts, with_score_coef
from zmagic_jax.samplers._driver import ddim_invert
from zmagic_jax.samplers._solvers import ddim, ddpm_ancestral, ddpm_posterior, eta_mixing, predictor_corrector
