"""The command line explains itself: descriptions, defaults, ranges and choices in --help, --version,
and out-of-range values refused (with the flag named) before any work."""
import tomllib
from pathlib import Path

import pytest

import zmagic_jax
from zmagic_jax import cli
from zmagic_jax.tasks._recipe import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_version_matches_the_package_metadata(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"zmagic {version}" and zmagic_jax.__version__ == version


def test_every_sub_command_has_a_description_defaults_and_choices(capsys):
    top = help_of([], capsys)
    for command in ("demo", "text-style", "face", "convert"):
        assert command in top
    demo = help_of(["demo"], capsys)
    assert "exact Gaussian-mixture testbed" in demo and "(default: 100)" in demo and "(2..1000)" in demo
    assert "testbed seed (>= 0) (default: 0)" in " ".join(demo.split())  # a zero default is still shown
    assert "{" + ",".join(sorted(SAMPLERS)) + "}" in demo and "--overwrite" in demo and "--nan-policy" in demo
    style = help_of(["text-style"], capsys)
    assert "Stable Diffusion" in style and "(default: dependent)" in style and "{" + ",".join(sorted(SAMPLERS)) in style
    face = help_of(["face"], capsys)
    assert "(default: 500.0)" in face and "finite, > 0" in face and "--nan-policy" in face
    convert = help_of(["convert"], capsys)
    assert "ddpm_unet" in convert and "--overwrite" in convert


@pytest.mark.parametrize("argv,flag", [
    (["demo", "--scale", "inf"], "guidance_scale"), (["demo", "--scale", "-1"], "guidance_scale"),
    (["demo", "--scale", "nan"], "guidance_scale"), (["demo", "--sampler", "heun"], "--sampler"),
    (["face", "--unet", "u.pt", "--landmark-scale", "inf"], "--landmark-scale"),
    (["face", "--unet", "u.pt", "--identity-scale", "-5"], "--identity-scale"),
    (["text-style", "--sd", "s", "--clip", "c", "--prompt", "p", "--style", "s.png", "--scale", "inf"], "--scale"),
])
def test_out_of_range_values_are_refused_with_the_flag(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_demo_table_prints_rows_whose_samples_all_diverged():
    row = {"dim": 2, "setting": "pair", "scheme": "independent", "final_energy": {"class": {"mean": None}},
           "energy_distance": None, "sliced_wasserstein": None, "mean_guided_cosine": None,
           "diverged_samples": 16, "all_diverged": True, "dropped_guidance_steps": 0.5, "wall_time_s": 0.01}
    table = cli._table({"results": [row]})
    assert table.splitlines()[-1].split() == ["2", "pair", "independent", "-", "-", "-", "-", "-", "-", "16",
                                              "(all)", "50%", "0.0"]
