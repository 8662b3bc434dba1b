"""The embedded digits models and task: committed weights load through the users' loaders, the
unguided model makes digits, class guidance works, every scheme runs, the demo writes its outputs,
and a damaged weight file stops everything with a clear error.

All tests share one pytest-xdist worker (``xdist_group``, with tests/test_cli.py, whose testbed
settings the demo test here reuses) and session-scoped fixtures, so the four compiled programs
(one per scheme, in the process-wide ``tasks._recipe.PROGRAMS``) are built once.
"""
import json
import shutil

import jax
import numpy as np
import pytest

from zmagic_jax import cli
from zmagic_jax._io import MARKER
from zmagic_jax.ports import _digits as digits_models
from zmagic_jax.ports import AssetChecksumError, load_digit_models
from zmagic_jax.ports import load_ddpm_unet
from zmagic_jax.tasks._recipe import PROGRAMS, sample_seeds
from zmagic_jax.tasks._digits import (DEFAULT_RUNS, DIGIT_SCHEMES, DigitSettings, check_run, digit_scores,
                                      run_digits, run_label, sample_digits)

pytestmark = pytest.mark.xdist_group("demo")

SEEDS = tuple(range(6))  # the demo default: the CLI test reuses the compiled programs
# Measured on the committed weights: 200 unguided samples of 50 DDPM steps (experiments/results/
# digits/summary.json): evaluator confident (p >= 0.9) on 82.5 %, agreeing with the guidance
# classifier on 60 %; the 48 samples of 20 DDIM steps below: agreement 52 %. Evaluator on held-out
# real digits: 98.6 %. The floors leave room for sampling noise (chance agreement would be ~10 %).
CONFIDENT_FLOOR = 0.6    # fraction of unguided samples the evaluator classifies with p >= 0.9
AGREEMENT_FLOOR = 0.4    # fraction where the evaluator and the guidance classifier agree
HELDOUT_ACCURACY_FLOOR = 0.95


@pytest.fixture(scope="session")
def models():
    return load_digit_models()


@pytest.fixture(scope="session")
def result(models):
    return run_digits(models, DigitSettings(seeds=SEEDS))


def test_committed_weights_are_small_and_load_through_the_users_loaders(models):
    sizes = {p.name: p.stat().st_size for p in digits_models.DIGITS_ASSETS.iterdir()}
    assert sum(sizes.values()) < 20 * 2 ** 20, sizes
    # the UNet file is a converted DDPM UNet like a user's: load_ddpm_unet reads its stored config
    module, params = load_ddpm_unet(digits_models.DIGITS_ASSETS / "unet.safetensors")
    assert module.config == models.unet.module.config and module.config.resolution == 16
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(models.unet.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # held-out real digits: 50 per class, never trained on; the evaluator classifies them
    assert models.heldout_images.shape == (500, 16, 16, 1)
    assert np.bincount(models.heldout_labels, minlength=10).tolist() == [50] * 10
    assert -1.0 <= models.heldout_images.min() < models.heldout_images.max() <= 1.0
    logits = models.evaluator.module.apply({"params": models.evaluator.params}, models.heldout_images).logits
    assert np.mean(np.argmax(np.asarray(logits), -1) == models.heldout_labels) >= HELDOUT_ACCURACY_FLOOR


def _damage(directory, name):
    path = directory / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_or_missing_weight_file_gives_a_clear_error(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "digits"
    shutil.copytree(digits_models.DIGITS_ASSETS, copy)
    load_digit_models(copy)  # an intact copy loads
    _damage(copy, "segmenter.safetensors")
    with pytest.raises(AssetChecksumError, match=r"segmenter\.safetensors is damaged.*checksums\.json.*git checkout"):
        load_digit_models(copy)
    shutil.copy(digits_models.DIGITS_ASSETS / "segmenter.safetensors", copy)
    (copy / "unet.safetensors").unlink()
    with pytest.raises(AssetChecksumError, match=r"unet\.safetensors is missing"):
        load_digit_models(copy)
    # the demo checks the weights before any work and writes nothing
    monkeypatch.setattr(digits_models, "DIGITS_ASSETS", copy)
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--out", str(out), "--dims", "2", "--samples", "16", "--steps", "4", "--no-canvas",
                  "--no-one-way", "--no-concepts"])
    assert exit_info.value.code == 2
    assert "is missing" in capsys.readouterr().err and not out.exists()


def test_unguided_samples_are_recognisably_digits(models):
    settings = DigitSettings(seeds=tuple(range(48)))
    images = sample_digits(models, settings, "none", ("class",)).images
    probs = np.asarray(jax.nn.softmax(models.evaluator.module.apply({"params": models.evaluator.params},
                                                                      images).logits))
    guide = np.argmax(np.asarray(models.classifier.module.apply({"params": models.classifier.params},
                                                                  images).logits), -1)
    confident, agreement = np.mean(probs.max(-1) >= 0.9), np.mean(probs.argmax(-1) == guide)
    assert confident >= CONFIDENT_FLOOR and agreement >= AGREEMENT_FLOOR, (confident, agreement)
    # several classes appear (no collapse onto one digit)
    assert len(set(probs.argmax(-1).tolist())) >= 6


