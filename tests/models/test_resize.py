"""PyTorch-exact resampling (``zmagic_jax.models._resize``) against ``torch.nn.functional``.

The PyTorch values (sketches of the images, ``tests/parity.py``) are computed live where PyTorch is
installed and read from ``tests/references/models_resize.safetensors`` elsewhere
(``tests/references.py``)."""
import jax
import numpy as np
import pytest

from tests.parity import sketch
from tests.references import torch_reference
from zmagic_jax.models._resize import adaptive_avg_pool_torch, resize_bicubic_torch

GROUP = "models_resize"


def _images(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(dtype)


def _nchw(x):
    import torch
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("in_hw, out_hw", [((20, 13), (37, 29)),     # upsampling, non-integer factors
                                            ((64, 50), (23, 112)),    # downsampling one axis, upsampling the other
                                            ((96, 96), (32, 32)),     # integer factor (torch does not antialias)
                                            ((17, 9), (17, 9))])      # same size: identity
def test_bicubic_matches_torch(in_hw, out_hw, x64):
    """Exact in float64. (In float32 PyTorch's own source coordinates and weights are rounded, which
    moves its output by up to ~2e-5 from the exact resize.)"""
    x = _images((2,) + in_hw + (3,), dtype=np.float64)

    def torch_values():
        import torch
        return sketch(_nhwc(torch.nn.functional.interpolate(_nchw(x), size=out_hw, mode="bicubic",
                                                            align_corners=False)))

    ours = np.asarray(resize_bicubic_torch(x, out_hw))
    assert ours.dtype == np.float64 and ours.shape == (2, *out_hw, 3)
    np.testing.assert_allclose(sketch(ours), torch_reference(GROUP, f"bicubic/{in_hw}->{out_hw}", torch_values),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("in_hw, out_hw", [((188, 188), (112, 112)),  # ArcFace's crop: overlapping bins
                                            ((300, 270), (256, 256)),  # FreeDoM's pool to 256
                                            ((100, 64), (256, 256)),   # upsampling: repeated one-pixel bins
                                            ((7, 10), (3, 4)),
                                            ((12, 12), (12, 12))])
def test_adaptive_avg_pool_matches_torch(in_hw, out_hw, x64):
    x = _images((2,) + in_hw + (3,), seed=1, dtype=np.float64)

    def torch_values():
        import torch
        return sketch(_nhwc(torch.nn.functional.adaptive_avg_pool2d(_nchw(x), out_hw)))

    ours = np.asarray(adaptive_avg_pool_torch(x, out_hw))
    assert ours.dtype == np.float64 and ours.shape == (2, *out_hw, 3)
    np.testing.assert_allclose(sketch(ours), torch_reference(GROUP, f"pool/{in_hw}->{out_hw}", torch_values),
                               atol=1e-12, rtol=0)


def test_resampling_gradients_match_torch():
    """Both maps are linear, so their vector-Jacobian products are the transposed matrices; check them
    under ``jit`` against PyTorch autograd."""
    x = _images((1, 40, 30, 2), seed=2)
    v_bicubic, v_pool = _images((1, 23, 51, 2), seed=3), _images((1, 16, 11, 2), seed=4)

    def loss(img):
        return ((resize_bicubic_torch(img, (23, 51)) * v_bicubic).sum()
                + (adaptive_avg_pool_torch(img, (16, 11)) * v_pool).sum())

    def torch_gradient():
        import torch
        F = torch.nn.functional
        xt = _nchw(x).requires_grad_(True)
        ref_loss = (F.interpolate(xt, size=(23, 51), mode="bicubic", align_corners=False) * _nchw(v_bicubic)).sum() \
            + (F.adaptive_avg_pool2d(xt, (16, 11)) * _nchw(v_pool)).sum()
        ref_loss.backward()
        return _nhwc(xt.grad)

    ours = np.asarray(jax.jit(jax.grad(loss))(x))
    np.testing.assert_allclose(ours, torch_reference(GROUP, "gradient", torch_gradient), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn", [resize_bicubic_torch, adaptive_avg_pool_torch])
def test_rejects_bad_arguments(fn):
    with pytest.raises(ValueError, match="NHWC"):
        fn(np.zeros((8, 8, 3), np.float32), (4, 4))
    with pytest.raises(ValueError, match="out_hw"):
        fn(np.zeros((1, 8, 8, 3), np.float32), (0, 4))
