"""zmagic_jax: zero-shot multi-attribute guided diffusion in JAX.

FreeDoM-style independent guidance, Z-Magic conditional-dependent guidance (Algorithm 1: the
second condition's gradient pulled back through the step guided by the first, an exact
Jacobian/Hessian-vector product) and Z-Magic multi-condition guidance (Algorithm 2: CAGrad over
every ordered pair), on DDPM, DDIM and predictor-corrector samplers driven by one ``lax.scan``.

Everything is data: a :class:`Denoiser` carries its weights, a :class:`Condition` its energy's
parameters and a :class:`StepRule` whose numbers are leaves, a scheme its conditions and its own
``direction`` method. :func:`step` and :func:`sample_chain` are pure kernels for your own
``jit`` / ``vmap`` / ``grad``; :func:`sample` is the jitted, batched, sharded convenience.
AMDM (several models sampled together, their states aggregated) has the same three layers:
:func:`aggregate_step`, :func:`aggregate_chain`, :func:`aggregate_sample`. COW (cyclic one-way
diffusion, a visual condition kept exact while the rest grows around it) is :mod:`zmagic_jax.oneway`,
SOW's attention modulation :mod:`zmagic_jax.modulation`. Concept learning by EM (tokens and
latent masks learned together from one image) is :mod:`zmagic_jax.concepts`, on the dense CRF of
:mod:`zmagic_jax.crf`.
"""
from zmagic_jax.aggregation import (
    AggregateContext,
    AggregateInfo,
    AggregateState,
    Aggregated,
    Aggregation,
    DenoiserStack,
    aggregate_chain,
    aggregate_sample,
    aggregate_states,
    aggregate_step,
    aggregation,
    aggregation_contexts,
    deviate,
    level_mu,
    release_steps,
    released_mu,
    released_weights,
    slerp,
    stack_denoisers,
)
from zmagic_jax import crf, modulation, oneway
from zmagic_jax.contracts import Denoiser, Energy, static_partial
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
    step_context,
    step_contexts,
)
from zmagic_jax.sampling import Record, Samples, TimeTravel, sample, sample_chain, step, time_travel
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
    DependentTerms,
    GuidanceInfo,
    cagrad,
    cagrad_weights,
    condition,
    dependent,
    dependent_terms,
    direction,
    energies_and_grads,
    every_step_guided,
    guidance_info,
    independent,
    model_led_term,
    multi,
    none,
)
from zmagic_jax.step_rules import (
    StepRule,
    cfg_relative_rule,
    freedom_rule,
    norm_relative_rule,
    schedule_rule,
    score_rule,
)

__version__ = "0.4.0"


def __getattr__(name):
    # concepts sits on the Flax models; importing it lazily keeps `import zmagic_jax.samplers` (and
    # every layer below the models) free of Flax
    if name == "concepts":
        import importlib
        return importlib.import_module("zmagic_jax.concepts")
    raise AttributeError(f"module 'zmagic_jax' has no attribute {name!r}")
