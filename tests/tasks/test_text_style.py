"""Text + style recipe, ``zmagic text-style`` and the Table 2 script end to end on the tiny random
Stable Diffusion and CLIP (6 steps; guidance on t = 664, 498, 332).

Every compiled program is built once (module-scoped cache, shared with the CLI and the experiment
script, whose weights and settings are the same) and compiled without XLA's expensive passes."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FAST_COMPILE
from zmagic_jax import cli
from zmagic_jax._io import MARKER
from zmagic_jax.tasks import (TEXT_STYLE_SCHEMES, TextStyleSettings, load_text_style_models, run_text_style,
                              sample_text_style)
from zmagic_jax.tasks import _text_style
from zmagic_jax.tasks._recipe import Programs, contribution_norms


# Compiling the UNet / VAE / CLIP gradients with XLA's optimising passes costs minutes on CPU.
# Time-travel compiles the guided step twice; its wiring is checked by tracing alone
# (test_settings_reach_the_sampler), the sampling runs go without it.
STEPS, TRAVEL = 6, 1
GUIDED_T = [664, 498, 332]


@pytest.fixture(scope="session")
def style_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("style") / "style.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def setup(tiny_sd_dirs, tiny_clip_dirs, style_path):
    models = load_text_style_models(tiny_sd_dirs["path"], tiny_clip_dirs["path"])
    settings = TextStyleSettings(prompt="lower newer", clip_prompt="a cat", style_image=str(style_path),
                                 num_steps=STEPS, time_travel_repeats=TRAVEL)
    return models, settings, Programs()


# ``multi`` guides CLIP text and style and differentiates twice through UNet, VAE and CLIP for both
# energies: tracing and compiling it takes ~1.5 min of the suite's ~5, so its end-to-end run is a slow
# variant. Fast tests cover its parts: test_scheme_conditions (the recipe builds Multi over text and
# style), test_text_condition_is_the_clip_text_distance_of_the_decoded_latent (the text energy and
# its gradient), tests/schemes/test_dependent.py (Multi = CAGrad over every ordered pair) and
# tests/models/test_latent_dependent.py (term II through UNet + VAE + CLIP).
SCHEMES = TEXT_STYLE_SCHEMES if os.environ.get("ZMAGIC_SLOW_TESTS") else ("none", "independent", "dependent")


@pytest.fixture(scope="session")
def runs(setup):
    """The schemes of ``SCHEMES`` on seed 0."""
    models, settings, programs = setup
    return {scheme: sample_text_style(models, settings, scheme, programs=programs, compiler_options=FAST_COMPILE)
            for scheme in SCHEMES}


@pytest.fixture
def fast_cli(setup, monkeypatch):
    """The CLI and the experiment script, sharing the module's compiled programs."""
    _, _, programs = setup
    original = _text_style.sample_text_style

    def shared(*args, programs=None, compiler_options=None, **kwargs):
        return original(*args, programs=setup[2], compiler_options=FAST_COMPILE, **kwargs)
    monkeypatch.setattr(_text_style, "sample_text_style", shared)
    return programs


def test_every_scheme_end_to_end(runs):
    for scheme, r in runs.items():
        assert r.images.shape == (1, 16, 16, 3) and r.latents.shape == (1, 4, 8, 8), scheme
        assert np.all(np.isfinite(r.latents)) and np.all(np.isfinite(r.images)), scheme
        assert r.trace.finite.all(), scheme
        guided = r.trace.guided[0]
        if scheme == "none":
            assert not guided.any()
            continue
        assert r.t[guided].tolist() == GUIDED_T, scheme
        norms = contribution_norms(r.trace, scheme)[0]  # model-led dependent: term II of the style
        assert np.all(np.isfinite(norms)) and np.all(norms[guided] > 0) and np.all(norms[~guided] == 0), scheme
    assert runs["dependent"].condition_names == ("style",)
    # Guidance changes the sample, and the dependent (pulled-back) term is not FreeDoM's gradient.
    plain = runs["none"].latents
    for scheme in set(runs) - {"none"}:
        assert np.max(np.abs(runs[scheme].latents - plain)) > 1e-4, scheme
    difference = np.linalg.norm(runs["dependent"].latents - runs["independent"].latents)
    assert difference > 1e-3 * np.linalg.norm(runs["independent"].latents)


