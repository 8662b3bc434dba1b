"""Reverse-process solvers as pure step functions and the ``lax.scan`` driver."""
from zmagic_jax.samplers._base import Sampler, StepContext, step_contexts
from zmagic_jax.samplers._driver import ddim_invert, run_chain
from zmagic_jax.samplers._solvers import (
    ddim,
    ddpm_ancestral,
    ddpm_posterior,
    eta_mixing,
    predictor_corrector,
    sampler_by_name,
)
