"""Check a Flax port against its PyTorch reference on your own checkpoint.

    python ports/verify.py NETWORK CHECKPOINT [--config JSON] [--seed N] [--tolerance 1e-4] [--samples K]

NETWORK is one of ``zmagic_jax.ports.PORTS`` (ddpm_unet, arcface, bisenet, mobilefacenet, onet);
CHECKPOINT is the PyTorch file you have (``.pt``, ``.pth``, ``.ckpt``, ``.tar``, ``.bin``).

1. The library converts it exactly as ``zmagic face`` and ``zmagic convert`` do (``load_port``: read
   without PyTorch, every tensor mapped, shapes checked against the Flax module), with ``--config``
   (a JSON object of the Flax config's fields, or a file holding one; default: the published network).
2. ``torch.load`` reads the same file; the loader's own rule picks the state dict in it (e.g. the
   EMA entry of an ermongroup training list) and the reference of ``ports/torch_<network>.py`` for
   that config loads it with ``strict=True``.
3. K random inputs of the network's input shape (for ddpm_unet with random timesteps) go through both
   in eval mode and float32; per output the max relative error ``max|flax - torch| / max|torch|`` is
   printed, then ``OK: ...`` (exit 0) or ``FAIL: ...`` (exit 1) against the tolerance.

A file of another network, a missing file, an unknown NETWORK or a missing PyTorch exit with 2 and a
one-line message. PyTorch comes from the test extra: ``pip install -e '.[test]'``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `ports` and `zmagic_jax` are in ROOT
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from zmagic_jax.checkpoint_io import TORCH_SUFFIXES, is_torch_checkpoint  # noqa: E402
from zmagic_jax.ports import PORTS, CheckpointMismatchError, load_port, state_dict_of  # noqa: E402
from zmagic_jax.ports._checkpoint import config_from_json  # noqa: E402

TRAIN_TIMESTEPS = 1000  # the DDPM UNet's timesteps are drawn from 0..T-1 of its linear schedule
BISENET_SIZE = 512  # the side bisenet_preprocess resizes to (FreeDoM's face-parsing input)
TORCH_HINT = "PyTorch is needed for the reference networks: pip install -e '.[test]'"


class VerifyError(Exception):
    """Nothing could be compared: the file, the network or the set-up is wrong (exit code 2)."""


class Reference(NamedTuple):
    """How one network is exercised: ``torch_module`` (in ``ports/``) has ``from_config(config)``;
    ``inputs(rng, config, k)`` -> tuple of numpy arrays (images NHWC); ``run_flax(module, variables,
    *inputs)`` and ``run_torch(model, *inputs)`` -> ``{output name: array}``, NHWC for images."""

    torch_module: str
    inputs: Callable
    run_flax: Callable
    run_torch: Callable


def _nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t) -> np.ndarray:
    return t.numpy().transpose(0, 2, 3, 1)


def _images(low: float, high: float, size: Callable) -> Callable:
    """``inputs`` of a network on ``k`` square RGB images of side ``size(config)``, uniform in [low, high]."""
    def inputs(rng, config, k):
        side = size(config)
        return (rng.uniform(low, high, (k, side, side, 3)).astype(np.float32),)
    return inputs


def _ddpm_inputs(rng, config, k):
    x = rng.standard_normal((k, config.resolution, config.resolution, config.in_channels)).astype(np.float32)
    return x, rng.integers(0, TRAIN_TIMESTEPS, k).astype(np.int32)


def _ddpm_torch(model, x, t):
    import torch
    return {"eps": _nhwc(model(_nchw(x), torch.from_numpy(t.astype(np.int64))))}


def _bisenet_flax(module, variables, x):
    return dict(zip(("out", "out16", "out32"), module.apply(variables, x, return_aux=True)))


def _input_size(config) -> int:
    return config.input_size


REFERENCES = {
    "ddpm_unet": Reference("torch_ddpm_unet", _ddpm_inputs,
                           lambda module, variables, x, t: {"eps": module.apply(variables, x, t)}, _ddpm_torch),
    "arcface": Reference("torch_arcface", _images(-1.0, 1.0, _input_size),
                         lambda module, variables, x: {"embedding": module.apply(variables, x)},
                         lambda model, x: {"embedding": model(_nchw(x)).numpy()}),
    # BiSeNet sees ImageNet-normalised images: about [-2, 2.5].
    "bisenet": Reference("torch_bisenet", _images(-2.0, 2.5, lambda config: BISENET_SIZE), _bisenet_flax,
                         lambda model, x: dict(zip(("out", "out16", "out32"), map(_nhwc, model(_nchw(x)))))),
    # FreeDoM feeds the landmark network images in [0, 1].
    "mobilefacenet": Reference("torch_mobilefacenet", _images(0.0, 1.0, _input_size),
                               lambda module, variables, x: {"landmarks": module.apply(variables, x)},
                               lambda model, x: {"landmarks": model(_nchw(x))[0].numpy()}),
    # ONet sees its crop normalised as (pixel - 127.5) / 128, in [-1, 1].
    "onet": Reference("torch_mtcnn", _images(-1.0, 1.0, _input_size),
                      lambda module, variables, x: dict(module.apply(variables, x)),
                      lambda model, x: {k: v.numpy() for k, v in model(_nchw(x)).items()}),
}


@dataclasses.dataclass(frozen=True)
class Verification:
    """What :func:`verify` measured: per output, ``max|flax - torch| / max|torch|``."""

    network: str
    path: str
    config: object
    samples: int
    seed: int
    errors: dict
    tolerance: float

    @property
    def max_error(self) -> float:
        return max(self.errors.values())

    @property
    def worst_output(self) -> str:
        return max(self.errors, key=self.errors.get)

    @property
    def ok(self) -> bool:
        return bool(self.max_error < self.tolerance)  # False for NaN


def relative_error(ours, ref) -> float:
    """``max|ours - ref| / max|ref|`` in float64 (inf when ``ref`` is all zeros and ``ours`` is not)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise VerifyError(f"the Flax output has shape {ours.shape}, the PyTorch one {ref.shape}")
    difference, scale = np.max(np.abs(ours - ref)), np.max(np.abs(ref))
    if scale == 0:
        return 0.0 if difference == 0 else float("inf")
    return float(difference / scale)


