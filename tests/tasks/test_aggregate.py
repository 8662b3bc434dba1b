"""``zmagic aggregate`` (AMDM on Stable Diffusion folders) end to end on tiny random SD folders of the
real architecture: release defaults, one folder with two prompts, mismatched models, outputs."""
import json
import re
import shutil

import numpy as np
import pytest

from tests.conftest import FAST_COMPILE
import zmagic_jax as zm
from zmagic_jax import cli
from zmagic_jax._io import MARKER
from zmagic_jax.tasks import AggregateSettings, load_aggregate_models, run_aggregate
from zmagic_jax.tasks._recipe import Programs

STEPS = 5


@pytest.fixture(scope="module")
def folders(tiny_sd_dirs, tmp_path_factory):
    """The shared tiny SD, a second one of the same architecture (other weights) and one whose
    schedule differs."""
    from experiments.tiny_models import save_tiny_stable_diffusion

    root = tmp_path_factory.mktemp("amdm")
    other = save_tiny_stable_diffusion(root / "other", seed=5)["path"]
    shifted = root / "shifted"
    shutil.copytree(tiny_sd_dirs["path"], shifted)
    config_path = shifted / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, beta_end=0.02)))
    return {"first": tiny_sd_dirs["path"], "other": other, "shifted": shifted}


@pytest.fixture(scope="module")
def programs():
    return Programs()


def test_two_folders_with_the_release_defaults(folders, programs, tmp_path):
    settings = AggregateSettings(prompts=("lower newer", "newer lower"), num_steps=STEPS, seeds=(0, 1),
                                 window=(1, 2))
    models = load_aggregate_models([folders["first"], folders["other"]], 2)
    result = run_aggregate(models, settings, programs=programs, compiler_options=FAST_COMPILE)
    h = models[0].sample_size
    assert result.weights == (0.5,)
    np.testing.assert_allclose(result.steps, zm.release_steps(2, (4, h, h)))
    np.testing.assert_array_equal(result.trace.aggregated[0], [False, True, True, False, False])
    assert result.latents.shape == (2, 2, 4, h, h) and result.images.shape[:2] == (2, 2)
    assert result.mixed_images.shape == result.images.shape[:1] + result.images.shape[2:]
    assert np.all(np.isfinite(result.latents)) and np.all(np.abs(result.images) <= 1)
    assert np.max(np.abs(result.latents[:, 0] - result.latents[:, 1])) > 1e-3  # two models, two states
    assert np.max(np.abs(result.latents[0] - result.latents[1])) > 1e-3        # two seeds
    # the merged state of the last step, released rule: w x1' + sqrt(1 - w^2) x2' of the final states
    # (the last step is outside the window, so each model's final state is its own step)
    np.testing.assert_allclose(result.mixed, 0.5 * result.latents[:, 0] + np.sqrt(0.75) * result.latents[:, 1],
                               rtol=1e-5, atol=2e-4)  # float32 round-off of latents ~10
    # the seeds in the other order (the same compiled program): the same images, bit for bit
    # (seed s depends on PRNGKey(s) alone)
    again = run_aggregate(models, AggregateSettings(prompts=settings.prompts, num_steps=STEPS, seeds=(1, 0),
                                                    window=(1, 2)), programs=programs, compiler_options=FAST_COMPILE)
    np.testing.assert_array_equal(again.latents[::-1], result.latents)


def test_cli_one_folder_two_prompts_writes_every_output(folders, programs, tmp_path, monkeypatch, capsys):
    from zmagic_jax.tasks import _aggregate

    real = _aggregate.run_aggregate
    monkeypatch.setattr("zmagic_jax.tasks.run_aggregate",
                        lambda models, settings, extras=None: real(models, settings, extras=extras, programs=programs,
                                                                   compiler_options=FAST_COMPILE))
    out = tmp_path / "amdm"
    code = cli.main(["aggregate", "--sd", str(folders["first"]), "--prompt", "lower newer", "--prompt", "a b",
                     "--steps", str(STEPS), "--seeds", "3", "4", "--p", "0.5", "0.25", "--window", "1", "3",
                     "--out", str(out)])  # the program of the test above: only leaves differ
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([MARKER, "grid.png", "metrics.json"] + [f"seed{s}_{m}.png" for s in (3, 4)
                                                                     for m in ("model1", "model2", "merged")])
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["prompts"] == ["lower newer", "a b"] and report["steps"] == [0.5, 0.25]
    assert [s["aggregated"] for s in report["per_step"]] == [False, True, True, True, False]
    assert all(len(s["mean_distance_mu_to_merge"]) == 2 for s in report["per_step"])
    printed = capsys.readouterr().out
    assert "AMDM (released rule" in printed and "wrote" in printed
    # a second run into the same folder needs --overwrite
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["aggregate", "--sd", str(folders["first"]), "--prompt", "x", "--prompt", "y", "--out", str(out)])
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def pixel_folders(tiny_sd_dirs, tmp_path_factory):
    """Two pixel-space folders (no vae/) as the embedded canvas models: a 1-channel text model and a
    layout model taking one conditioning channel."""
    from experiments.tiny_models import (SD_MERGES, SD_VOCAB, TINY_SCHEDULER, TINY_SD_TEXT, TINY_UNET, random_tree,
                                         save_sd_folder)
    from zmagic_jax.models._sd_convert import unet_param_shapes
    from zmagic_jax.models._unet2d import unet_config_from_dict

    root = tmp_path_factory.mktemp("amdm_pixel")
    paths = {}
    for seed, (name, channels) in enumerate((("text", (1, 1)), ("layout", (2, 1)))):
        unet = dict(TINY_UNET, in_channels=channels[0], out_channels=channels[1])
        params = random_tree(unet_param_shapes(unet_config_from_dict(unet, file=name)), 11 + seed)
        paths[name] = save_sd_folder(root / name, unet=unet, unet_params=params, text=TINY_SD_TEXT,
                                     text_params=tiny_sd_dirs["text"]["text_model"], vocab=SD_VOCAB,
                                     merges=SD_MERGES, scheduler=TINY_SCHEDULER)
    return paths


