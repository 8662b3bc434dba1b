"""Image inputs: 16-bit PNGs keep their values, other aspect ratios are centre-cropped (with a warning)
and tiny images warn, instead of coming out white or stretched."""
import warnings

import numpy as np
import pytest
from PIL import Image

from zmagic_jax.tasks._outputs import load_image


def test_a_16_bit_greyscale_png_reads_like_its_8_bit_version(tmp_path):
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(np.round(ramp * 255).astype(np.uint8)).save(tmp_path / "g8.png")
    deep, flat = load_image(tmp_path / "g16.png", (32, 32)), load_image(tmp_path / "g8.png", (32, 32))
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    np.testing.assert_allclose(deep, flat, atol=1.01 / 127.5)  # at most one 8-bit level apart
    assert abs(float(deep.mean())) < 0.01  # a ramp: mid-grey on average, not white


def test_another_aspect_ratio_is_centre_cropped_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (20, 60, 3)).astype(np.uint8)  # height 20, width 60
    Image.fromarray(wide).save(tmp_path / "wide.png")
    with pytest.warns(UserWarning, match="60x20 .* using its centre 20x20"):
        image = load_image(tmp_path / "wide.png", (20, 20))
    np.testing.assert_allclose(image, wide[:, 20:40] / 127.5 - 1.0, atol=1e-6)
    with pytest.warns(UserWarning) as caught:
        load_image(tmp_path / "wide.png", (64, 64))
    assert ["centre" in str(w.message) for w in caught] == [True, False] and "upsampled" in str(caught[1].message)
    Image.fromarray(wide[:, :20]).save(tmp_path / "square.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # square and not upsampled much: silent
        load_image(tmp_path / "square.png", (32, 32))
