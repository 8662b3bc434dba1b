"""Write the committed PyTorch parity fixtures of ``tests/references/``.

Must run in the oldest-stack environment, the one with PyTorch, diffusers and transformers
(``make test-oldest`` builds it)::

    .venv-oldest/bin/python experiments/make_parity_fixtures.py

It (1) writes ``tests/references/sd_tiny_bin/``, a minimal Stable Diffusion folder whose weights
PyTorch itself wrote as ``.bin`` files (the numpy random weights of
``tiny_models.save_tiny_stable_diffusion`` at the ``SD_TINY_BIN_*`` configs, read by diffusers /
transformers and saved again by them), and (2) reruns every test file that calls
``tests.references.torch_reference`` under this interpreter with ``ZMAGIC_WRITE_REFERENCES=1``,
which writes the PyTorch values they compute to ``tests/references/<group>.safetensors``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.tiny_models import SD_VOCAB, save_tiny_stable_diffusion  # noqa: E402

SD_TINY_BIN_DIR = ROOT / "tests" / "references" / "sd_tiny_bin"
SD_TINY_BIN_SEED = 0
# The smallest configs of the real architectures that still load, so the folder stays small (a
# .bin file spends ~330 bytes per tensor besides its data): a one-level UNet of 4 channels (a
# cross-attention down and up block, no middle block; 2 groups, 2 heads), a 2-level VAE of 4
# channels (resampling, middle attention, quant convs), a 1-layer text encoder of width 8.
SD_TINY_BIN_UNET = dict(_class_name="UNet2DConditionModel", block_out_channels=[4], layers_per_block=1,
                        sample_size=4, in_channels=4, out_channels=4, down_block_types=["CrossAttnDownBlock2D"],
                        mid_block_type=None, up_block_types=["CrossAttnUpBlock2D"], cross_attention_dim=8,
                        attention_head_dim=2, norm_num_groups=2)
SD_TINY_BIN_VAE = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, block_out_channels=[4, 4],
                       layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                       up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
                       sample_size=8, scaling_factor=0.18215)
SD_TINY_BIN_TEXT = dict(architectures=["CLIPTextModel"], model_type="clip_text_model", hidden_size=8,
                        intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                        vocab_size=len(SD_VOCAB), max_position_embeddings=77, bos_token_id=20, eos_token_id=21,
                        pad_token_id=21, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=8)


def save_sd_tiny_bin_safetensors(root) -> dict:
    """The weights of ``sd_tiny_bin`` as ``tiny_models`` writes them (safetensors, no PyTorch)."""
    return save_tiny_stable_diffusion(root, SD_TINY_BIN_SEED, unet=SD_TINY_BIN_UNET, vae=SD_TINY_BIN_VAE,
                                      text=SD_TINY_BIN_TEXT)


def write_sd_tiny_bin(folder: Path = SD_TINY_BIN_DIR) -> None:
    """Write ``folder`` (replacing it): diffusers' ``save_pretrained(safe_serialization=False)`` of
    the UNet and VAE, ``torch.save`` of the text encoder's checkpoint as ``pytorch_model.bin``,
    diffusers' scheduler config, the toy tokenizer files."""
    import diffusers
    import safetensors.torch
    import torch
    import transformers

    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = save_sd_tiny_bin_safetensors(Path(tmp) / "sd")["path"]
        for sub, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
            model = cls.from_pretrained(source / sub, local_files_only=True)
            model.save_pretrained(staging / sub, safe_serialization=False)
            _drop_source_path(staging / sub / "config.json")
        # transformers 5 saves safetensors only: its checkpoint layout (text_model.*, which its
        # modules no longer have in memory) goes to pytorch_model.bin by torch.save, as 4.x's
        # save_pretrained(safe_serialization=False) did; with the position_ids buffer that
        # transformers < 4.31 saved and the published SD 1.x / 2.x files still carry.
        text = transformers.CLIPTextModel.from_pretrained(source / "text_encoder", local_files_only=True)
        text.save_pretrained(Path(tmp) / "text_encoder")
        state = safetensors.torch.load_file(Path(tmp) / "text_encoder" / "model.safetensors")
        state["text_model.embeddings.position_ids"] = torch.arange(SD_TINY_BIN_TEXT["max_position_embeddings"])[None]
        text.config.save_pretrained(staging / "text_encoder")
        torch.save(state, staging / "text_encoder" / "pytorch_model.bin")
        diffusers.DDIMScheduler.from_pretrained(source / "scheduler").save_pretrained(staging / "scheduler")
        shutil.copytree(source / "tokenizer", staging / "tokenizer")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def _drop_source_path(config_file: Path) -> None:
    """diffusers records the temporary folder it read from as ``_name_or_path``; drop it, so
    that regenerating the fixture from the same weights writes the same files."""
    config = json.loads(config_file.read_text())
    config.pop("_name_or_path", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def reference_test_files() -> list:
    """The test files that ask ``tests.references.torch_reference`` for PyTorch values."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "torch_reference(" in p.read_text(encoding="utf-8"))


# --- The torch.save files of the ports' tests (write_port_fixtures) ------------------------------
# tests/references/checkpoints/: checkpoints of the ported networks laid out as the published files
# are, for the loaders' tests (tests/ports/, tests/test_cli.py), and the objects whose reading
# tests/ports/test_checkpoint.py checks, each in both torch.save formats. The weights are the numpy
# draws of ports/random_weights.py, which the tests repeat without PyTorch.

import numpy as np  # noqa: E402

from ports.random_weights import randomize_  # noqa: E402
from ports.verify import REFERENCES  # noqa: E402
from zmagic_jax.models import (ArcFaceConfig, BiSeNetConfig, DDPMUNetConfig, MobileFaceNetConfig,  # noqa: E402
                               ONetConfig)

PORT_FILES_DIR = ROOT / "tests" / "references" / "checkpoints"
# The smallest configs that keep each loader's code paths; the files are in the legacy format, as
# the published ones are, which also spends the fewest bytes per tensor (~250 besides the data).
PORT_FILE_CONFIGS = {
    "arcface": ArcFaceConfig(stage_units=(1, 2, 1, 1), widths=(4, 8, 8, 8), input_size=32, embedding_size=4,
                             se_reduction=4),
    "bisenet": BiSeNetConfig(resnet_widths=(2, 2, 4, 4), resnet_blocks=(1, 1, 1, 1), context_channels=4,
                             fuse_channels=4, aux_mid_channels=2),
    "mobilefacenet": MobileFaceNetConfig(input_size=16, widths=(2, 4, 4), expansions=(2, 2, 4, 4, 4, 4),
                                         residual_units=(1, 1, 1), num_outputs=10),
    "onet": ONetConfig(widths=(4, 8, 8, 16), hidden=16, input_size=26),
    "ddpm_unet": DDPMUNetConfig(ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=4,
                                norm_groups=2),
}
PORT_FILE_SEED = 0  # of every file's weights; the EMA weights of the DDPM training list are seed 1
TORCH_SAVE_FORMATS = {"zip": True, "legacy": False}  # name -> torch.save's _use_new_zipfile_serialization


def _port_checkpoints() -> dict:
    """``{file name: object}`` of the ports' checkpoints."""
    import torch

    def reference(name):
        return importlib.import_module(f"ports.{REFERENCES[name].torch_module}")

    models = {name: randomize_(reference(name).from_config(config), PORT_FILE_SEED)
              for name, config in PORT_FILE_CONFIGS.items()}
    weights = {name: model.state_dict() for name, model in models.items()}

    def data_parallel(state_dict):
        return {f"module.{key}": value for key, value in state_dict.items()}

    # ermongroup/ddim's training list [DataParallel model weights, optimizer, epoch, step, EMA
    # weights]: an Adam state after one step (of the output layer only, to keep the file small)
    # and EMA weights of another draw, so that a loader taking the wrong entry is seen.
    unet, config = models["ddpm_unet"], PORT_FILE_CONFIGS["ddpm_unet"]
    optimizer = torch.optim.Adam(unet.conv_out.parameters(), lr=0.0)
    unet(torch.zeros(1, 3, config.resolution, config.resolution), torch.tensor([5])).sum().backward()
    optimizer.step()
    ema = randomize_(reference("ddpm_unet").from_config(config), PORT_FILE_SEED + 1).state_dict()
    training = [data_parallel(weights["ddpm_unet"]), optimizer.state_dict(), 7, 500000, ema]
    return {"arcface.pth": weights["arcface"], "bisenet.pth": weights["bisenet"],
            "bisenet_dataparallel.pth": data_parallel(weights["bisenet"]),
            "mobilefacenet.pth.tar": {"epoch": 7, "state_dict": weights["mobilefacenet"]},
            "onet.pt": weights["onet"], "ddpm_unet.ckpt": weights["ddpm_unet"],
            "ddpm_unet_training.pth": training, "ddpm_unet_training_no_ema.pth": training[:4],
            "ddpm_unet_list_without_weights.pth": [{"lr": 1.0}, 3, 4]}


def _reader_cases() -> dict:
    """``{name: object}`` whose reading without PyTorch tests/ports/test_checkpoint.py checks (its
    ``EXPECTED`` are the same objects with numpy arrays for the tensors)."""
    import collections

    import torch

    base = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32))
    dtypes = {"float32": base, "float16": base.half(), "bfloat16": base.bfloat16(), "float64": base.double(),
              "int64": torch.arange(-5, 7).reshape(3, 4), "int32": torch.arange(6, dtype=torch.int32),
              "int16": torch.tensor([-3, 300], dtype=torch.int16), "int8": torch.tensor([-128, 127], dtype=torch.int8),
              "uint8": torch.tensor([0, 255], dtype=torch.uint8), "bool": base > 0, "scalar": torch.tensor(2.5),
              "empty": torch.zeros(0, 3), "parameter": torch.nn.Parameter(base.clone())}
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = {"t": t, "tail": t[1:], "transposed": t.T, "column": t[:, 2], "strided": t[::2, 1::3],
             "expanded": torch.arange(3.0).expand(4, 3), "permuted": t.reshape(2, 3, 4).permute(2, 0, 1),
             "flat_view": t.view(-1)[5:17]}
    inner = collections.OrderedDict([("w", torch.ones(2, 2)), ("b", torch.zeros(2))])
    containers = {"state_dict": inner, "layers": [torch.arange(3), (torch.eye(2), "name", None), {"deep": [inner, 7]}],
                  "epoch": 12, "lr": 0.125, "arch": "onet", "best": None, "flag": True, "big": 2 ** 40,
                  "shape": torch.Size([3, 4]), "text": "é"}
    # torch.save pickles with protocol 2, which builds bytes (so numpy arrays and scalars) through _codecs.encode.
    values = {"bytes": b"\x00\x01", "array": np.arange(4, dtype=np.float64), "best": np.float64(0.5),
              "step": np.int64(3)}
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 5))
    return {"dtypes": dtypes, "views": views, "containers": containers, "values": values,
            "state_dict": randomize_(module, 0).state_dict()}


