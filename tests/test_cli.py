"""`zmagic demo` end to end on a reduced setting: every output, and nothing half-written on failure."""
import json

import pytest

from zmagic_jax import cli
from zmagic_jax._io import MARKER

# With tests/tasks/test_digits.py (same testbed settings): the demo's programs compile once.
pytestmark = pytest.mark.xdist_group("demo")
from zmagic_jax.tasks import _testbed_demo

# digits: tests/tasks/test_digits.py; canvas (AMDM): tests/test_canvas_demo.py
ARGS = ["--dims", "2", "--samples", "32", "--steps", "10", "--no-digits", "--no-canvas", "--no-one-way", "--no-concepts"]
FIGURES = {"cosines.png", "energy_curves_d2.png", "samples_d2.png", "landscape_d2.png"}


def test_demo_writes_report_figures_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), *ARGS]) == 0
    assert {p.name for p in out.iterdir()} == FIGURES | {"report.json", MARKER}
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["seed"] == 0 and report["settings"]["num_samples"] == 32
    schemes = [(r["setting"], r["scheme"]) for r in report["results"]]
    assert schemes == [("pair", "exact posterior"), ("triple", "exact posterior"),
                       ("pair", "none"), ("pair", "independent"), ("pair", "dependent (1->2)"),
                       ("pair", "dependent (1->2) trust"), ("pair", "dependent (2->1)"), ("pair", "multi"),
                       ("triple", "independent [3]"), ("triple", "multi [3]"), ("triple", "multi [3] trust")]
    for r in report["results"][2:]:
        assert set(r["final_energy"]) == set(r["conditions"])
        assert r["energy_distance"] >= 0 and r["sliced_wasserstein"] >= 0 and r["wall_time_s"] > 0
        assert (r["mean_guided_cosine"] is None) == (r["scheme"] == "none")
    exact, none, guided = report["results"][0], report["results"][2], report["results"][3]
    assert exact["energy_distance"] == exact["noise_floor"]["energy_distance"] > 0
    # guidance pulls toward the exact posterior
    assert guided["energy_distance"] < none["energy_distance"]
    table = capsys.readouterr().out
    assert "dependent (2->1)" in table and "multi [3]" in table


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failing_demo_leaves_no_half_written_output(tmp_path, monkeypatch, error):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.json").write_text("previous run")
    (out / MARKER).write_text('{"tool": "zmagic_jax"}')  # a previous output of zmagic

    def boom(*args, **kwargs):
        raise error
    # two quick runs, then a failure after the first figure was written into the staging folder
    original = _testbed_demo._runs
    monkeypatch.setattr(_testbed_demo, "_runs", lambda conds: original(conds)[:2])
    monkeypatch.setattr(_testbed_demo.figures, "plot_scatter", boom)
    with pytest.raises(type(error)):
        cli.main(["demo", "--out", str(out), "--overwrite", *ARGS])
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folder left behind
    assert (out / "report.json").read_text() == "previous run"  # the earlier output is untouched


def test_bad_arguments_exit_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--out", str(tmp_path / "x"), "--sampler", "heun"])
    assert exit_info.value.code == 2
    assert "heun" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_text_style_flags_are_checked_before_any_work(tmp_path, capsys):
    """Missing required flags and bad choices stop at parsing (exit 2, the flag named); the
    end-to-end runs on tiny models are in tests/tasks/test_text_style.py."""
    for argv, expected in [(["text-style", "--prompt", "lower"], "--sd"),
                           (["text-style", "--sd", "a", "--clip", "b", "--prompt", "p", "--style", "s",
                             "--scheme", "magic"], "--scheme"),
                           (["text-style", "--sd", "a", "--clip", "b", "--prompt", "p", "--style", "s",
                             "--rule", "adam"], "--rule"),
                           (["text-style", "--sd", str(tmp_path / "nowhere"), "--clip", "b", "--prompt", "p",
                             "--style", "s", "--out", str(tmp_path / "x")], "--sd")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_convert_writes_self_describing_params(tmp_path, capsys):
    import importlib.util

    import numpy as np
    from flax import traverse_util

    from tests.parity import CHECKPOINTS
    from zmagic_jax.ports import load_onet, params_metadata
    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("facenet-pytorch (installed by `make`) ships the ONet weights")
    from zmagic_jax.ports import installed_onet_path
    out = tmp_path / "onet.safetensors"
    assert cli.main(["convert", "onet", str(installed_onet_path()), str(out)]) == 0
    assert params_metadata(out)["network"] == "onet"
    direct, converted = load_onet()[1], load_onet(out)[1]
    for key, value in traverse_util.flatten_dict(direct).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(traverse_util.flatten_dict(converted)[key]))
    # A checkpoint of another ONet size (a small one torch.save wrote) is refused, naming the
    # mismatch, and nothing is written.
    with pytest.raises(SystemExit):
        cli.main(["convert", "onet", str(CHECKPOINTS / "onet.pt"), str(tmp_path / "small.safetensors")])
    assert "does not match" in capsys.readouterr().err and not (tmp_path / "small.safetensors").exists()
