"""Real image files of every common Pillow mode, written with Pillow, for processor and decoding tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int = 60, height: int = 40) -> Image.Image:
    """A real photo (scikit-image's astronaut), cropped to a non-square size so resizing and cropping matter."""
    from skimage import data

    return Image.fromarray(data.astronaut()[100 : 100 + 4 * height : 4, 120 : 120 + 4 * width : 4])


def write_mode_files(folder: Path) -> dict[str, Path]:
    """One file per mode: the photo as RGB JPEG and PNG, and converted to L, LA, RGBA (half transparent), P (with a
    transparent colour), 1, CMYK, 16-bit grayscale (I;16), 32-bit int (I) and float (F) grayscale."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo()
    gray = np.asarray(rgb.convert("L"), dtype=np.float64) / 255.0  # (H, W) in [0, 1]
    rgba = rgb.convert("RGBA")
    rgba.putalpha(
        Image.fromarray(
            np.where(np.arange(rgb.width) < rgb.width // 2, 0, 255).astype(np.uint8)[None].repeat(rgb.height, 0)
        )
    )
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    images = {
        "rgb.jpg": rgb,
        "rgb.png": rgb,
        "gray.png": rgb.convert("L"),
        "gray_alpha.png": rgb.convert("LA"),
        "rgba.png": rgba,
        "palette.png": palette,
        "bilevel.png": rgb.convert("1"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "gray16.png": Image.fromarray(np.round(gray * 65535).astype(np.uint16)),
        "int32.tif": Image.fromarray(np.round(gray * 1_000_000).astype(np.int32)),
        "float.tif": Image.fromarray(gray.astype(np.float32)),
    }
    paths = {}
    for name, image in images.items():
        path = folder / name
        image.save(path, transparency=0) if name == "palette.png" else image.save(path)
        paths[name] = path
    return paths
