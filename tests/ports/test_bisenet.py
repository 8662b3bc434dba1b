"""BiSeNet face parser: Flax port vs a PyTorch reference with the published checkpoint's key names."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from ports.torch_bisenet import BiSeNet as TorchBiSeNet  # noqa: E402

from zmagic_jax.energies._image import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from zmagic_jax.models._bisenet import (  # noqa: E402
    BiSeNet,
    BiSeNetConfig,
    bisenet_preprocess,
    resize_bilinear_align_corners,
    resize_nearest_torch,
)
from zmagic_jax.ports._bisenet import BISENET, convert_bisenet, load_bisenet  # noqa: E402
from zmagic_jax.ports._checkpoint import CheckpointMismatchError, convert_file, save_params  # noqa: E402

TINY = dict(widths=(8, 16, 32, 64), ctx=16, fuse=32, aux_mid=8)
TINY_CONFIG = BiSeNetConfig(resnet_widths=(8, 16, 32, 64), context_channels=16, fuse_channels=32, aux_mid_channels=8)


def random_torch_bisenet(seed=0, **kwargs):
    """Random weights and random BatchNorm statistics / affine parameters, eval mode."""
    torch.manual_seed(seed)
    net = TorchBiSeNet(**kwargs)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
                m.running_mean.copy_(0.2 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    return net.eval()


def numpy_state_dict(net):
    return {k: v.detach().numpy() for k, v in net.state_dict().items()}


def nchw_to_nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def assert_same_tree(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (_, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def tiny_torch():
    return random_torch_bisenet(**TINY)


def test_tiny_parity_all_heads(tiny_torch):
    params = convert_bisenet(numpy_state_dict(tiny_torch), TINY_CONFIG)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_torch(x)
    apply = jax.jit(lambda p, x: BiSeNet(TINY_CONFIG).apply({"params": p}, x, return_aux=True))
    heads = apply(params, jnp.asarray(nchw_to_nhwc(x)))
    assert [h.shape for h in heads] == [(2, 64, 64, 19)] * 3
    for got, want in zip(heads, expected):
        assert rel_err(got, nchw_to_nhwc(want)) < 1e-4


def test_real_widths_parity():
    net = random_torch_bisenet(seed=2)
    params = convert_bisenet(numpy_state_dict(net), BiSeNetConfig())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(x)[0]
    got = jax.jit(lambda p, x: BiSeNet().apply({"params": p}, x))(params, jnp.asarray(nchw_to_nhwc(x)))
    assert rel_err(got, nchw_to_nhwc(expected)) < 1e-4


def test_preprocessed_energy_gradient_matches_torch(tiny_torch):
    """FreeDoM's use: d/dx0 of a linear functional of logits(preprocess(x0)), through the network.
    At 48x48 the stride-32 map (2x2) is upsampled to 3x3, PyTorch's non-2x nearest case."""
    params = convert_bisenet(numpy_state_dict(tiny_torch), TINY_CONFIG)
    rng = np.random.default_rng(4)
    x0 = rng.uniform(-1, 1, (1, 24, 24, 3)).astype(np.float32)
    weights = rng.normal(size=(1, 48, 48, 19)).astype(np.float32)

    def energy(x):
        return jnp.sum(weights * BiSeNet(TINY_CONFIG).apply({"params": params}, bisenet_preprocess(x, size=48)))

    value, grad = jax.jit(jax.value_and_grad(energy))(jnp.asarray(x0))

    xt = torch.tensor(x0.transpose(0, 3, 1, 2), requires_grad=True)
    mean = 2 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) - 1
    std = 2 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    logits = tiny_torch((F.interpolate(xt, size=48, mode="bicubic") - mean) / std)[0]
    value_t = torch.sum(torch.tensor(weights.transpose(0, 3, 1, 2)) * logits)
    value_t.backward()
    assert abs(float(value) - value_t.item()) / abs(value_t.item()) < 1e-4
    assert rel_err(grad, nchw_to_nhwc(xt.grad)) < 1e-4


