"""How guidance from several conditions combines into one displacement."""
from zmagic_jax.schemes._cagrad import cagrad, cagrad_weights
from zmagic_jax.schemes._conditions import Condition, condition, energies_and_grads
from zmagic_jax.schemes._schemes import (
    Dependent,
    GuidanceInfo,
    Independent,
    Multi,
    NoGuidance,
    dependent,
    dependent_terms,
    model_led_term,
    direction,
    independent,
    multi,
    none,
    scheme_by_name,
)
