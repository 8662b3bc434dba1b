"""Image preprocessing against PyTorch (the networks' own preprocessing).

The PyTorch values are computed live where PyTorch is installed and read from
``tests/references/energies_image.safetensors`` elsewhere (``tests/references.py``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.parity import sketch
from tests.references import torch_reference
from zmagic_jax.energies import (CLIP_MEAN, CLIP_STD, gram_matrix, normalize_signed, resize_bicubic)

GROUP = "energies_image"


def _torch_bicubic(image, size):
    """``F.interpolate(mode='bicubic', align_corners=False)`` of an HWC image (a torch tensor)."""
    import torch
    return torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=size, mode="bicubic",
                                           align_corners=False)[0].permute(1, 2, 0)


@pytest.mark.parametrize("shape,size", [((16, 16, 3), (32, 32)), ((32, 24, 3), (17, 29)),
                                        ((64, 64, 2), (56, 56)), ((7, 5, 1), (7, 5)), ((9, 9, 3), (2, 40))])
def test_bicubic_resize_matches_torch(x64, shape, size):
    image = np.random.default_rng(0).uniform(-1, 1, shape)

    def torch_values():
        import torch
        return sketch(_torch_bicubic(torch.from_numpy(image), size).numpy())

    out = jax.jit(lambda x: resize_bicubic(x, size))(jnp.asarray(image))
    assert out.shape == size + shape[-1:]
    np.testing.assert_allclose(sketch(out), torch_reference(GROUP, f"bicubic/{shape}->{size}", torch_values),
                               rtol=1e-10, atol=1e-12)


def test_bicubic_resize_gradient_is_the_transpose(x64):
    image = jnp.asarray(np.random.default_rng(1).normal(size=(12, 10, 3)))
    cot = jnp.asarray(np.random.default_rng(2).normal(size=(20, 7, 3)))

    def torch_gradient():
        import torch
        ref = torch.from_numpy(np.array(image)).requires_grad_()
        (_torch_bicubic(ref, (20, 7)) * torch.from_numpy(np.array(cot))).sum().backward()
        return ref.grad.numpy()

    grad = jax.grad(lambda x: jnp.sum(resize_bicubic(x, (20, 7)) * cot))(image)
    np.testing.assert_allclose(grad, torch_reference(GROUP, "bicubic_gradient", torch_gradient),
                               rtol=1e-10, atol=1e-12)


def test_signed_normalisation_equals_torch_normalize_on_unit_range():
    image = np.random.default_rng(3).uniform(-1, 1, (4, 4, 3)).astype(np.float32)

    def torch_values():
        import torch
        unit = torch.from_numpy((image + 1) / 2).permute(2, 0, 1)
        mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
        return ((unit - mean) / std).permute(1, 2, 0).numpy()

    np.testing.assert_allclose(normalize_signed(image, CLIP_MEAN, CLIP_STD),
                               torch_reference(GROUP, "normalize", torch_values), rtol=1e-5, atol=1e-5)


def test_gram_matrix_and_errors():
    f = np.random.default_rng(4).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_allclose(gram_matrix(f), f.T @ f, rtol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        gram_matrix(f[None])
    with pytest.raises(ValueError, match="one value per channel"):
        normalize_signed(f[None], CLIP_MEAN[:2], CLIP_STD[:2])
    with pytest.raises(ValueError, match="H, W, C"):
        resize_bicubic(f, (2, 2))
