"""Task recipes: conditions, energies and exact references for a setting."""
from zmagic_jax.tasks._aggregate import (
    AggregateResult,
    AggregateSettings,
    aggregate_report,
    check_compatible,
    load_aggregate_models,
    run_aggregate,
    save_aggregate,
)
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
from zmagic_jax.tasks._text_style import (
    TEXT_STYLE_SCHEMES,
    TextStyleModels,
    TextStyleResult,
    TextStyleSamples,
    TextStyleSettings,
    load_style_image,
    load_text_style_models,
    run_text_style,
    sample_text_style,
    save_text_style,
    text_style_metrics,
    text_style_report,
)
from zmagic_jax.tasks._face import (
    FACE_SCHEMES,
    FACE_TASKS,
    FaceModels,
    FaceReferences,
    FaceResult,
    FaceSamples,
    FaceSettings,
    face_features,
    face_metrics,
    face_report,
    load_face_models,
    run_faces,
    run_label,
    sample_faces,
    save_faces,
)
from zmagic_jax.tasks._digits import (
    DEFAULT_RUNS,
    DIGIT_CONDITIONS,
    DIGIT_SCHEMES,
    DigitResult,
    DigitSamples,
    DigitSettings,
    compile_digits,
    digit_report,
    digit_scores,
    digit_table,
    run_digits,
    sample_digits,
    save_digits,
)
from zmagic_jax.tasks._one_way_sd import (
    Layout,
    OneWaySettings,
    masked_cfg_denoiser,
    one_way_layout,
    one_way_report,
    run_one_way,
    save_one_way,
)
from zmagic_jax.tasks._one_way import (
    OneWayDemoSettings,
    prepare_one_way_demo,
    run_one_way_demo,
    save_one_way_demo,
)
