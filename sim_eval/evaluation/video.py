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


class RolloutVideo:
    """Streams captioned rollout frames to an mp4: the static camera, with the agent's subgoal image beside it
    when the agent gives one, and a fixed-height caption (status, instruction, reasoning; long text wrapped).

    Frames are written as they come (never held in memory). The layout is fixed by the first frame: if the first
    description has a subgoal, every frame gets a subgoal panel (blank until one exists).

        video = RolloutVideo("chain_0000.mp4", fps=30)
        video.add(rgb, ["chain 0 subtask 1/5", "open the drawer"], AgentDescription(reasoning="..."))
        video.close()
    """

    N_INSTRUCTION_LINES = 3
    N_REASONING_LINES = 3

    def __init__(self, path, fps: int = 30, scale: int = 2) -> None:
        import imageio.v2 as imageio

        self.path, self.scale = path, int(scale)
        self._writer = imageio.get_writer(str(path), fps=int(fps), macro_block_size=1)
        self._with_subgoal: bool | None = None
        self.n_frames = 0

    def add(self, rgb: np.ndarray, lines: list[str], description) -> None:
        import textwrap

        if self._with_subgoal is None:
            self._with_subgoal = description.subgoal is not None
        image = np.asarray(rgb, dtype=np.uint8)
        if self._with_subgoal:
            image = np.concatenate([image, _panel(description.subgoal, image.shape)], axis=1)
        width_chars = image.shape[1] * self.scale // 6
        status, *instruction = lines
        text = textwrap.wrap(" ".join(instruction), width_chars)[: self.N_INSTRUCTION_LINES]
        reasoning = textwrap.wrap(description.reasoning or "", width_chars)[: self.N_REASONING_LINES]
        caption = [status]
        caption += text + [""] * (self.N_INSTRUCTION_LINES - len(text))
        caption += reasoning + [""] * (self.N_REASONING_LINES - len(reasoning))
        self._writer.append_data(caption_frame(image, caption, scale=self.scale))
        self.n_frames += 1

    def close(self) -> None:
        self._writer.close()


def _panel(subgoal: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """The subgoal image resized (nearest) to the camera image's size; a dark blank when there is none."""
    h, w = shape[:2]
    if subgoal is None:
        return np.full((h, w, 3), 40, dtype=np.uint8)
    sub = np.asarray(subgoal)
    if sub.dtype != np.uint8:  # float images in [0, 1]
        sub = (np.clip(sub, 0.0, 1.0) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(sub[..., :3]).resize((w, h), Image.NEAREST))