def test_settings_reach_the_sampler(setup):
    """What the recipe hands the sampling program (its arguments are data, nothing is traced):
    FreeDoM's windows, time-travel, sampler, scheme and step rule."""
    import jax

    import zmagic_jax as zm
    models, settings, _ = setup
    settings = _text_style.dataclasses.replace(settings, num_steps=100, time_travel_repeats=3, scheme="independent")
    args, static, grid = _text_style._problem(models, settings, "independent", _text_style._inputs(models, settings))
    keys, contexts, denoiser, scheme, sampler, travel, vae_params = args
    assert travel == zm.time_travel(3, 699, 399) and sampler.name == "ddpm_posterior"
    assert isinstance(scheme, zm.schemes.Independent) and scheme.conditions[0].name == "style"
    assert isinstance(denoiser, zm.Denoiser) and float(denoiser.params["scale"]) == settings.cfg_scale
    assert static["shape"] == (4, 8, 8) and keys.shape == (1, 2) and grid.num_steps == 100
    active = np.array([bool(scheme.conditions[0].rule.active(jax.tree.map(lambda a: a[i], contexts)))
                       for i in range(100)])
    assert np.flatnonzero(active).tolist() == list(range(30, 70))  # FreeDoM's DDIM indices 30 <= i < 70


def test_scheme_conditions(setup):
    """Which conditions each scheme guides (``multi`` always CLIP text and style; text joins
    independent / dependent with ``text_guidance``), without tracing the networks."""
    import zmagic_jax as zm

    _, settings, _ = setup
    rule = zm.freedom_rule(1.0)
    conds = {name: zm.condition(name, lambda p, x: x.sum(), rule) for name in ("text", "style")}
    with_text = _text_style.dataclasses.replace(settings, text_guidance=True)
    for s, scheme, kind, names in [(settings, "none", zm.schemes.NoGuidance, ("style",)),
                                   (settings, "independent", zm.schemes.Independent, ("style",)),
                                   (settings, "dependent", zm.schemes.Dependent, ("style",)),
                                   (settings, "multi", zm.schemes.Multi, ("text", "style")),
                                   (with_text, "independent", zm.schemes.Independent, ("text", "style")),
                                   (with_text, "dependent", zm.schemes.Dependent, ("text", "style"))]:
        built = _text_style._scheme(s, scheme, conds)
        assert isinstance(built, kind) and tuple(c.name for c in built.conditions) == names, (scheme, names)


def test_text_condition_is_the_clip_text_distance_of_the_decoded_latent(setup):
    """The text condition the recipe builds (used by ``multi`` and ``text_guidance``) is
    ``1 - cos(CLIP image embedding of D(z), CLIP text embedding)``, and its gradient is finite and
    equals the gradient of that formula built here from the public pieces."""
    import jax
    import jax.numpy as jnp

    from zmagic_jax.energies import clip_text_distance, text_embedding
    from zmagic_jax.models import decode_latents
    models, settings, _ = setup
    args, _, _ = _text_style._problem(models, settings, "multi", _text_style._inputs(models, settings))
    text = {c.name: c for c in args[3].conditions}["text"]
    z = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8))
    embedding = text_embedding(models.clip, settings.measured_prompt)

    def reference(z):
        return clip_text_distance(models.clip, decode_latents(models.sd, z), embedding)

    both = jax.jit(lambda p, z: (jax.value_and_grad(text.energy, argnums=1)(p, z), jax.value_and_grad(reference)(z)))
    (value, grad), (ref_value, ref_grad) = both(text.params, z)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6 * float(jnp.abs(ref_grad).max()))
    assert 0 < float(value) < 2 and float(jnp.linalg.norm(grad)) > 0


def test_run_gives_reference_and_metrics(setup, runs):
    models, settings, programs = setup
    labels = []
    result = run_text_style(models, settings, programs=programs, compiler_options=FAST_COMPILE, progress=labels.append)
    assert labels == ["plain SD (content reference)", "dependent", "metrics"]
    # the same seed gives the same bits; the content reference is the plain CFG sample
    np.testing.assert_array_equal(result.guided.latents, runs["dependent"].latents)
    np.testing.assert_array_equal(result.reference.latents, runs["none"].latents)
    for metrics in (result.metrics, result.reference_metrics):
        assert all(np.all(np.isfinite(v)) and v.shape == (1,) for v in metrics.values())
    assert result.reference_metrics["content_loss"][0] == 0 < result.metrics["content_loss"][0]
    assert result.metrics["style_loss"][0] > 0 and 0 <= result.metrics["text_distance"][0] <= 2


