"""Writing task outputs: images in ``[-1, 1]`` as PNGs and labelled image grids."""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import numpy as np

from zmagic_jax import figures


def to_uint8(image) -> np.ndarray:
    """An image in ``[-1, 1]`` (``(H, W, C)``; ``C`` = 1 or 3) as 8-bit pixels (values clipped)."""
    return np.round((np.clip(np.asarray(image, np.float64), -1, 1) + 1) * 127.5).astype(np.uint8)


def _displayable(image) -> np.ndarray:
    pixels = to_uint8(image)
    return pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels


def save_png(path, image) -> None:
    """Write one ``[-1, 1]`` image as a PNG (grey for one channel)."""
    from PIL import Image
    Image.fromarray(_displayable(image)).save(path)


# The aspect ratio may differ this much from the target's before the image is cropped (and a
# warning says so); an image is "small" when it is upsampled by more than this factor.
ASPECT_TOLERANCE = 0.01
MAX_UPSAMPLE = 2.0


def _as_rgb8(image):
    """An RGB 8-bit PIL image from any mode; 16/32-bit integer greyscale (PNG's 16-bit) is scaled
    by its full range (65535 -> 255), not clipped at 255 as ``convert("RGB")`` does."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, np.float64)
        full = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(np.round(values / full * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, np.float64)
        grey = np.clip(np.round(values * 255.0 if values.max() <= 1.0 else values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def load_image(path, size: Sequence[int], what: str = "image") -> np.ndarray:
    """Read an image as a ``(H, W, 3)`` float32 array in ``[-1, 1]``, ``size = (H, W)``.

    Any PIL mode is accepted: RGB(A), palette, greyscale, and 16-bit greyscale PNGs (scaled by
    65535, not clipped). An image of another aspect ratio than ``size`` (beyond 1 %) is
    centre-cropped to it first; then PIL bilinear resize (FreeDoM's reference preprocessing, which
    resizes the whole square image). Cropping, and upsampling by more than 2x, warn. Raises
    ``FileNotFoundError`` / ``ValueError`` naming ``what`` and the file."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    height, width = int(size[0]), int(size[1])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist; give the path of a PNG or JPEG file.")
    try:
        with Image.open(path) as image:
            image.load()
            image = _as_rgb8(image)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{what} {path!r} could not be read as an image ({err}); "
                         "give a PNG or JPEG file.") from err
    w, h = image.size
    target = width / height
    if abs(w / h - target) > ASPECT_TOLERANCE * target:
        crop_w, crop_h = (round(h * target), h) if w / h > target else (w, round(w / target))
        left, top = (w - crop_w) // 2, (h - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
        warnings.warn(f"{what} {path!r} is {w}x{h} (width x height), not of the {width}x{height} aspect ratio: "
                      f"using its centre {crop_w}x{crop_h}.", UserWarning, stacklevel=2)
    if max(width / image.size[0], height / image.size[1]) > MAX_UPSAMPLE:
        warnings.warn(f"{what} {path!r} is {image.size[0]}x{image.size[1]}, upsampled to {width}x{height}; "
                      "a larger image keeps more detail.", UserWarning, stacklevel=2)
    image = image.resize((width, height), Image.BILINEAR)
    return (np.asarray(image, np.float32) / 127.5 - 1.0).astype(np.float32)


def save_image_grid(path, rows: Sequence[tuple], column_titles: Optional[Sequence[str]] = None,
                    title: Optional[str] = None, cell: float = 1.9) -> None:
    """A grid of ``[-1, 1]`` images: ``rows = [(label, [image or None, ...]), ...]`` (``None`` leaves
    a cell empty), one row per label, optional column titles and a figure title."""
    plt = figures.plt
    width = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(cell * width, cell * len(rows) + 0.3), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(width):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            image = images[c] if c < len(images) else None
            if image is None:
                ax.axis("off")
                continue
            pixels = _displayable(image)
            ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
            if r == 0 and column_titles is not None and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
