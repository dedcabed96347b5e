"""Rollout videos: the static camera enlarged, the agent's goal beside it (labelled with the stage that made it),
the filter's candidate subgoals with their scores below (the chosen one framed), and a caption band above (chain and
step, instruction, the agent's status and a compact form of its reasoning).

Text is laid out word by word in measured pixels with a fixed minimum gap: Pillow's default font (FreeType since
Pillow 10.1) has a space about 2 px wide, which video compression erases ("toopen", "step6"); and lines are wrapped
and cut by measured width, not by a guessed number of characters. No font files are needed.

Usage::

    video = RolloutVideo("chain_0000.mp4", fps=30)
    video.add(rgb, ["chain 0  subtask 1/5  step 6  open_drawer", "open the drawer"],
              AgentDescription(status="step 6, 2 queued", reasoning=reasoning, subgoal=subgoal))
    video.close()
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LINE_PX = 14  # caption line height
FONT_PX = 11
WORD_GAP_PX = 4  # the least gap drawn between two words (a space in the text)
PAD_PX = 4
BAND = (20, 20, 20)
TEXT = (240, 240, 240)
DIM = (150, 150, 150)
CHOSEN = (90, 220, 110)


@functools.lru_cache(maxsize=None)
def _font(size: int = FONT_PX) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed 6-px bitmap font
        return ImageFont.load_default()


def _gap(font) -> float:
    return max(float(WORD_GAP_PX), font.getlength(" "))


def text_width(text: str, font=None) -> float:
    """Width in px of ``text`` as ``draw_text`` lays it out (every space a gap of at least WORD_GAP_PX)."""
    font = font or _font()
    words = text.split(" ")
    return sum(font.getlength(w) for w in words) + _gap(font) * (len(words) - 1)


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill=TEXT, font=None) -> None:
    """Draw ``text`` word by word from ``xy``; each space (two spaces: two gaps) is at least WORD_GAP_PX wide."""
    font = font or _font()
    x, y = xy
    gap = _gap(font)
    for word in text.split(" "):
        if word:
            draw.text((x, y), word, fill=fill, font=font)
        x += font.getlength(word) + gap


def fit_text(text: str, width_px: float, font=None) -> str:
    """``text`` cut at the end (with "...") so that it fits ``width_px``."""
    font = font or _font()
    if text_width(text, font) <= width_px:
        return text
    while text and text_width(text + "...", font) > width_px:
        text = text[:-1]
    return text.rstrip() + "..."


def wrap_text(text: str, width_px: float, max_lines: int, font=None) -> list[str]:
    """``text`` broken between words into at most ``max_lines`` lines that fit ``width_px`` (a word too long for
    a line is cut); text past the last line is dropped and that line ends in "..."."""
    font = font or _font()
    lines: list[str] = []
    for word in text.split():
        while text_width(word, font) > width_px and len(word) > 1:  # cut an over-long word where it stops fitting
            n = max(k for k in range(1, len(word) + 1) if text_width(word[:k], font) <= width_px or k == 1)
            lines.append(word[:n])
            word = word[n:]
        if lines and text_width(f"{lines[-1]} {word}", font) <= width_px:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [fit_text(" ".join(lines[max_lines - 1:]) + " ...", width_px, font)]
    return lines


def compact_reasoning(reasoning) -> str:
    """One line from a ``Reasoning``: ``"SUBTASK: ... | MOVE: ..."`` (the task when there is no subtask yet);
    free text is shown as it is."""
    if reasoning is None:
        return ""
    if isinstance(reasoning, str):
        return reasoning
    parts = [("SUBTASK", reasoning.subtask) if reasoning.subtask else ("TASK", reasoning.task),
             ("MOVE", reasoning.move)]
    return " | ".join(f"{tag}: {value}" for tag, value in parts if value)


N_INSTRUCTION_LINES = 2
N_REASONING_LINES = 2
N_CAPTION_LINES = 1 + N_INSTRUCTION_LINES + 1 + N_REASONING_LINES


def caption_lines(lines: list[str], description, width_px: float) -> list[str]:
    """The caption band's N_CAPTION_LINES lines: the header (``lines[0]``: chain, subtask, step, task), the
    instruction (``lines[1:]``, wrapped), the agent's status and its reasoning (compact, wrapped); blank where a
    part is missing, so every frame has the same layout."""
    font = _font()
    header, *rest = list(lines) or [""]

    def block(text: str, n: int) -> list[str]:
        wrapped = wrap_text(text, width_px, n, font)
        return wrapped + [""] * (n - len(wrapped))

    status = getattr(description, "status", None) or ""
    reasoning = compact_reasoning(getattr(description, "reasoning", None))
    return ([fit_text(header, width_px, font)] + block(" ".join(rest), N_INSTRUCTION_LINES)
            + [fit_text(status, width_px, font)] + block(reasoning, N_REASONING_LINES))


def caption_frame(rgb: np.ndarray, lines: list[str], scale: int = 2) -> np.ndarray:
    """(H, W, 3) uint8 -> (len(lines) * 14 + 4 + H * scale, W * scale, 3) uint8 (even sizes) with the lines
    drawn on a dark band above the enlarged image (lines wider than the image are cut)."""
    img = Image.fromarray(np.asarray(rgb, dtype=np.uint8)).resize((rgb.shape[1] * scale, rgb.shape[0] * scale),
                                                                  Image.NEAREST)
    band = LINE_PX * len(lines) + PAD_PX
    canvas = Image.new("RGB", (img.width, img.height + band), BAND)
    canvas.paste(img, (0, band))
    _draw_lines(ImageDraw.Draw(canvas), lines, img.width - 2 * PAD_PX)
    return _even(np.asarray(canvas))


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], width_px: float) -> None:
    for i, line in enumerate(lines):
        draw_text(draw, (PAD_PX, 2 + i * LINE_PX), fit_text(line, width_px))


def _even(arr: np.ndarray) -> np.ndarray:
    """Even sizes keep video encoders (yuv420p) happy."""
    return arr[: arr.shape[0] // 2 * 2, : arr.shape[1] // 2 * 2]


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fill=TEXT) -> None:
    """A short label on a dark box, over an image."""
    x, y = xy
    draw.rectangle((x, y, x + text_width(text) + 2 * PAD_PX, y + LINE_PX + 1), fill=(0, 0, 0))
    draw_text(draw, (x + PAD_PX, y + 1), text, fill=fill)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:  # float images in [0, 1]
        image = (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return image[..., :3]


class RolloutVideo:
    """Streams captioned rollout frames to an mp4 (never held in memory).

    Layout, fixed by the first frame: caption band; the static camera, and beside it the goal panel (labelled
    ``goal: <Subgoal.source>``; blank until a goal exists) when the first description has a subgoal; below them a
    strip of the filter's candidates (thumbnails with their scores, the chosen one framed in green) when the first
    subgoal has candidates.

        video = RolloutVideo("chain_0000.mp4", fps=30)
        video.add(rgb, ["chain 0  subtask 1/5  step 0  open_drawer", "open the drawer"], AgentDescription(...))
        video.close()
    """

    def __init__(self, path, fps: int = 30, scale: int = 2) -> None:
        import imageio.v2 as imageio

        self.path, self.scale = path, int(scale)
        self._writer = imageio.get_writer(str(path), fps=int(fps), macro_block_size=1)
        self._with_subgoal: bool | None = None
        self._strip_h = 0
        self.n_frames = 0

    def add(self, rgb: np.ndarray, lines: list[str], description) -> None:
        self._writer.append_data(self.frame(rgb, lines, description))
        self.n_frames += 1

    def frame(self, rgb: np.ndarray, lines: list[str], description) -> np.ndarray:
        """The frame ``add`` writes, as an (H, W, 3) uint8 array."""
        subgoal = getattr(description, "subgoal", None)
        camera = _as_uint8(rgb)
        h, w = camera.shape[0] * self.scale, camera.shape[1] * self.scale
        if self._with_subgoal is None:  # the first frame fixes the layout
            self._with_subgoal = subgoal is not None
            n = 0 if subgoal is None or subgoal.candidates is None else len(subgoal.candidates)
            if n:
                width = w * (2 if self._with_subgoal else 1)
                self._strip_h = min((width - PAD_PX) // n - 6, h // 2) + LINE_PX + 12
        width = w * (2 if self._with_subgoal else 1)
        band = LINE_PX * N_CAPTION_LINES + PAD_PX
        canvas = Image.new("RGB", (width, band + h + self._strip_h), BAND)
        draw = ImageDraw.Draw(canvas)
        _draw_lines(draw, caption_lines(lines, description, width - 2 * PAD_PX), width - 2 * PAD_PX)
        canvas.paste(Image.fromarray(camera).resize((w, h), Image.NEAREST), (0, band))
        if self._with_subgoal:
            _label(draw, (0, band), "camera")
            if subgoal is None:
                _label(draw, (w, band), "goal: none yet", fill=DIM)
            else:
                goal = Image.fromarray(_as_uint8(subgoal.image)).resize((w, h), Image.NEAREST)
                canvas.paste(goal, (w, band))
                _label(draw, (w, band), f"goal: {subgoal.source}" if subgoal.source else "goal")
        if self._strip_h:
            self._draw_candidates(canvas, draw, subgoal, band + h)
        return _even(np.asarray(canvas))

    def _draw_candidates(self, canvas: Image.Image, draw: ImageDraw.ImageDraw, subgoal, y0: int) -> None:
        """Thumbnails of ``subgoal.candidates`` (the last frame of clip candidates) with ``index: score``, the
        chosen one framed and marked; sized to fit the strip whatever the number of candidates."""
        if subgoal is None or subgoal.candidates is None:
            draw_text(draw, (PAD_PX, y0 + PAD_PX), "no candidates", fill=DIM)
            return
        candidates = subgoal.candidates if subgoal.candidates.ndim == 4 else subgoal.candidates[:, -1]
        k, (ch, cw) = len(candidates), candidates.shape[1:3]
        room_h = self._strip_h - LINE_PX - 12
        tw = max(min((canvas.width - PAD_PX) // k - 6, int(room_h * cw / ch)), 4)
        th = max(int(tw * ch / cw), 4)
        x = PAD_PX
        for i, candidate in enumerate(candidates):
            chosen = i == subgoal.chosen
            if chosen:
                draw.rectangle((x - 3, y0 + 1, x + tw + 2, y0 + th + 6), outline=CHOSEN, width=3)
            canvas.paste(Image.fromarray(_as_uint8(candidate)).resize((tw, th), Image.NEAREST), (x, y0 + 4))
            label = f"{i}: {float(subgoal.scores[i]):.2f}" if subgoal.scores is not None else f"{i}"
            label = fit_text(label + (" chosen" if chosen else ""), tw + 4)
            draw_text(draw, (x, y0 + th + 7), label, fill=CHOSEN if chosen else TEXT)
            x += tw + 6

    def close(self) -> None:
        self._writer.close()
