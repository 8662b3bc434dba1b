"""``zmagic one-way`` (COW / SOW on Stable Diffusion folders) end to end on tiny random SD folders of the
real architecture: the pasted condition, seeds, one program for every prompt / scale / image /
strength, SOW at zero strength, the release's masked four-way CFG, outputs, flag errors, and the
CelebA-TV2I experiment script."""
import json
import os
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.conftest import FAST_COMPILE
from zmagic_jax import cli
from zmagic_jax._io import MARKER
from zmagic_jax.modulation import Modulation
from zmagic_jax.models import encode_image, load_stable_diffusion
from zmagic_jax.tasks import _one_way_sd
from zmagic_jax.tasks._one_way_sd import OneWaySettings, masked_cfg_denoiser, run_one_way
from zmagic_jax.tasks._recipe import Programs

pytestmark = pytest.mark.xdist_group("one_way_sd")

# The tiny SD samples 8 x 8 latents (16 x 16 pixels, VAE factor 2); levels r, b, p = 2, 3, 2 of 5 steps.
STEPS, CYCLES, SEEDS, PROMPT = 5, 2, (0, 1), "lower newer"
FLAGS = ["--steps", str(STEPS), "--cycles", str(CYCLES), "--seeds", *map(str, SEEDS)]


@pytest.fixture(scope="module")
def programs():
    return Programs()


