"""Text + style recipe, ``zmagic text-style`` and the Table 2 script end to end on the tiny random
Stable Diffusion and CLIP (6 steps; guidance on t = 664, 498, 332).

Every compiled program is built once (module-scoped cache, shared with the CLI and the experiment
script, whose weights and settings are the same) and compiled without XLA's expensive passes."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zmagic_jax import cli
from zmagic_jax.tasks import (TEXT_STYLE_SCHEMES, TextStyleSettings, load_text_style_models, run_text_style,
                              sample_text_style)
from zmagic_jax.tasks import _text_style

pytest.importorskip("torch")

# Compiling the UNet / VAE / CLIP gradients with XLA's optimising passes costs minutes on CPU.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Time-travel compiles the guided step twice; its wiring is checked by tracing alone
# (test_settings_reach_the_sampler), the sampling runs go without it.
STEPS, TRAVEL = 6, 1
GUIDED_T = [664, 498, 332]


@pytest.fixture(scope="module")
def style_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("style") / "style.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def setup(tiny_sd_dirs, tiny_clip_dirs, style_path):
    models = load_text_style_models(tiny_sd_dirs["flax"], tiny_clip_dirs["flax"])
    settings = TextStyleSettings(prompt="lower newer", clip_prompt="a cat", style_image=str(style_path),
                                 num_steps=STEPS, time_travel_repeats=TRAVEL)
    return models, settings, {}


@pytest.fixture(scope="module")
def runs(setup):
    """Every scheme on seed 0 (``multi`` guides CLIP text and style; it differentiates twice through
    UNet, VAE and CLIP for two energies, and compiling it takes ~2-3 min on 2 CPU cores)."""
    models, settings, cache = setup
    return {scheme: sample_text_style(models, settings, scheme, cache=cache, compiler_options=FAST)
            for scheme in TEXT_STYLE_SCHEMES}


@pytest.fixture
def fast_cli(setup, monkeypatch):
    """The CLI and the experiment script, sharing the module's compiled programs."""
    _, _, cache = setup
    original = _text_style.sample_text_style

    def shared(*args, cache=None, compiler_options=None, **kwargs):
        return original(*args, cache=setup[2], compiler_options=FAST, **kwargs)
    monkeypatch.setattr(_text_style, "sample_text_style", shared)
    return cache


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
        norms = r.trace.displacement_norms[0]
        assert np.all(np.isfinite(norms)) and np.all(norms[guided] > 0) and np.all(norms[~guided] == 0), scheme
    assert runs["dependent"].condition_names == ("style",)
    # Guidance changes the sample, and the dependent (pulled-back) term is not FreeDoM's gradient.
    plain = runs["none"].latents
    for scheme in set(runs) - {"none"}:
        assert np.max(np.abs(runs[scheme].latents - plain)) > 1e-4, scheme
    difference = np.linalg.norm(runs["dependent"].latents - runs["independent"].latents)
    assert difference > 1e-3 * np.linalg.norm(runs["independent"].latents)


def test_settings_reach_the_sampler(setup, monkeypatch):
    """What the recipe hands ``zm.sample`` (traced with ``eval_shape``, nothing compiled): FreeDoM's
    windows, time-travel, sampler, scheme and step rule."""
    import jax

    import zmagic_jax as zm
    models, settings, _ = setup
    seen = {}

    def fake_sample(key, x_T, eps_fn, schedule, grid, scheme, sampler, **kwargs):
        seen.update(grid=grid, scheme=scheme, sampler=sampler, **kwargs)
        return x_T, {"finite": jax.numpy.ones(x_T.shape[:1] + (grid.num_steps, 1), bool)}
    monkeypatch.setattr(_text_style, "sample", fake_sample)
    settings = _text_style.dataclasses.replace(settings, num_steps=100, time_travel_repeats=3, scheme="independent")
    run, grid = _text_style._program(models, settings, "independent")
    jax.eval_shape(run, *_text_style._inputs(models, settings))
    assert seen["time_travel"] == zm.time_travel(3, 699, 399) and seen["sampler"] == "ddpm_posterior"
    assert isinstance(seen["scheme"], zm.schemes.Independent) and seen["scheme"].conditions[0].name == "style"
    active = np.array([bool(seen["scheme"].conditions[0].rule.active(ctx)) for ctx in
                       [jax.tree.map(lambda a: a[i], zm.step_contexts(models.sd.schedule, grid)) for i in range(100)]])
    assert np.flatnonzero(active).tolist() == list(range(30, 70))  # FreeDoM's DDIM indices 30 <= i < 70


def test_scheme_conditions(setup):
    """Which conditions each scheme guides (``multi`` always CLIP text and style; text joins
    independent / dependent with ``text_guidance``), without tracing the networks."""
    import zmagic_jax as zm

    _, settings, _ = setup
    rule = zm.freedom_rule(1.0)
    conds = {name: zm.condition(name, lambda x: x.sum(), rule) for name in ("text", "style")}
    with_text = _text_style.dataclasses.replace(settings, text_guidance=True)
    for s, scheme, kind, names in [(settings, "none", zm.schemes.NoGuidance, ("style",)),
                                   (settings, "independent", zm.schemes.Independent, ("style",)),
                                   (settings, "dependent", zm.schemes.Dependent, ("style",)),
                                   (settings, "multi", zm.schemes.Multi, ("text", "style")),
                                   (with_text, "independent", zm.schemes.Independent, ("text", "style")),
                                   (with_text, "dependent", zm.schemes.Dependent, ("text", "style"))]:
        built = _text_style._scheme(s, scheme, conds)
        assert isinstance(built, kind) and tuple(c.name for c in built.conditions) == names, (scheme, names)


def test_run_gives_reference_and_metrics(setup, runs):
    models, settings, cache = setup
    labels = []
    result = run_text_style(models, settings, cache=cache, compiler_options=FAST, progress=labels.append)
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
    code = cli.main(["text-style", "--sd", str(tiny_sd_dirs["flax"]), "--clip", str(tiny_clip_dirs["flax"]),
                     "--prompt", "lower newer", "--clip-prompt", "a cat", "--style", str(style_path),
                     "--steps", str(STEPS), "--time-travel", str(TRAVEL), "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"seed0_none.png", "seed0_dependent.png", "grid.png",
                                               "metrics.json"}
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
    args = dict(sd=str(tiny_sd_dirs["flax"]), clip=str(tiny_clip_dirs["flax"]), style=str(style_path),
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
        return (tiny_sd_dirs["flax"], tiny_clip_dirs["flax"], [("lower newer", "a cat")],
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
