"""BiSeNet face parser: Flax port vs a PyTorch reference with the published checkpoint's key names.

The weights are numpy draws in the reference's layout (``tests/parity.py``); the PyTorch values are
computed live where PyTorch is installed and read from ``tests/references/ports_bisenet.safetensors``
elsewhere (``tests/references.py``); the checkpoints are files ``torch.save`` wrote
(``experiments/make_parity_fixtures.py``)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.make_parity_fixtures import PORT_FILE_CONFIGS
from tests.parity import CHECKPOINTS, file_state_dict, reference_state_dict, sketch
from tests.references import torch_reference
from zmagic_jax.energies._image import IMAGENET_MEAN, IMAGENET_STD
from zmagic_jax.models._bisenet import (
    BiSeNet,
    BiSeNetConfig,
    bisenet_preprocess,
    resize_bilinear_align_corners,
    resize_nearest_torch,
)
from zmagic_jax.ports._bisenet import BISENET, convert_bisenet, load_bisenet
from zmagic_jax.ports._checkpoint import CheckpointMismatchError, convert_file, save_params

GROUP = "ports_bisenet"
TINY = dict(widths=(8, 16, 32, 64), ctx=16, fuse=32, aux_mid=8)
TINY_CONFIG = BiSeNetConfig(resnet_widths=(8, 16, 32, 64), context_channels=16, fuse_channels=32, aux_mid_channels=8)


def _torch_bisenet(state_dict=None, **kwargs):
    """The PyTorch reference (``BiSeNet(**kwargs)``), with ``state_dict`` loaded when given."""
    from ports.random_weights import load_weights_
    from ports.torch_bisenet import BiSeNet as TorchBiSeNet
    model = TorchBiSeNet(**kwargs)
    return model if state_dict is None else load_weights_(model, state_dict)


def _nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def _torch_normalize(x):
    """FreeDoM's ImageNet normalisation, adapted to images in [-1, 1]."""
    import torch
    mean = 2 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) - 1
    std = 2 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def assert_same_tree(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (_, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def tiny():
    return reference_state_dict(GROUP, "tiny", lambda: _torch_bisenet(**TINY), seed=0)


def test_tiny_parity_all_heads(tiny):
    params = convert_bisenet(tiny, TINY_CONFIG)
    x = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)

    def torch_values():
        import torch
        with torch.no_grad():
            return {f"head{i}": sketch(_nhwc(h)) for i, h in enumerate(_torch_bisenet(tiny, **TINY)(_nchw(x)))}

    apply = jax.jit(lambda p, x: BiSeNet(TINY_CONFIG).apply({"params": p}, x, return_aux=True))
    heads = apply(params, jnp.asarray(x))
    assert [h.shape for h in heads] == [(2, 64, 64, 19)] * 3
    expected = torch_reference(GROUP, "tiny", torch_values)
    for i, got in enumerate(heads):
        assert rel_err(sketch(got), expected[f"head{i}"]) < 1e-4


def test_real_widths_parity():
    state_dict = reference_state_dict(GROUP, "real", _torch_bisenet, seed=2)
    params = convert_bisenet(state_dict, BiSeNetConfig())
    x = np.random.default_rng(3).standard_normal((1, 64, 64, 3)).astype(np.float32)

    def torch_values():
        import torch
        with torch.no_grad():
            return sketch(_nhwc(_torch_bisenet(state_dict)(_nchw(x))[0]))

    got = jax.jit(lambda p, x: BiSeNet().apply({"params": p}, x))(params, jnp.asarray(x))
    assert got.shape == (1, 64, 64, 19)
    assert rel_err(sketch(got), torch_reference(GROUP, "real", torch_values)) < 1e-4


def test_preprocessed_energy_gradient_matches_torch(tiny):
    """FreeDoM's use: d/dx0 of a linear functional of logits(preprocess(x0)), through the network.
    At 48x48 the stride-32 map (2x2) is upsampled to 3x3, PyTorch's non-2x nearest case."""
    params = convert_bisenet(tiny, TINY_CONFIG)
    rng = np.random.default_rng(4)
    x0 = rng.uniform(-1, 1, (1, 24, 24, 3)).astype(np.float32)
    weights = rng.normal(size=(1, 48, 48, 19)).astype(np.float32)

    def energy(x):
        return jnp.sum(weights * BiSeNet(TINY_CONFIG).apply({"params": params}, bisenet_preprocess(x, size=48)))

    def torch_values():
        import torch
        xt = _nchw(x0).requires_grad_(True)
        logits = _torch_bisenet(tiny, **TINY)(_torch_normalize(torch.nn.functional.interpolate(
            xt, size=48, mode="bicubic")))[0]
        value = torch.sum(_nchw(weights) * logits)
        value.backward()
        return dict(value=value.detach().numpy(), gradient=_nhwc(xt.grad))

    value, grad = jax.jit(jax.value_and_grad(energy))(jnp.asarray(x0))
    ref = torch_reference(GROUP, "gradient", torch_values)
    assert abs(float(value) - float(ref["value"])) / abs(float(ref["value"])) < 1e-4
    assert rel_err(grad, ref["gradient"]) < 1e-4


def test_preprocess_matches_torch():
    """bicubic (align_corners=False, A=-0.75) to 512 and ImageNet mean/std adapted to [-1, 1]."""
    x0 = np.random.default_rng(5).uniform(-1, 1, (2, 64, 48, 3)).astype(np.float32)

    def torch_values():
        import torch
        return sketch(_nhwc(_torch_normalize(torch.nn.functional.interpolate(_nchw(x0), size=512, mode="bicubic"))))

    got = bisenet_preprocess(jnp.asarray(x0))
    assert got.shape == (2, 512, 512, 3)
    assert rel_err(sketch(got), torch_reference(GROUP, "preprocess", torch_values)) < 1e-5
    unbatched = bisenet_preprocess(jnp.asarray(x0[0]), size=512)
    np.testing.assert_allclose(np.asarray(unbatched), np.asarray(got[0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size_in,size_out", [((3, 5), (64, 70)), ((8, 8), (8, 8)), ((10, 9), (4, 6)),
                                              ((6, 7), (1, 3)), ((16, 16), (128, 128))])
def test_bilinear_align_corners_matches_torch(size_in, size_out):
    x = np.random.default_rng(6).normal(size=(2, *size_in, 4)).astype(np.float32)

    def torch_values():
        import torch
        return sketch(_nhwc(torch.nn.functional.interpolate(_nchw(x), size_out, mode="bilinear", align_corners=True)))

    got = resize_bilinear_align_corners(jnp.asarray(x), size_out)
    assert got.shape == (2, *size_out, 4)
    expected = torch_reference(GROUP, f"bilinear/{size_in}->{size_out}", torch_values)
    np.testing.assert_allclose(sketch(got), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size_in,size_out", [((1, 1), (3, 5)), ((3, 3), (5, 5)), ((4, 5), (8, 10)),
                                              ((7, 3), (9, 11)), ((6, 6), (4, 3))])
def test_nearest_matches_torch(size_in, size_out):
    x = np.random.default_rng(7).normal(size=(1, *size_in, 2)).astype(np.float32)

    def torch_values():
        import torch
        return _nhwc(torch.nn.functional.interpolate(_nchw(x), size_out, mode="nearest"))

    got = resize_nearest_torch(jnp.asarray(x), size_out)
    np.testing.assert_array_equal(np.asarray(got), torch_reference(GROUP, f"nearest/{size_in}->{size_out}",
                                                                   torch_values))


def test_round_trip_pth_and_safetensors(tmp_path):
    config, pth = PORT_FILE_CONFIGS["bisenet"], CHECKPOINTS / "bisenet.pth"
    direct = convert_bisenet(file_state_dict(GROUP, "bisenet"), config)
    module, from_pth = load_bisenet(pth, config)
    assert module.config == config
    assert_same_tree(from_pth, direct)
    # DataParallel checkpoints carry a "module." prefix.
    assert_same_tree(load_bisenet(CHECKPOINTS / "bisenet_dataparallel.pth", config)[1], direct)
    st = tmp_path / "bisenet.safetensors"
    save_params(st, from_pth)
    assert_same_tree(load_bisenet(st, config)[1], direct)
    # A file written by convert_file records its config: no config needed to load it.
    converted = tmp_path / "converted.safetensors"
    convert_file(BISENET, pth, converted, config)
    module, from_converted = load_bisenet(converted)
    assert module.config == config
    assert_same_tree(from_converted, direct)
    assert set(direct) == {"cp", "ffm", "conv_out", "conv_out16", "conv_out32"}


def test_missing_file(tmp_path):
    for name in ("79999_iter.pth", "bisenet.safetensors"):
        with pytest.raises(FileNotFoundError, match="(?s)BiSeNet.*face-parsing.PyTorch"):
            load_bisenet(tmp_path / name)


def test_wrong_architecture_is_named(tiny, tmp_path):
    deeper = reference_state_dict(GROUP, "deeper", lambda: _torch_bisenet(blocks=(2, 3, 2, 2), **TINY), seed=0)
    with pytest.raises(CheckpointMismatchError, match=r"cp\.resnet\.layer2\.2\.conv1\.weight"):
        convert_bisenet(deeper, TINY_CONFIG)
    with pytest.raises(CheckpointMismatchError, match=r"missing[^\n]*cp\.resnet\.layer2\.3\.conv1\.weight"):
        convert_bisenet(deeper, dataclasses.replace(TINY_CONFIG, resnet_blocks=(2, 4, 2, 2)))
    # Same keys, other widths: the published widths reject the small checkpoint, naming the shapes.
    published_widths = dataclasses.replace(BiSeNetConfig(), resnet_blocks=PORT_FILE_CONFIGS["bisenet"].resnet_blocks)
    with pytest.raises(CheckpointMismatchError, match=r"cp/resnet/conv1/kernel"):
        load_bisenet(CHECKPOINTS / "bisenet.pth", published_widths)
    st = tmp_path / "tiny.safetensors"
    save_params(st, convert_bisenet(tiny, TINY_CONFIG))
    with pytest.raises(CheckpointMismatchError, match=r"conv_out/conv_out/kernel"):
        load_bisenet(st, dataclasses.replace(TINY_CONFIG, n_classes=11))
