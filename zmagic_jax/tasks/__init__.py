"""Task recipes: conditions, energies and exact references for a setting."""
from zmagic_jax.tasks._testbed import (
    LinearMeasurement,
    Testbed,
    TestbedCondition,
    class_condition,
    exact_posterior,
    joint_exact_nll,
    make_testbed,
    measurement_condition,
)
from zmagic_jax.tasks._testbed_demo import DemoSettings, run_testbed_demo