@pytest.fixture(scope="module")
def sd(tiny_sd_dirs):
    return load_stable_diffusion(tiny_sd_dirs["path"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 24 x 24 condition image and its mask (white: a 16 x 16 square, 6 x 6 of the 8 x 8 seed after
    the nearest-neighbour resize)."""
    root = tmp_path_factory.mktemp("one_way_inputs")
    y, x = np.mgrid[0:24, 0:24] / 24.0
    image = np.stack([np.sin(6 * x), np.cos(5 * y), np.sin(4 * (x + y))], -1)
    Image.fromarray(np.round(127.5 * (image + 1)).astype(np.uint8)).save(root / "image.png")
    mask = np.zeros((24, 24), np.uint8)
    mask[4:20, 4:20] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return {"image": root / "image.png", "mask": root / "mask.png", "root": root}


def run(sd, image, mask, programs, prompt=PROMPT, **changes):
    settings = OneWaySettings(**dict(dict(prompt=prompt, num_steps=STEPS, cycles=CYCLES, seeds=SEEDS), **changes))
    return run_one_way(sd, image, mask, settings, programs=programs, compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def cow(sd, files, programs):
    return run(sd, str(files["image"]), str(files["mask"]), programs)


def _compiled(programs):
    return len(programs.compiled(_one_way_sd._one_way_program))


def test_cow_keeps_the_condition_where_it_pasted_it(cow, sd):
    layout, (r, b, p) = cow["layout"], cow["levels"]
    assert (r, b, p) == (2, 3, 2)
    assert cow["images"].shape == (2, 16, 16, 3) and cow["latents"].shape == (2, 4, 8, 8)
    assert cow["anchors"].shape == (b + 1, 4, 8, 8)
    assert np.all(np.isfinite(cow["latents"])) and np.all(np.abs(cow["images"]) <= 1)
    # the offline planner's object rule: the 8 x 8 seed centred on the 16 x 16 canvas, on gray
    assert layout.plan.condition_box == (4, 4, 12, 12) and layout.plan.prompt == PROMPT
    inside = layout.region > 0.5
    assert inside.sum() == 36 and inside[5:11, 5:11].all() and np.all(layout.canvas[~inside] == 0.0)
    np.testing.assert_array_equal(layout.canvas[inside], layout.condition[layout.mask > 0.5])
    # a latent cell is inside when at least half of its 2 x 2 pixels are: the corner cells hold one
    expected = np.zeros((8, 8))
    expected[2:6, 2:6] = 1.0
    expected[[2, 2, 5, 5], [2, 5, 2, 5]] = 0.0
    np.testing.assert_array_equal(layout.latent_region, expected)
    # anchor z_0 is the VAE's posterior mean of the canvas (another program: float32 round-off)
    np.testing.assert_allclose(cow["anchors"][0], encode_image(sd, layout.canvas), rtol=1e-5, atol=1e-5)
    # right after the final paste, every chain holds anchor z_p in the latent region, bit for bit,
    # and its own state elsewhere
    region = layout.latent_region > 0.5
    for s in range(len(SEEDS)):
        np.testing.assert_array_equal(cow["preserved"][s][:, region], cow["anchors"][p][:, region])
        assert np.max(np.abs(cow["preserved"][s][:, ~region] - cow["anchors"][p][:, ~region])) > 1e-2
    assert np.max(np.abs(cow["latents"][0] - cow["latents"][1])) > 1e-3     # two seeds, two images
    assert [m["seed"] for m in cow["metrics"]] == list(SEEDS)
    error = np.abs(cow["images"][0].astype(np.float64) - layout.canvas)[inside].mean()
    assert cow["metrics"][0]["region_error"] == pytest.approx(error)


def test_same_seeds_same_bits_and_reordered_seeds(cow, sd, files, programs):
    compiled = _compiled(programs)
    again = run(sd, str(files["image"]), str(files["mask"]), programs)
    np.testing.assert_array_equal(again["images"], cow["images"])
    # seed s depends on PRNGKey(s) alone: the other order, the same images
    swapped = run(sd, str(files["image"]), str(files["mask"]), programs, seeds=SEEDS[::-1])
    np.testing.assert_array_equal(swapped["latents"][::-1], cow["latents"])
    assert _compiled(programs) == compiled


def test_prompt_scale_image_and_position_are_arguments_of_one_program(cow, sd, programs):
    compiled = _compiled(programs)
    rng = np.random.default_rng(3)
    image = rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)  # an array, resized to the seed size
    mask = np.ones((16, 16), np.float32)
    mask[:6] = 0.0  # nearest to 8 x 8: rows 0..2 off
    other = run(sd, image, mask, programs, cfg_scale=3.0, position=(0, 8))
    reprompted = run(sd, image, mask, programs, prompt="newer lower", cfg_scale=3.0, position=(0, 8))
    assert _compiled(programs) == compiled
    assert other["plan"].condition_box == (0, 8, 8, 16)
    assert other["layout"].region[:3].sum() == 0 and other["layout"].region[3:8, 8:].all()
    assert np.max(np.abs(other["latents"] - cow["latents"])) > 1e-3
    assert np.max(np.abs(reprompted["latents"] - other["latents"])) > 1e-4
    # a planner (plan_layout's hook) may rewrite the prompt and place the condition: the same images
    # as that prompt and position given directly (the related box only matters to SOW)
    seen = {}

    def planner(condition, region, prompt, canvas_size):
        seen.update(condition=condition.shape, region=region, prompt=prompt, canvas=canvas_size)
        return "newer lower", (0, 8, 8, 16), (8, 0, 16, 16)
    planned = run_one_way(sd, image, mask, OneWaySettings(prompt=PROMPT, num_steps=STEPS, cycles=CYCLES, seeds=SEEDS,
                                                          cfg_scale=3.0), planner=planner, programs=programs,
                          compiler_options=FAST_COMPILE)
    assert seen["condition"] == (3, 8, 8) and seen["prompt"] == PROMPT and seen["canvas"] == (16, 16)
    np.testing.assert_array_equal(seen["region"][:3], 0.0)  # the planner sees the kept region as ones
    np.testing.assert_array_equal(seen["region"][3:], 1.0)
    assert planned["plan"].prompt == "newer lower" and planned["plan"].related_box == (8, 0, 16, 16)
    np.testing.assert_array_equal(planned["latents"], reprompted["latents"])
    assert _compiled(programs) == compiled


@pytest.fixture(scope="module")
def sow0(sd, files, programs):
    """SOW with both strengths 0."""
    zero = Modulation(suppress_strength=0.0, enhance_strength=0.0)
    return run(sd, str(files["image"]), str(files["mask"]), programs, modulate=True, modulation=zero)


def test_sow_at_zero_strength_is_cow_and_strengths_reuse_the_program(cow, sow0, sd, files, programs):
    # Both strengths 0 add exactly 0 to the scores, but the modulated UNet computes attention from
    # explicit scores and softmax (the modifier needs them) where the plain one calls
    # jax.nn.dot_product_attention: another program, so equal to float32 round-off, not bit for bit.
    np.testing.assert_allclose(sow0["latents"], cow["latents"], rtol=1e-4, atol=1e-4)
    compiled = _compiled(programs)
    sow = run(sd, str(files["image"]), str(files["mask"]), programs, modulate=True)
    assert _compiled(programs) == compiled
    assert np.max(np.abs(sow["latents"] - sow0["latents"])) > 1e-4
    region = sow["layout"].latent_region > 0.5
    p = sow["levels"][2]
    np.testing.assert_array_equal(sow["preserved"][:, :, region],
                                  np.broadcast_to(sow["anchors"][p][:, region], sow["preserved"][:, :, region].shape))


class _Branches:
    """A stand-in UNet whose four branches are told apart by their contexts: ``x * mean(context)``
    per batch row (channels-last), so the four-way combination can be checked exactly."""

    def apply(self, variables, sample, timesteps, context, modifiers=None):
        return sample * jnp.mean(context, axis=(1, 2))[:, None, None, None] + 0.0 * timesteps[:, None, None, None]


def test_masked_four_way_cfg_formula(sd, x64):
    """The release's four-way guidance against its formula by hand (float64, a stand-in UNet whose
    branches are known)."""
    from zmagic_jax.contracts import Denoiser, Keyed, static_partial

    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(4, 3, 5))  # [negative, prompt, suppress, diverse]
    region = np.zeros((6, 7))
    region[1:4, 2:5] = 1.0
    x = rng.normal(size=(4, 6, 7))
    params = {"unet": None, "context": jnp.asarray(embeds), "scale": 4.0, "region": jnp.asarray(region)}
    den = Denoiser(static_partial(_one_way_sd._masked_cfg, Keyed(_Branches(), "branches")), params)
    negative, prompt, suppress, diverse = (x * e.mean() for e in embeds)
    outside = negative + suppress - diverse
    expected = np.where(region > 0, negative + 4.0 * (prompt - negative), outside + 4.0 * (prompt - outside))
    np.testing.assert_allclose(np.asarray(den(jnp.asarray(x), 501)), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"embeds must be \(4, L, D\): negative, prompt, suppress, diverse"):
        masked_cfg_denoiser(sd, np.zeros((2, 77, 32)), 4.0, np.ones((8, 8)))


class _Captured(Exception):
    pass


class _Capture(Programs):
    """Records the program's arguments instead of compiling it."""

    def call(self, fn, args, static=None, compiler_options=None):
        self.args = args
        raise _Captured


def test_masked_cfg_with_sow_runs_the_four_way_denoiser_in_the_cycles_only(sd, files):
    capture = _Capture()
    settings = OneWaySettings(prompt=PROMPT, num_steps=STEPS, cycles=CYCLES, seeds=SEEDS, modulate=True,
                              masked_cfg=True, negative_prompt="wider")
    with pytest.raises(_Captured):
        run_one_way(sd, str(files["image"]), str(files["mask"]), settings, programs=capture)
    keys, canvas, region, contexts, denoiser, cycles, cow, vae_params = capture.args
    assert set(denoiser.params) == {"unet", "context", "scale"}  # inversion and final pass: plain CFG
    assert cycles.apply.fn is _one_way_sd._masked_cfg and cycles.params["context"].shape == (4, 77, 32)
    np.testing.assert_array_equal(cycles.params["region"], region)  # M: the latent region
    assert set(cycles.params["modifiers"]) and cycles.params["scale"] == denoiser.params["scale"]
    # the four prompts [negative, prompt, suppress, diverse]: the prompt is the plain CFG's conditional
    np.testing.assert_allclose(cycles.params["context"][1], denoiser.params["context"][1], rtol=1e-6)


@pytest.mark.skipif(not os.environ.get("ZMAGIC_SLOW_TESTS"), reason="slow (one more program): ZMAGIC_SLOW_TESTS=1")
def test_masked_cfg_with_sow_end_to_end(sd, files, programs):
    """The cycles run the four-way CFG with the modulation; the condition is pasted as ever."""
    out = run(sd, str(files["image"]), str(files["mask"]), programs, modulate=True, masked_cfg=True)
    latent = out["layout"].latent_region > 0.5
    assert np.all(np.isfinite(out["latents"]))
    np.testing.assert_array_equal(out["preserved"][0][:, latent], out["anchors"][out["levels"][2]][:, latent])


@pytest.fixture
def shared_programs(programs, monkeypatch):
    """The CLI and the experiment script on the module's compiled programs."""
    original = _one_way_sd.run_one_way

    def shared(*args, **kwargs):
        return original(*args, **dict(kwargs, programs=programs, compiler_options=FAST_COMPILE))
    monkeypatch.setattr(_one_way_sd, "run_one_way", shared)
    return programs


def test_cli_writes_every_output_and_the_same_bytes_again(cow, shared_programs, tiny_sd_dirs, files, tmp_path,
                                                           capsys):
    out = tmp_path / "cow"
    argv = ["one-way", "--sd", str(tiny_sd_dirs["path"]), "--image", str(files["image"]), "--mask",
            str(files["mask"]), "--prompt", PROMPT, *FLAGS, "--out", str(out)]
    compiled = _compiled(shared_programs)
    assert cli.main(argv) == 0
    assert _compiled(shared_programs) == compiled  # the program of the tests above
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "canvas.png", "grid.png", "metrics.json",
                                                            "seed0.png", "seed1.png"])
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["prompt"] == PROMPT and report["settings"]["seeds"] == list(SEEDS)
    assert report["levels"] == {"replace": 2, "back": 3, "preserve": 2}
    assert report["plan"]["condition_box"] == [4, 4, 12, 12] and report["image_size"] == [16, 16]
    assert [m["file"] for m in report["metrics"]] == ["seed0.png", "seed1.png"]
    assert report["metrics"][0]["region_error"] == pytest.approx(cow["metrics"][0]["region_error"])
    assert "COW on" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(Image.open(out / "seed1.png")),
                                  np.round((np.clip(cow["images"][1], -1, 1) + 1) * 127.5).astype(np.uint8))
    first = {name: (out / name).read_bytes() for name in ("seed0.png", "seed1.png", "canvas.png")}
    # a second run into the same folder needs --overwrite; then the same seeds give the same bytes
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0
    assert {name: (out / name).read_bytes() for name in first} == first