def write_port_fixtures(root: Path = PORT_FILES_DIR.parent) -> Path:
    """Write ``root/checkpoints/`` (replacing it): the ports' checkpoints of ``PORT_FILE_CONFIGS``,
    each reader case as ``<name>_zip.pt`` and ``<name>_legacy.pt``, and ``whole_module.pt`` (a
    pickled ``nn.Linear``, which the reader must refuse). Returns the folder."""
    import torch

    folder = Path(root) / PORT_FILES_DIR.name
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, obj in _port_checkpoints().items():
        torch.save(obj, staging / name, _use_new_zipfile_serialization=False)
    for name, obj in _reader_cases().items():
        for fmt, zip_format in TORCH_SAVE_FORMATS.items():
            torch.save(obj, staging / f"{name}_{fmt}.pt", _use_new_zipfile_serialization=zip_format)
    torch.save(randomize_(torch.nn.Linear(2, 2), 0), staging / "whole_module.pt")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def main() -> None:
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("make_parity_fixtures.py needs PyTorch, diffusers and transformers: run it with "
                         ".venv-oldest/bin/python (built by `make test-oldest`).")
    write_sd_tiny_bin()
    size = sum(f.stat().st_size for f in SD_TINY_BIN_DIR.rglob("*") if f.is_file())
    print(f"wrote {SD_TINY_BIN_DIR.relative_to(ROOT)} ({size / 1024:.0f} KB)")
    folder = write_port_fixtures()
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"wrote {folder.relative_to(ROOT)} ({size / 1024:.0f} KB)")
    files = reference_test_files()
    env = dict(os.environ, ZMAGIC_WRITE_REFERENCES="1")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
                   cwd=ROOT, env=env, check=True)


if __name__ == "__main__":
    main()
