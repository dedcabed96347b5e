"""Frames for rollout videos: the camera image enlarged, with caption lines drawn above it (Pillow's default font,
so no font files are needed)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

LINE_PX = 14


def caption_frame(rgb: np.ndarray, lines: list[str], scale: int = 2) -> np.ndarray:
    """(H, W, 3) uint8 -> (len(lines) * 14 + H * scale, W * scale, 3) uint8 with the caption on a dark band."""
    img = Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
    band = LINE_PX * len(lines) + 4
    canvas = Image.new("RGB", (img.width, img.height + band), (20, 20, 20))
    canvas.paste(img, (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * LINE_PX), line[: img.width // 6], fill=(240, 240, 240))
    # Even sizes keep video encoders (yuv420p) happy.
    arr = np.asarray(canvas)
    return arr[: arr.shape[0] // 2 * 2, : arr.shape[1] // 2 * 2]
