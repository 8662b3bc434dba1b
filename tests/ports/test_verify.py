"""``ports/verify.py`` on checkpoints saved as the published files are (the small random ones
``torch.save`` wrote, ``tests/references/checkpoints/``; ONet's real weights from facenet-pytorch):
parity reported and accepted, a checkpoint of another network, a missing file and an unknown network
refused with exit code 2, and the script run standalone from another directory.

The comparisons need PyTorch, which the script runs live by design; the refusals do not."""
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.make_parity_fixtures import PORT_FILE_CONFIGS
from ports.verify import REFERENCES, main
from tests.parity import CHECKPOINTS
from tests.references import have_torch
from zmagic_jax.ports import PORTS, installed_onet_path

SCRIPT = Path(__file__).resolve().parents[2] / "ports" / "verify.py"
FILES = {"ddpm_unet": "ddpm_unet_training.pth", "arcface": "arcface.pth", "bisenet": "bisenet.pth",
         "mobilefacenet": "mobilefacenet.pth.tar", "onet": "onet.pt"}
OUTPUTS = {"ddpm_unet": ["eps"], "arcface": ["embedding"], "bisenet": ["out", "out16", "out32"],
           "mobilefacenet": ["landmarks"], "onet": ["prob", "box", "landmarks"]}
needs_torch = pytest.mark.skipif(not have_torch(), reason="ports/verify.py compares with the PyTorch reference "
                                                          "live (PyTorch is installed on the oldest stack)")


def _config_json(network):
    return json.dumps(dataclasses.asdict(PORT_FILE_CONFIGS[network]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{network: (path, --config argument)}``; one config given as a file, the others inline. The
    ermongroup training list of ddpm_unet has EMA weights other than the model's: both sides must
    pick them."""
    config_file = tmp_path_factory.mktemp("configs") / "mobilefacenet.json"
    config_file.write_text(_config_json("mobilefacenet"))
    return {network: (CHECKPOINTS / name, str(config_file) if network == "mobilefacenet" else _config_json(network))
            for network, name in FILES.items()}


def _reported_max_error(out: str) -> float:
    match = re.search(r"^OK: max relative error (\S+) < 1e-04$", out, re.MULTILINE)
    assert match, out
    return float(match.group(1))


def test_every_port_has_a_reference():
    assert set(REFERENCES) == set(PORTS) == set(OUTPUTS) == set(FILES)


@needs_torch
@pytest.mark.parametrize("network", ["ddpm_unet", "arcface", "bisenet", "mobilefacenet"])
def test_parity_on_published_layouts(network, checkpoints, capsys):
    path, config = checkpoints[network]
    assert main([network, str(path), "--config", config, "--samples", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert _reported_max_error(out) < 1e-4
    for name in OUTPUTS[network]:
        assert re.search(rf"^  {name} +max relative error \S+$", out, re.MULTILINE), out


@needs_torch
def test_parity_on_the_real_onet_weights(capsys):
    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("facenet-pytorch is not installed (pip install --no-deps facenet-pytorch==2.6.0): "
                    "its data/onet.pt holds the real ONet weights")
    assert main(["onet", str(installed_onet_path()), "--samples", "3"]) == 0  # the published config
    out = capsys.readouterr().out
    assert "input_size=48" in out and _reported_max_error(out) < 1e-4


@needs_torch
def test_error_above_the_tolerance_fails(checkpoints, capsys):
    path, config = checkpoints["onet"]
    assert main(["onet", str(path), "--config", config, "--tolerance", "1e-12"]) == 1
    assert re.search(r"^FAIL: max relative error \S+ >= 1e-12 \(output \w+\)$", capsys.readouterr().out, re.MULTILINE)


def test_checkpoint_of_another_network_is_refused(checkpoints, capsys):
    path, _ = checkpoints["arcface"]
    assert main(["bisenet", str(path), "--config", _config_json("bisenet")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    message = captured.err.strip()
    assert "\n" not in message
    assert re.search(r"arcface\.pth does not match BiSeNet.*missing from the checkpoint.*cp\.resnet\.conv1"
                     r".*not used by the architecture.*body\.0\.res_layer", message), message
    # The right network without its config: the published one does not fit, and the message says what to do.
    assert main(["arcface", str(path)]) == 2
    assert "give its config with --config" in capsys.readouterr().err


def test_missing_file_unknown_network_and_bad_config(tmp_path, checkpoints, capsys):
    assert main(["arcface", str(tmp_path / "model_ir_se50.pth")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and "model_ir_se50.pth" in err and "InsightFace_Pytorch" in err
    assert main(["resnet", str(tmp_path / "x.pth")]) == 2
    assert "unknown network 'resnet'; choose one of " + ", ".join(PORTS) in capsys.readouterr().err
    assert main(["arcface", str(tmp_path / "arcface.safetensors")]) == 2
    assert "the reference needs its state dict" in capsys.readouterr().err
    assert main(["arcface", str(checkpoints["arcface"][0]), "--config", '{"depth": 3}']) == 2
    assert "unknown fields ['depth']" in capsys.readouterr().err


def test_without_pytorch_says_how_to_install_it(checkpoints, monkeypatch, capsys):
    """A checkpoint that converts, and no PyTorch for the reference (absent here, or hidden)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch" else find_spec(name, *args))
    path, config = checkpoints["arcface"]
    assert main(["arcface", str(path), "--config", config]) == 2
    assert "pip install -e '.[test]'" in capsys.readouterr().err


@needs_torch
def test_script_runs_standalone_from_another_directory(checkpoints, tmp_path):
    path, config = checkpoints["onet"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(SCRIPT), "onet", str(path), "--config", config, "--samples", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _reported_max_error(done.stdout) < 1e-4