def test_cli_modulate_with_both_parts_off_is_cow(cow, sow0, shared_programs, tiny_sd_dirs, files, tmp_path,
                                                 capsys):
    out = tmp_path / "sow"
    compiled = _compiled(shared_programs)
    assert cli.main(["one-way", "--sd", str(tiny_sd_dirs["path"]), "--image", str(files["image"]), "--mask",
                     str(files["mask"]), "--prompt", PROMPT, *FLAGS, "--modulate", "--suppress-strength", "0.5",
                     "--no-suppress", "--no-enhance", "--no-temporal-decay", "--no-spatial-decay",
                     "--out", str(out)]) == 0
    assert _compiled(shared_programs) == compiled  # switches and strengths are leaves: SOW's program above
    report = json.loads((out / "metrics.json").read_text())
    modulation = report["settings"]["modulation"]
    assert report["settings"]["modulate"] and modulation["suppress_strength"] == 0.5
    assert not (modulation["suppress"] or modulation["enhance"] or modulation["temporal_decay"]
                or modulation["spatial_decay"]) and modulation["indicator"]
    assert "SOW on" in capsys.readouterr().out
    for i, seed in enumerate(SEEDS):  # COW's images to float32 round-off (at most one 8-bit level)
        pixels = np.asarray(Image.open(out / f"seed{seed}.png"), np.int32)
        assert np.abs(pixels - np.round((cow["images"][i] + 1) * 127.5)).max() <= 1


