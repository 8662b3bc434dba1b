"""How guidance from several conditions combines into one displacement: schemes as data."""
from zmagic_jax.schemes._cagrad import cagrad, cagrad_weights
from zmagic_jax.schemes._conditions import Condition, condition, energies_and_grads, energy_vector
from zmagic_jax.schemes._info import GuidanceInfo, guidance_info
from zmagic_jax.schemes._schemes import (
    Dependent,
    DependentTerms,
    Independent,
    Multi,
    NoGuidance,
    dependent,
    dependent_terms,
    direction,
    every_step_guided,
    independent,
    model_led_term,
    multi,
    none,
)