def _port(network: str):
    if network not in PORTS:
        raise VerifyError(f"unknown network {network!r}; choose one of {', '.join(PORTS)}")
    return PORTS[network]


def parse_config(network: str, text: str):
    """The Flax config of ``network`` from a JSON object of its fields, inline or in a file."""
    port = _port(network)
    name = port.config_type.__name__
    example = json.dumps(dataclasses.asdict(port.default_config))
    if not text.lstrip().startswith("{"):
        source = Path(text).expanduser()
        if not source.is_file():
            raise VerifyError(f"--config: {text!r} is neither a JSON object nor a file; give the fields of {name}, "
                              f"e.g. '{example}'")
        text = source.read_text()
    try:
        return config_from_json(port.config_type, text)
    except (ValueError, TypeError) as err:
        raise VerifyError(f"--config: {err}; give a JSON object of the fields of {name}, e.g. '{example}'") from err


def _torch_state_dict(port, path: Path) -> dict:
    """The checkpoint read by ``torch.load``, its state dict picked by the loader's rule, as tensors."""
    import torch

    def to_numpy(obj):
        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().float().numpy() if obj.dtype == torch.bfloat16 else obj.detach().cpu().numpy()
        if isinstance(obj, dict):
            return type(obj)((k, to_numpy(v)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return type(obj)(to_numpy(v) for v in obj)
        return obj

    try:
        obj = to_numpy(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:
        raise VerifyError(f"torch.load cannot read {path}: {err}") from err
    pick = port.pick or (lambda o, path: state_dict_of(o, path=path, architecture=port.architecture))
    return {k: torch.from_numpy(np.array(v)) for k, v in pick(obj, path=path).items()}


def verify(network: str, path, *, config=None, seed: int = 0, samples: int = 2,
           tolerance: float = 1e-4) -> Verification:
    """Compare the library's port of ``network`` on the PyTorch checkpoint ``path`` with the PyTorch
    reference loaded from the same file (steps in the module docstring). ``config``: the Flax config
    (default: the published network). Raises :class:`VerifyError`, ``CheckpointMismatchError`` or
    ``FileNotFoundError`` when nothing can be compared."""
    port, reference = _port(network), REFERENCES[network]
    if samples < 1 or not tolerance > 0:
        raise VerifyError(f"need --samples >= 1 and --tolerance > 0; got {samples} and {tolerance}")
    path = Path(path).expanduser()
    if not is_torch_checkpoint(path):
        raise VerifyError(f"{path}: expected the PyTorch checkpoint ({', '.join(TORCH_SUFFIXES)}) of "
                          f"{port.architecture}; the reference needs its state dict (a converted .safetensors "
                          "file holds Flax params only: pass the file it was converted from)")

    import jax

    module, params = load_port(port, path, config)  # a file that does not convert needs no PyTorch to be told so
    if importlib.util.find_spec("torch") is None:
        raise VerifyError(TORCH_HINT)
    import torch

    model = importlib.import_module(f"ports.{reference.torch_module}").from_config(module.config)  # eval mode
    try:
        model.load_state_dict(_torch_state_dict(port, path), strict=True)
    except RuntimeError as err:
        raise VerifyError(f"{path}: the PyTorch reference {reference.torch_module}.py with {module.config} does "
                          f"not load it strictly, though the converter did: {err}") from err

    inputs = reference.inputs(np.random.default_rng(seed), module.config, samples)
    flax_outputs = jax.jit(lambda variables, *xs: reference.run_flax(module, variables, *xs))(
        {"params": params}, *inputs)
    with torch.no_grad():
        torch_outputs = reference.run_torch(model, *inputs)
    if set(flax_outputs) != set(torch_outputs):
        raise VerifyError(f"outputs differ: Flax {sorted(flax_outputs)}, PyTorch {sorted(torch_outputs)}")
    errors = {name: relative_error(flax_outputs[name], torch_outputs[name]) for name in torch_outputs}
    return Verification(network=network, path=str(path), config=module.config, samples=samples, seed=seed,
                        errors=errors, tolerance=tolerance)


def report(result: Verification) -> str:
    lines = [f"{result.network}: {result.path}", f"  config {result.config}",
             f"  {result.samples} random inputs (seed {result.seed}), eval mode, float32"]
    width = max(map(len, result.errors))
    lines += [f"  {name:<{width}}  max relative error {error:.1e}" for name, error in result.errors.items()]
    if result.ok:
        lines.append(f"OK: max relative error {result.max_error:.1e} < {result.tolerance:.0e}")
    else:
        lines.append(f"FAIL: max relative error {result.max_error:.1e} >= {result.tolerance:.0e} "
                     f"(output {result.worst_output})")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ports/verify.py", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 OK, 1 error above the tolerance, 2 nothing compared (wrong file or network).")
    parser.add_argument("network", help=f"one of: {', '.join(PORTS)}")
    parser.add_argument("checkpoint", help=f"your PyTorch checkpoint ({', '.join(TORCH_SUFFIXES)})")
    parser.add_argument("--config", help="JSON object of the Flax config's fields, or a file holding one "
                                         "(default: the published network)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest max relative error accepted")
    parser.add_argument("--samples", type=int, default=2, help="number of random inputs (default 2)")
    return parser


def _one_line(err: Exception) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def main(argv=None) -> int:
    """The command line: prints the report and returns the exit status (0 OK, 1 FAIL, 2 error)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help, or argparse's own usage error (already printed)
        return int(stop.code or 0)
    try:
        config = None if args.config is None else parse_config(args.network, args.config)
        result = verify(args.network, args.checkpoint, config=config, seed=args.seed, samples=args.samples,
                        tolerance=args.tolerance)
    except (VerifyError, CheckpointMismatchError, FileNotFoundError, ValueError) as err:
        hint = (" If it is not the published network, give its config with --config."
                if isinstance(err, CheckpointMismatchError) and args.config is None else "")
        print(f"ports/verify.py: error: {_one_line(err)}{hint}", file=sys.stderr)
        return 2
    print(report(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