def test_pixel_models_with_conditioning_channels(pixel_folders, folders, programs):
    models = load_aggregate_models([pixel_folders["text"], pixel_folders["layout"]], 2)
    h = models[0].sample_size
    layout = np.zeros((1, h, h), np.float32)
    layout[:, 2:6, 1:4] = 1.0
    settings = AggregateSettings(prompts=("lower newer", ""), num_steps=STEPS, seeds=(0,), window=(1, 2),
                                 cfg_scale=2.0)
    result = run_aggregate(models, settings, extras=(None, np.stack([0 * layout, layout])), programs=programs,
                           compiler_options=FAST_COMPILE)
    np.testing.assert_allclose(result.steps, zm.release_steps(2, (1, h, h)))  # the 1-channel sample's size
    assert result.latents.shape == (1, 2, 1, h, h) and result.images.shape == (1, 2, h, h, 1)
    # pixel space: the image is the sample itself (clipped to [-1, 1])
    np.testing.assert_array_equal(result.images, np.clip(result.latents.transpose(0, 1, 3, 4, 2), -1, 1))
    # the layout is an argument of the one program: another layout, other samples
    moved = np.roll(layout, 3, axis=2)
    compiled = len(programs.compiled())
    again = run_aggregate(models, settings, extras=(None, np.stack([0 * moved, moved])), programs=programs,
                          compiler_options=FAST_COMPILE)
    assert np.max(np.abs(again.latents[:, 1] - result.latents[:, 1])) > 1e-4
    assert len(programs.compiled()) == compiled
    with pytest.raises(ValueError, match=r"extras must hold one entry .* per model \(2\)"):
        run_aggregate(models, settings, extras=(None,), programs=programs)
    with pytest.raises(ValueError, match=r"takes 1 conditioning channel.*pass extra="):
        run_aggregate(models, settings, programs=programs)
    with pytest.raises(ValueError, match=r"model 1 \(.*\) and model 2 \(.*\) sample different spaces \(4-channel "
                                         r"VAE latents vs 1-channel pixels\)"):
        load_aggregate_models([folders["first"], pixel_folders["text"]], 2)


def test_mismatched_models_are_named(folders):
    with pytest.raises(ValueError, match=r"model 1 \(.*\) and model 2 \(.*shifted\) have different noise schedules"):
        load_aggregate_models([folders["first"], folders["shifted"]], 2)


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "only one"], "--prompt: .*two or more"),
    (["--prompt", "a", "--prompt", "b", "--p", "1"], "--p: .*2 numbers"),
    (["--prompt", "a", "--prompt", "b", "--weights", "1.5"], "--weights: .*in \\[0, 1\\]"),
    (["--prompt", "a", "--prompt", "b", "--window", "0", "0"], "--window: "),
])
def test_bad_flags_are_named(folders, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["aggregate", "--sd", str(folders["first"]), *flags, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    import re
    assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "o").exists()


def test_cli_reads_a_models_conditioning_image(pixel_folders, programs, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from zmagic_jax.tasks import _aggregate

    seen = {}

    def shared(models, settings, extras=None):
        seen["extras"] = extras
        return _aggregate.run_aggregate(models, settings, extras=extras, programs=programs,
                                        compiler_options=FAST_COMPILE)
    monkeypatch.setattr("zmagic_jax.tasks.run_aggregate", shared)
    layout = np.zeros((8, 8), np.uint8)
    layout[2:6, 1:4] = 255
    Image.fromarray(layout, "L").save(tmp_path / "layout.png")
    base = ["aggregate", "--sd", str(pixel_folders["text"]), str(pixel_folders["layout"]), "--prompt", "lower newer",
            "--prompt", "", "--steps", str(STEPS), "--window", "1", "2", "--cfg-scale", "2"]
    assert cli.main(base + ["--condition", "2", str(tmp_path / "layout.png"), "--condition-cfg",
                            "--out", str(tmp_path / "out")]) == 0
    text_extra, layout_extra = seen["extras"]
    assert text_extra is None
    np.testing.assert_array_equal(layout_extra[1, 0], layout / 255.0)  # the image, values / 255
    np.testing.assert_array_equal(layout_extra[0], 0.0)                # --condition-cfg: a blank unconditional one
    assert (tmp_path / "out" / "seed0_merged.png").is_file()
    for flags, message in ((["--condition", "3", "x.png"], "K must be a model number 1..2"),
                           ([], r"model\(s\) \[2\] take conditioning channels"),
                           (["--condition", "2", str(tmp_path / "none.png")], "--condition image .* does not exist")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main(base + flags + ["--out", str(tmp_path / "again")])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "again").exists()
