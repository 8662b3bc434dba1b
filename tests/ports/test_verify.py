"""``ports/verify.py`` on checkpoints saved as the published files are (random weights of small
configs; ONet's real weights from facenet-pytorch): parity reported and accepted, a checkpoint of
another network, a missing file and an unknown network refused with exit code 2, and the script
run standalone from another directory."""
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ports import torch_arcface, torch_bisenet, torch_ddpm_unet, torch_mobilefacenet, torch_mtcnn  # noqa: E402
from ports.verify import REFERENCES, main  # noqa: E402
from zmagic_jax.models import ArcFaceConfig, BiSeNetConfig, DDPMUNetConfig, MobileFaceNetConfig, ONetConfig  # noqa
from zmagic_jax.ports import PORTS, installed_onet_path  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "ports" / "verify.py"
# The TINY configs of test_<network>.py.
TINY = {
    "ddpm_unet": DDPMUNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16),
    "arcface": ArcFaceConfig(stage_units=(1, 2, 1, 1), widths=(16, 32, 32, 64), input_size=32, embedding_size=24),
    "bisenet": BiSeNetConfig(resnet_widths=(8, 16, 32, 64), context_channels=16, fuse_channels=32,
                             aux_mid_channels=8),
    "mobilefacenet": MobileFaceNetConfig(input_size=32, widths=(8, 16, 32), expansions=(16, 16, 32, 32, 32, 32),
                                         residual_units=(1, 2, 1), num_outputs=10),
    "onet": ONetConfig(widths=(4, 8, 8, 16), hidden=16, input_size=26),
}
OUTPUTS = {"ddpm_unet": ["eps"], "arcface": ["embedding"], "bisenet": ["out", "out16", "out32"],
           "mobilefacenet": ["landmarks"], "onet": ["prob", "box", "landmarks"]}


def _config_json(network):
    return json.dumps(dataclasses.asdict(TINY[network]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{network: (path, --config argument or None)}``, each file laid out as the published one."""
    root = tmp_path_factory.mktemp("published")
    files = {}
    # ermongroup/ddim's training list: DataParallel model weights, optimizer, epoch, step, then the
    # EMA weights, which the loader takes (other values than the model's: both sides must pick them).
    model = torch_ddpm_unet.randomize_(torch_ddpm_unet.from_config(TINY["ddpm_unet"]), seed=0)
    ema = torch_ddpm_unet.randomize_(torch_ddpm_unet.from_config(TINY["ddpm_unet"]), seed=1)
    files["ddpm_unet"] = root / "ckpt.pth"
    torch.save([{f"module.{k}": v for k, v in model.state_dict().items()},
                {"state": {}, "param_groups": [{"lr": 2e-4, "params": []}]}, 7, 500000, ema.state_dict()],
               files["ddpm_unet"])
    files["arcface"] = root / "model_ir_se50.pth"
    torch.save(torch_arcface.randomize_(torch_arcface.from_config(TINY["arcface"]), seed=1).state_dict(),
               files["arcface"])
    files["bisenet"] = root / "79999_iter.pth"
    torch.save(torch_arcface.randomize_(torch_bisenet.from_config(TINY["bisenet"]), seed=2).state_dict(),
               files["bisenet"])
    files["mobilefacenet"] = root / "mobilefacenet_model_best.pth.tar"
    landmarks = torch_arcface.randomize_(torch_mobilefacenet.from_config(TINY["mobilefacenet"]), seed=3)
    torch.save({"epoch": 7, "state_dict": landmarks.state_dict()}, files["mobilefacenet"])
    files["onet"] = root / "onet.pt"
    torch.save(torch_mtcnn.randomize_(torch_mtcnn.from_config(TINY["onet"]), seed=4).state_dict(), files["onet"])
    # One config given as a file, the others inline.
    (root / "mobilefacenet.json").write_text(_config_json("mobilefacenet"))
    return {network: (path, str(root / "mobilefacenet.json") if network == "mobilefacenet" else _config_json(network))
            for network, path in files.items()}


def _reported_max_error(out: str) -> float:
    match = re.search(r"^OK: max relative error (\S+) < 1e-04$", out, re.MULTILINE)
    assert match, out
    return float(match.group(1))


def test_every_port_has_a_reference():
    assert set(REFERENCES) == set(PORTS) == set(OUTPUTS)


@pytest.mark.parametrize("network", ["ddpm_unet", "arcface", "bisenet", "mobilefacenet"])
def test_parity_on_published_layouts(network, checkpoints, capsys):
    path, config = checkpoints[network]
    assert main([network, str(path), "--config", config, "--samples", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert _reported_max_error(out) < 1e-4
    for name in OUTPUTS[network]:
        assert re.search(rf"^  {name} +max relative error \S+$", out, re.MULTILINE), out


def test_parity_on_the_real_onet_weights(capsys):
    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("facenet-pytorch is not installed (pip install --no-deps facenet-pytorch==2.6.0): "
                    "its data/onet.pt holds the real ONet weights")
    assert main(["onet", str(installed_onet_path()), "--samples", "3"]) == 0  # the published config
    out = capsys.readouterr().out
    assert "input_size=48" in out and _reported_max_error(out) < 1e-4


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
    assert re.search(r"model_ir_se50\.pth does not match BiSeNet.*missing from the checkpoint.*cp\.resnet\.conv1"
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
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch" else find_spec(name, *args))
    assert main(["arcface", str(checkpoints["arcface"][0])]) == 2
    assert "pip install -e '.[test]'" in capsys.readouterr().err


def test_script_runs_standalone_from_another_directory(checkpoints, tmp_path):
    path, config = checkpoints["onet"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(SCRIPT), "onet", str(path), "--config", config, "--samples", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _reported_max_error(done.stdout) < 1e-4