def _png(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def bad_masks(files):
    root = files["root"]
    return {"black": _png(root / "black.png", np.zeros((24, 24))),
            "white": _png(root / "white.png", np.full((24, 24), 255)),
            "small": _png(root / "small.png", np.full((20, 20), 255))}


@pytest.mark.parametrize("change, flag, message", [
    ({"--mask": "black"}, "--mask", "keeps no pixel with keep='ones'"),
    ({"--mask": "white", "--keep": "zeros"}, "--mask", "keeps no pixel with keep='zeros'"),
    ({"--mask": "white", "--seed-size": "16"}, "--mask", "covers the whole canvas"),
    ({"--mask": "small"}, "--mask", r"the mask is 20 x 20 .* but the image 24 x 24"),
    ({"--mask": "missing.png"}, "--mask", "does not exist"),
    ({"--image": "missing.png"}, "--image", "does not exist"),
    ({"--position": ["9", "0"]}, "--position", r"outside the 16 x 16 canvas; rows must be 0\.\.8"),
    ({"--seed-size": "32"}, "--seed-size", "larger than the 16 x 16 image"),
    ({"--sd": "no-such-folder"}, "--sd", "is not a folder"),
    ({"--steps": "4"}, "--steps", "levels must satisfy"),
    ({"--prompt": None}, "--prompt", "required with --sd"),
    ({"--suppress-strength": "0.5"}, "--suppress-strength", "need --modulate"),
    ({"--modulate": [], "--enhance-strength": "-1"}, "--enhance-strength", "finite number >= 0"),
    ({"--digit": "3"}, "--digit", "only with --embedded"),
    ({"--sd": None, "--embedded": [], "--image": None, "--mask": None, "--prompt": None, "--steps": None,
      "--cycles": None, "--seeds": None, "--digit": "12"}, "--digit", "digit must be 0..9"),
    ({"--sd": None, "--embedded": [], "--mask": None, "--prompt": None}, "--image", "only with --sd"),
    ({"--sd": None, "--embedded": [], "--image": None, "--mask": None, "--prompt": None, "--steps": None,
      "--cycles": None}, "--seeds", "one seed"),
    ({"--sd": None, "--embedded": [], "--image": None, "--mask": None, "--prompt": None, "--steps": None,
      "--cycles": None, "--seeds": None, "--count": "1"}, "--count", "count must be an integer >= 2"),
    ({"--embedded": []}, "--embedded", "not allowed with argument --sd"),
])
def test_bad_flags_are_named_and_leave_nothing(change, flag, message, tiny_sd_dirs, files, bad_masks, tmp_path,
                                               capsys):
    args = {"--sd": str(tiny_sd_dirs["path"]), "--image": str(files["image"]), "--mask": str(files["mask"]),
            "--prompt": PROMPT, "--steps": str(STEPS), "--cycles": str(CYCLES), "--seeds": list(map(str, SEEDS))}
    for key, value in change.items():
        if value is None:
            args.pop(key)
        else:
            args[key] = value if isinstance(value, list) else bad_masks.get(
                value, str(tmp_path / value) if value == "missing.png" else value)
    argv = ["one-way"]
    for key, value in args.items():
        argv += [key] + (value if isinstance(value, list) else [value])
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and re.search(message, err), err
    assert not out.exists()


def test_celeba_tv2i_script_on_tiny_models(cow, sow0, shared_programs, tiny_sd_dirs, tiny_clip_dirs, tmp_path,
                                           monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from experiments import celeba_tv2i

    def tiny(folder):  # the session's tiny SD and CLIP instead of building them again
        arcface = celeba_tv2i.save_tiny_arcface(Path(folder) / "arcface.safetensors")
        faces = [(f, None) for f in celeba_tv2i.synthetic_faces(Path(folder) / "faces", 1)]
        return tiny_sd_dirs["path"], tiny_clip_dirs["path"], arcface, [(PROMPT, "a cat")], faces
    monkeypatch.setattr(celeba_tv2i, "build_tiny", tiny)
    monkeypatch.setattr(celeba_tv2i, "run_one_way", _one_way_sd.run_one_way)  # the shared programs
    compiled = _compiled(shared_programs)
    out = tmp_path / "tv2i"
    assert celeba_tv2i.main(["--tiny", *FLAGS, "--out", str(out)]) == 0
    assert _compiled(shared_programs) == compiled  # COW and SOW: the programs of the tests above
    report = json.loads((out / "celeba_tv2i.json").read_text())
    assert report["methods"] == ["cow", "sow"] and report["id_model"] is True
    assert [(r["method"], r["seed"]) for r in report["records"]] == [("cow", 0), ("cow", 1), ("sow", 0), ("sow", 1)]
    for record in report["records"]:
        assert 0 <= record["id_distance"] <= 2 and 0 <= record["text_distance"] <= 2
        assert record["condition_box"] == [0, 4, 8, 12]  # the face rule: top centre
    for method in ("cow", "sow"):
        assert report["summary"][method]["id_distance"]["n"] == 2
    assert "| SOW |" in (out / "celeba_tv2i.md").read_text()