def test_preprocess_matches_torch():
    """bicubic (align_corners=False, A=-0.75) to 512 and ImageNet mean/std adapted to [-1, 1]."""
    x0 = np.random.default_rng(5).uniform(-1, 1, (2, 64, 48, 3)).astype(np.float32)
    got = bisenet_preprocess(jnp.asarray(x0))
    mean = 2 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) - 1
    std = 2 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    want = (F.interpolate(torch.tensor(x0.transpose(0, 3, 1, 2)), size=512, mode="bicubic") - mean) / std
    assert got.shape == (2, 512, 512, 3)
    assert rel_err(got, nchw_to_nhwc(want)) < 1e-5
    unbatched = bisenet_preprocess(jnp.asarray(x0[0]), size=512)
    np.testing.assert_allclose(np.asarray(unbatched), np.asarray(got[0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size_in,size_out", [((3, 5), (64, 70)), ((8, 8), (8, 8)), ((10, 9), (4, 6)),
                                              ((6, 7), (1, 3)), ((16, 16), (128, 128))])
def test_bilinear_align_corners_matches_torch(size_in, size_out):
    x = np.random.default_rng(6).normal(size=(2, *size_in, 4)).astype(np.float32)
    got = resize_bilinear_align_corners(jnp.asarray(x), size_out)
    want = F.interpolate(torch.tensor(x.transpose(0, 3, 1, 2)), size_out, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(np.asarray(got), nchw_to_nhwc(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size_in,size_out", [((1, 1), (3, 5)), ((3, 3), (5, 5)), ((4, 5), (8, 10)),
                                              ((7, 3), (9, 11)), ((6, 6), (4, 3))])
def test_nearest_matches_torch(size_in, size_out):
    x = np.random.default_rng(7).normal(size=(1, *size_in, 2)).astype(np.float32)
    got = resize_nearest_torch(jnp.asarray(x), size_out)
    want = F.interpolate(torch.tensor(x.transpose(0, 3, 1, 2)), size_out, mode="nearest")
    np.testing.assert_array_equal(np.asarray(got), nchw_to_nhwc(want))


def test_round_trip_pth_and_safetensors(tiny_torch, tmp_path):
    direct = convert_bisenet(numpy_state_dict(tiny_torch), TINY_CONFIG)
    pth = tmp_path / "79999_iter.pth"
    torch.save(tiny_torch.state_dict(), pth)
    module, from_pth = load_bisenet(pth, TINY_CONFIG)
    assert module.config == TINY_CONFIG
    assert_same_tree(from_pth, direct)
    # DataParallel checkpoints carry a "module." prefix.
    torch.save({f"module.{k}": v for k, v in tiny_torch.state_dict().items()}, tmp_path / "dp.pth")
    assert_same_tree(load_bisenet(tmp_path / "dp.pth", TINY_CONFIG)[1], direct)
    st = tmp_path / "bisenet.safetensors"
    save_params(st, from_pth)
    assert_same_tree(load_bisenet(st, TINY_CONFIG)[1], direct)
    # A file written by convert_file records its config: no config needed to load it.
    converted = tmp_path / "converted.safetensors"
    convert_file(BISENET, pth, converted, TINY_CONFIG)
    module, from_converted = load_bisenet(converted)
    assert module.config == TINY_CONFIG
    assert_same_tree(from_converted, direct)
    assert set(direct) == {"cp", "ffm", "conv_out", "conv_out16", "conv_out32"}


def test_missing_file(tmp_path):
    for name in ("79999_iter.pth", "bisenet.safetensors"):
        with pytest.raises(FileNotFoundError, match="(?s)BiSeNet.*face-parsing.PyTorch"):
            load_bisenet(tmp_path / name)


def test_wrong_architecture_is_named(tiny_torch, tmp_path):
    deeper = random_torch_bisenet(blocks=(2, 3, 2, 2), **TINY)
    with pytest.raises(CheckpointMismatchError, match=r"cp\.resnet\.layer2\.2\.conv1\.weight"):
        convert_bisenet(numpy_state_dict(deeper), TINY_CONFIG)
    with pytest.raises(CheckpointMismatchError, match=r"missing[^\n]*cp\.resnet\.layer2\.3\.conv1\.weight"):
        convert_bisenet(numpy_state_dict(deeper), dataclasses.replace(TINY_CONFIG, resnet_blocks=(2, 4, 2, 2)))
    # Same keys, other widths: the published (full width) config rejects the tiny checkpoint.
    pth = tmp_path / "tiny.pth"
    torch.save(tiny_torch.state_dict(), pth)
    with pytest.raises(CheckpointMismatchError, match=r"cp/resnet/conv1/kernel"):
        load_bisenet(pth)
    st = tmp_path / "tiny.safetensors"
    save_params(st, convert_bisenet(numpy_state_dict(tiny_torch), TINY_CONFIG))
    with pytest.raises(CheckpointMismatchError, match=r"conv_out/conv_out/kernel"):
        load_bisenet(st, dataclasses.replace(TINY_CONFIG, n_classes=11))
