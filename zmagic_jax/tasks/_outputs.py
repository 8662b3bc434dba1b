"""Writing task outputs: images in ``[-1, 1]`` as PNGs and labelled image grids."""
from __future__ import annotations

import os
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


def load_image(path, size: Sequence[int], what: str = "image") -> np.ndarray:
    """Read an RGB image as a ``(H, W, 3)`` float32 array in ``[-1, 1]``, ``size = (H, W)`` (PIL
    bilinear resize, FreeDoM's reference preprocessing). Raises ``FileNotFoundError`` /
    ``ValueError`` naming ``what`` and the file."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist; give the path of a PNG or JPEG file.")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((int(size[1]), int(size[0])), Image.BILINEAR)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{what} {path!r} could not be read as an image ({err}); "
                         "give a PNG or JPEG file.") from err
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
