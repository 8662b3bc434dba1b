"""zmagic_jax: zero-shot multi-attribute guided diffusion in JAX.

FreeDoM-style independent guidance, Z-Magic conditional-dependent guidance (Algorithm 1: the
second condition's gradient pulled back through the step guided by the first, an exact
Jacobian/Hessian-vector product) and Z-Magic multi-condition guidance (Algorithm 2: CAGrad over
every ordered pair), on DDPM, DDIM and predictor-corrector samplers driven by one ``lax.scan``.
"""
from zmagic_jax.geometry import energy_curves, guided_cosines, loss_landscape, mean_guided_cosine
from zmagic_jax.samplers import (
    Sampler,
    StepContext,
    ddim,
    ddim_invert,
    ddpm_ancestral,
    ddpm_posterior,
    eta_mixing,
    predictor_corrector,
    run_chain,
    sampler_by_name,
    step_contexts,
)
from zmagic_jax.sampling import TimeTravel, guided_kernel, sample, time_travel
from zmagic_jax.schedules import (
    Schedule,
    TimestepGrid,
    alpha_bar,
    cosine_schedule,
    eps_from_score,
    eps_from_x0,
    linear_schedule,
    scaled_linear_schedule,
    score_from_eps,
    timestep_grid,
    x0_from_eps,
)
from zmagic_jax.schemes import (
    Condition,
    GuidanceInfo,
    cagrad,
    cagrad_weights,
    condition,
    dependent,
    dependent_terms,
    model_led_term,
    direction,
    independent,
    multi,
    none,
    scheme_by_name,
)
from zmagic_jax.step_rules import (
    StepRule,
    cfg_relative_rule,
    freedom_rule,
    norm_relative_rule,
    schedule_rule,
    score_rule,
)

__version__ = "0.1.0"