def test_cli_writes_images_grid_and_metrics(setup, fast_cli, style_path, tiny_sd_dirs, tiny_clip_dirs,
                                            tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["text-style", "--sd", str(tiny_sd_dirs["path"]), "--clip", str(tiny_clip_dirs["path"]),
                     "--prompt", "lower newer", "--clip-prompt", "a cat", "--style", str(style_path),
                     "--steps", str(STEPS), "--time-travel", str(TRAVEL), "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"seed0_none.png", "seed0_dependent.png", "grid.png",
                                               "metrics.json", MARKER}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(out / "seed0_dependent.png").size == (16, 16)
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["scheme"] == "dependent" and report["settings"]["clip_prompt"] == "a cat"
    assert [(r["seed"], r["scheme"]) for r in report["images"]] == [(0, "none"), (0, "dependent")]
    assert report["images"][0]["content_loss"] == 0 < report["images"][1]["content_loss"]
    assert report["runs"]["dependent"]["guided_steps"] == 3
    assert report["runs"]["dependent"]["mean_displacement_norm"]["style"] > 0
    table = capsys.readouterr().out
    assert "dependent (Z-Magic)" in table and "plain SD (CFG)" in table and "text distance" in table


@pytest.mark.parametrize("change, flag", [
    (dict(sd="missing"), "--sd"),
    (dict(sd="empty"), "--sd"),
    (dict(style="missing"), "--style"),
    (dict(style="garbage"), "--style"),
    (dict(window=["150", "100"]), "--window"),
    (dict(steps="1"), "--steps"),
])
def test_bad_arguments_name_the_flag_and_write_nothing(change, flag, style_path, tiny_sd_dirs, tiny_clip_dirs,
                                                       tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    paths = {"missing": str(tmp_path / "nowhere"), "empty": str(tmp_path / "empty"),
             "garbage": str(tmp_path / "garbage.png")}
    args = dict(sd=str(tiny_sd_dirs["path"]), clip=str(tiny_clip_dirs["path"]), style=str(style_path),
                window=["699", "299"], steps=str(STEPS))
    args.update({k: paths.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["text-style", "--sd", args["sd"], "--clip", args["clip"], "--prompt", "lower",
                  "--style", args["style"], "--window", *args["window"], "--steps", args["steps"],
                  "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"zmagic text-style: error: {flag}" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "garbage.png"]


def test_table2_script_tiny(setup, fast_cli, tiny_sd_dirs, tiny_clip_dirs, tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from experiments import table2_text_style as table2

    def tiny(folder, count):  # the session's tiny models instead of building them again
        return (tiny_sd_dirs["path"], tiny_clip_dirs["path"], [("lower newer", "a cat")],
                table2.synthetic_styles(Path(folder) / "styles", count))
    monkeypatch.setattr(table2, "build_tiny", tiny)
    monkeypatch.setattr(table2, "sample_text_style", _text_style.sample_text_style)
    out = tmp_path / "table2"
    assert table2.main(["--tiny", "--tiny-styles", "1", "--steps", str(STEPS), "--time-travel", str(TRAVEL),
                        "--seeds", "0", "--out", str(out)]) == 0
    report = json.loads((out / "table2_text_style.json").read_text())
    assert report["methods"] == ["none", "independent", "dependent"] and report["styles"] == ["style0.png"]
    assert [r["method"] for r in report["records"]] == ["none", "independent", "dependent"]
    assert report["summary"]["none"]["content_loss"]["mean"] == 0
    for method in ("independent", "dependent"):
        assert report["summary"][method]["content_loss"]["mean"] > 0
        assert np.isfinite(report["summary"][method]["style_loss"]["mean"])
    table = (out / "table2_text_style.md").read_text()
    assert "| dependent (Z-Magic) |" in table and "| plain SD (CFG) |" in table