def test_class_guidance_raises_the_evaluators_accuracy(models, result):
    settings = DigitSettings(seeds=SEEDS)
    guided = sample_digits(models, settings, "independent", ("class",))
    accuracy = digit_scores(models, settings, guided.images)["class_accuracy"].mean()
    unguided = result.scores["none"]["class_accuracy"].mean()
    assert unguided <= 0.35 and accuracy >= 0.8, (unguided, accuracy)
    assert (guided.trace.guided == (guided.t > 0)).all()  # guided for t > stop = 0


def test_every_scheme_runs_and_is_scored(models, result):
    assert list(result.samples) == [run_label(s, c) for s, c in DEFAULT_RUNS]
    assert {s.scheme for s in result.samples.values()} == set(DIGIT_SCHEMES)
    for label, samples in result.samples.items():
        assert samples.images.shape == (len(SEEDS), 16, 16, 1) and np.isfinite(samples.images).all()
        assert samples.trace.finite.all()
        assert samples.trace.guided.any() == (samples.scheme != "none")
        scores = result.scores[label]
        assert set(scores) == {"class_accuracy", "class_probability", "layout_iou", "style_distance", "ink_gap"}
        assert set(result.frechet[label]) == {"class", "all"}
        assert all(np.isfinite(v) and v > 0 for v in result.frechet[label].values())
    # the two dependent orders of the strong pair are different runs with different images
    a, b = result.samples["dependent class->layout"], result.samples["dependent layout->class"]
    assert not np.allclose(a.images, b.images)
    # layout guidance moves ink onto the mask
    assert result.scores["independent class+layout"]["layout_iou"].mean() > result.scores["none"]["layout_iou"].mean()
    # one compiled program per scheme serves every pair and order (the keys are the first argument)
    keys = [key for key in PROGRAMS.compiled(sample_seeds) if key[2][0][0] == (len(SEEDS), 2)]
    assert len(keys) == len(DIGIT_SCHEMES), keys


def test_bad_runs_and_settings_are_refused(models):
    with pytest.raises(ValueError, match="dependent guides 2"):
        check_run("dependent", ("class",))
    with pytest.raises(ValueError, match="scheme must be one of"):
        check_run("magic", ("class", "style"))
    with pytest.raises(ValueError, match="target_class"):
        DigitSettings(target_class=11)
    with pytest.raises(ValueError, match="layout_source=900 is out of range"):
        sample_digits(models, DigitSettings(layout_source=900, seeds=SEEDS), "none", ("class",))


def test_demo_writes_the_digits_outputs(models, result, tmp_path, capsys, monkeypatch):
    """The demo's digits part: the CLI asks run_digits for the demo's settings (the runs themselves
    are the session's ``result``, checked above) and writes every output in the same folder as the
    testbed part (whose settings are tests/test_cli.py's, so its programs are compiled once)."""
    import zmagic_jax.tasks._digits as digits_task
    asked = []

    def cached_run(models_, settings, runs=DEFAULT_RUNS, **kwargs):
        asked.append((settings, tuple(runs)))
        return result
    monkeypatch.setattr(digits_task, "run_digits", cached_run)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--dims", "2", "--samples", "32", "--steps", "10",
                     "--digit-seeds", str(len(SEEDS)), "--no-canvas", "--no-one-way", "--no-concepts"]) == 0
    assert asked == [(DigitSettings(seeds=SEEDS), DEFAULT_RUNS)]
    digits = out / "digits"
    labels = [run_label(s, c) for s, c in DEFAULT_RUNS]
    names = {p.name for p in digits.iterdir()}
    assert {"report.json", "comparison.png", "scores.png", "images"} <= names
    assert len([n for n in names if n.startswith("grid_")]) == len(labels)
    for name in names - {"report.json", "images", MARKER}:
        assert (digits / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((digits / "images").iterdir())) == len(labels) * len(SEEDS)
    report = json.loads((digits / "report.json").read_text())
    assert list(report["runs"]) == labels
    for run in report["runs"].values():
        assert set(run["mean"]) == set(run["std"]) == {"class_accuracy", "class_probability", "layout_iou",
                                                        "style_distance", "ink_gap"}
    assert report["frechet_floor"]["class"]["mean"] > 0 and "unet" in report["models"]
    table = capsys.readouterr().out
    assert "dependent layout->class" in table and "FD class" in table
    assert (out / "report.json").exists()  # the testbed part is still there
