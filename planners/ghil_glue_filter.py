"""GHIL-Glue's subgoal filter (Hatch et al. 2025): a language-conditioned "progress" classifier over (current frame,
candidate subgoal, instruction), and ``FirstCandidate``, the no-filter ablation.

The classifier f(s, g, l) is one logit: does going from the current frame s to the candidate g make progress on
instruction l? As in the paper (shared/reference/ghil_glue_susie.md, section 1), s and g go through two separate
GroupNorm ResNets (late fusion) with FiLM on the frozen sentence embedding after every residual block
(x * (1 + gamma(l)) + beta(l), zero-initialised, so the encoders start unconditioned), the two pooled features are
concatenated and an MLP (LayerNorm, swish, dropout) maps them to the logit. Differences from the paper, for a model
that trains on two CPU cores: ghil's ``ResNetGN`` (no coordinate channels, any depth; ResNet-34 is
``channels=(64, 128, 256, 512), blocks=(3, 4, 6, 3)``) and a MiniLM / CLIP / hashed sentence embedding in place of
MUSE.

Training (``loss``) uses the paper's in-batch negatives, built by ``build_negatives`` from the batch itself: 20 %
wrong instruction (another sample's instruction, of another task where the batch has one), 20 % reversed order (the
goal shown as the current frame and the current frame as the goal), 10 % wrong goal (the goal of a sample from
another episode), the rest positives; labels 1 for positives, 0 for negatives, binary cross-entropy. Both images
are augmented with independent parameters (de-synchronised augmentation, ``ghil.nn.augment``), so the classifier
sees the colour/crop mismatches a generated subgoal has.

At run time ``score(obs, candidates, subtask)`` returns one logit per candidate (higher = keep); clip candidates
(K, T, H, W, 3) are scored on their last frame. Inputs are checked: K >= 1, frames of the configured size, a
non-empty instruction of at most ``max_text_len`` characters; anything else is a ValueError naming the problem.

Usage::

    filt = GhilGlueFilter(GhilGlueFilterConfig(image_size=200))
    scores = filt.score(obs, candidates, "open the drawer")     # (K,) float logits; keep candidates[scores.argmax()]
    loss, metrics = filt.loss(collate_subgoal(samples))         # what ghil.train.Trainer calls
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ghil.checkpoint import PretrainedMixin, coerce_config, register, register_config
from ghil.nn.augment import AugmentConfig, ImageAugment, resize
from ghil.nn.encoders import (
    ClipTextConfig,
    HashTextConfig,
    MiniLMConfig,
    ResNetGN,
    ResNetGNConfig,
    TextEncoder,
    build_text_encoder,
)
from ghil.types import Observation

TEXT_CONFIGS = (MiniLMConfig, ClipTextConfig, HashTextConfig)

# The kinds of training pair, in the order ``build_negatives`` assigns them (PairPlan.kind holds these indices).
KINDS = ("positive", "wrong_instruction", "reversed", "wrong_goal")
POSITIVE, WRONG_INSTRUCTION, REVERSED, WRONG_GOAL = range(len(KINDS))


# -- negatives --------------------------------------------------------------------------------------------------


@register_config("ghil_glue_negatives")
@dataclass(frozen=True)
class NegativeFractions:
    """Shares of each training batch turned into each kind of negative (the paper's 20 / 20 / 10 %; the rest are
    positives)."""

    wrong_instruction: float = 0.2
    reversed: float = 0.2
    wrong_goal: float = 0.1

    def __post_init__(self) -> None:
        values = (self.wrong_instruction, self.reversed, self.wrong_goal)
        if any(not 0.0 <= float(v) <= 1.0 for v in values) or sum(values) > 1.0 + 1e-9:
            raise ValueError(f"NegativeFractions must each lie in [0, 1] and sum to at most 1, got {values}")

    @property
    def positive(self) -> float:
        return max(0.0, 1.0 - self.wrong_instruction - self.reversed - self.wrong_goal)


def negative_counts(batch_size: int, fractions: NegativeFractions) -> tuple[int, int, int, int]:
    """Rows of a batch of ``batch_size`` given to each kind (``KINDS`` order): the fractions apportioned by largest
    remainder, so the counts always sum to the batch and are exact whenever ``fraction * batch_size`` is whole
    (10 -> 5 / 2 / 2 / 1, 32 -> 16 / 7 / 6 / 3)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shares = [fractions.positive, fractions.wrong_instruction, fractions.reversed, fractions.wrong_goal]
    exact = [s * batch_size for s in shares]
    counts = [int(np.floor(e + 1e-9)) for e in exact]
    # Largest remainder first; ties keep the KINDS order (positives first), so the result is deterministic.
    order = sorted(range(len(shares)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[:batch_size - sum(counts)]:
        counts[k] += 1
    return tuple(counts)  # type: ignore[return-value]


@dataclass(frozen=True)
class PairPlan:
    """Which rows make each training pair. Images index ``cat([images, goals])`` (2B rows: row i is sample i's
    current frame, row B + i its goal), ``text`` indexes the instructions."""

    kind: Tensor  # (B,) int64, index into KINDS
    current: Tensor  # (B,) int64 rows of cat([images, goals]) shown as the current frame
    goal: Tensor  # (B,) int64 rows of cat([images, goals]) shown as the candidate subgoal
    text: Tensor  # (B,) int64 rows of the instructions
    clean: Tensor  # (B,) bool; False for a negative whose donor could not differ (see build_negatives)

    @property
    def labels(self) -> Tensor:  # (B,) float: 1 for positives, 0 for negatives
        return (self.kind == POSITIVE).float()


def _pick(options: list[int], generator: torch.Generator | None) -> int:
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def build_negatives(instructions: Sequence[str], episodes: Sequence[int] | Tensor, fractions: NegativeFractions,
                    tasks: Sequence[str] | None = None, generator: torch.Generator | None = None) -> PairPlan:
    """GHIL-Glue's in-batch negatives for a batch of positive (current, goal, instruction) samples.

    Exactly ``negative_counts(B, fractions)`` rows of each kind, on rows drawn at random (``generator``; None: torch's
    global stream, which the trainer seeds and restores, so resumed runs build the same pairs):

    * wrong instruction: the instruction of another sample of a different task (``tasks``; by instruction text when
      tasks are not given, since two phrasings of one task would make a false negative);
    * reversed: the sample's goal as the current frame and its current frame as the goal (temporal order);
    * wrong goal: the goal of a sample from another episode (of another task when the batch holds one episode:
      CALVIN's play data has few, long episodes).

    The paper permutes rows within a slice, so a negative can map onto itself; here a donor that differs is chosen
    whenever the batch has one, and ``clean`` is False only where it has none (any other row is the donor then):
    a batch of one task for wrong instructions, of one episode and one task for wrong goals.
    """
    b = len(instructions)
    episodes = [int(e) for e in (episodes.tolist() if isinstance(episodes, Tensor) else episodes)]
    if b < 1 or len(episodes) != b or (tasks is not None and len(tasks) != b):
        raise ValueError(f"build_negatives needs one instruction, episode (and task) per sample, got {b}, "
                         f"{len(episodes)}, {None if tasks is None else len(tasks)}")
    keys = list(tasks) if tasks is not None else list(instructions)
    counts = negative_counts(b, fractions)
    rows = torch.randperm(b, generator=generator).tolist()
    kind = torch.zeros(b, dtype=torch.long)
    current = torch.arange(b)
    goal = torch.arange(b) + b
    text = torch.arange(b)
    clean = torch.ones(b, dtype=torch.bool)
    start = counts[POSITIVE]
    for k in (WRONG_INSTRUCTION, REVERSED, WRONG_GOAL):
        for i in rows[start:start + counts[k]]:
            kind[i] = k
            if k == REVERSED:
                current[i], goal[i] = b + i, i
                continue
            if k == WRONG_INSTRUCTION:
                differ = [j for j in range(b) if keys[j] != keys[i]]
            else:
                differ = ([j for j in range(b) if episodes[j] != episodes[i]]
                          or [j for j in range(b) if keys[j] != keys[i]])
            others = differ or [j for j in range(b) if j != i] or [i]
            j = _pick(others, generator)
            clean[i] = bool(differ)
            if k == WRONG_INSTRUCTION:
                text[i] = j
            else:
                goal[i] = b + j
        start += counts[k]
    return PairPlan(kind=kind, current=current, goal=goal, text=text, clean=clean)


def progress_loss(logits: Tensor, plan: PairPlan) -> tuple[Tensor, dict[str, float]]:
    """BCE of a filter's (B,) logits against the plan's labels, with the accuracy overall and per kind of pair."""
    labels = plan.labels.to(logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    correct = ((logits.detach() > 0).float() == labels).float().cpu()
    metrics = {"loss": float(loss.detach()), "acc": float(correct.mean())}
    # Per-kind accuracy only for kinds this batch size has (the counts depend on the batch size alone, so the
    # logged keys are the same at every step).
    for k, name in enumerate(KINDS):
        rows = plan.kind == k
        if rows.any():
            metrics[f"acc_{name}"] = float(correct[rows].mean())
    negatives = plan.kind != POSITIVE
    if negatives.any():
        metrics["noisy_negatives"] = float((~plan.clean[negatives]).float().mean())
    return loss, metrics


# -- the classifier ---------------------------------------------------------------------------------------------


@register_config("ghil_glue_filter_config")
@dataclass(frozen=True)
class GhilGlueFilterConfig:
    """Inputs and sizes of the GHIL-Glue classifier. The defaults are ``ghil/configs/filter/ghil_glue_small.yaml``
    (tests/test_filter.py keeps the two equal); checkpoints store every field."""

    camera: str = "rgb_static"  # the camera whose frames (and generated subgoals) are scored
    image_size: int = 200  # expected (square) size of the frames and candidates, checked on every call
    encoder_size: int = 96  # resolution the encoders see (after the augmenting crop / resize)
    image_encoder: ResNetGNConfig = field(default_factory=lambda: ResNetGNConfig(
        channels=(16, 32, 64, 128), blocks=(1, 1, 1, 1), stem_kernel=3, stem_pool=True, groups=8, tokens_side=1))
    width: int = 128  # each encoder's output features
    hidden: tuple[int, ...] = (256, 256)  # the head's MLP (LayerNorm, swish, dropout), then one logit
    dropout: float = 0.1
    text_encoder: MiniLMConfig | ClipTextConfig | HashTextConfig = field(default_factory=MiniLMConfig)
    # Longer instructions are refused: the text encoders silently truncate (64 / 77 tokens), so an overlong text
    # would be scored on a prefix. CALVIN's longest is under 100 characters.
    max_text_len: int = 256  # characters (the generators' setting of the same name)
    negatives: NegativeFractions = field(default_factory=NegativeFractions)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # desync=True: GHIL-Glue's de-synchronisation

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("image_encoder", coerce_config(self.image_encoder, ResNetGNConfig, "GhilGlueFilterConfig.image_encoder"))
        set_("negatives", coerce_config(self.negatives, NegativeFractions, "GhilGlueFilterConfig.negatives"))
        set_("augment", coerce_config(self.augment, AugmentConfig, "GhilGlueFilterConfig.augment"))
        set_("hidden", tuple(int(h) for h in self.hidden))
        if not isinstance(self.text_encoder, TEXT_CONFIGS):
            raise TypeError(f"GhilGlueFilterConfig.text_encoder must be one of {[c.__name__ for c in TEXT_CONFIGS]}, "
                            f"got {self.text_encoder!r}")
        if not isinstance(self.camera, str) or not self.camera:
            raise ValueError(f"GhilGlueFilterConfig.camera must be a camera name, got {self.camera!r}")
        if self.image_size < 8 or self.encoder_size < 8:
            raise ValueError(f"GhilGlueFilterConfig: image_size ({self.image_size}) and encoder_size "
                             f"({self.encoder_size}) must be >= 8 px")
        if self.width < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"GhilGlueFilterConfig: width ({self.width}) and hidden {self.hidden} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GhilGlueFilterConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.max_text_len < 1:
            raise ValueError(f"GhilGlueFilterConfig.max_text_len must be >= 1, got {self.max_text_len}")


class FiLMResNet(nn.Module):
    """``ResNetGN`` with FiLM on a condition vector after every residual block: (B, 3, H, W) in [0, 1] and
    (B, cond_dim) -> (B, n_tokens * width).

    It runs the ResNetGN's own stem, blocks and projection (so the encoder is ghil's one image encoder), with the
    modulation x * (1 + gamma) + beta between blocks; gamma and beta come from zero-initialised linear maps, so at
    initialisation the encoder is exactly the unconditioned ResNetGN.
    """

    def __init__(self, config: ResNetGNConfig, width: int, cond_dim: int):
        super().__init__()
        self.body = ResNetGN(config, width)
        self.film = nn.ModuleList()
        for block in self.body.layers:
            linear = nn.Linear(cond_dim, 2 * block.conv2.out_channels)
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            self.film.append(linear)

    def forward(self, images: Tensor, cond: Tensor) -> Tensor:
        # The steps of ResNetGN.forward, with FiLM between the blocks.
        x = self.body.stem((images - 0.5) / 0.5)
        for block, film in zip(self.body.layers, self.film):
            gamma, beta = film(cond).chunk(2, dim=-1)  # (B, C) each
            x = block(x) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        x = F.adaptive_avg_pool2d(x, self.body.config.tokens_side)  # (B, C, s, s)
        tokens = self.body.proj(x.flatten(2).transpose(1, 2)) + self.body.pos  # (B, s*s, width)
        return tokens.flatten(1)


def check_candidates(candidates: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """``candidates`` as a uint8 (K, H, W, 3) or (K, T, H, W, 3) array with K >= 1 (and H, W == ``size``); a
    ValueError naming what is wrong otherwise."""
    if not isinstance(candidates, np.ndarray):
        if isinstance(candidates, Tensor):
            candidates = candidates.detach().cpu().numpy()
        else:
            raise ValueError(f"candidates must be a uint8 array (K, H, W, 3) or (K, T, H, W, 3), got "
                             f"{type(candidates).__name__}")
    shape = candidates.shape
    if candidates.ndim not in (4, 5) or shape[-1] != 3:
        raise ValueError(f"candidates must be (K, H, W, 3) images or (K, T, H, W, 3) clips, got shape {shape}")
    if shape[0] < 1 or (candidates.ndim == 5 and shape[1] < 1):
        raise ValueError(f"need at least one candidate (K >= 1{', T >= 1' if candidates.ndim == 5 else ''}), got "
                         f"shape {shape}")
    if candidates.dtype != np.uint8:
        raise ValueError(f"candidates must be uint8 RGB, got dtype {candidates.dtype}")
    if size is not None and tuple(shape[-3:-1]) != tuple(size):
        raise ValueError(f"candidate frames are {shape[-3]}x{shape[-2]}, expected {size[0]}x{size[1]} (the "
                         "observation's frame size)")
    return candidates


def last_frames(candidates: np.ndarray) -> np.ndarray:
    """(K, H, W, 3) images as they are; (K, T, H, W, 3) clips -> their last frames (what the filter scores)."""
    return candidates[:, -1] if candidates.ndim == 5 else candidates


@register("ghil_glue")
class GhilGlueFilter(PretrainedMixin, nn.Module):
    """The GHIL-Glue progress classifier (see the module docstring); a ``SubgoalFilter`` and a ``Learnable``.

    Usage::

        filt = GhilGlueFilter(GhilGlueFilterConfig(image_size=200))
        best = int(np.argmax(filt.score(obs, candidates, "open the drawer")))
        filt.save_pretrained("runs/filter/checkpoints/last"); load_pretrained("runs/filter/checkpoints/last")
    """

    def __init__(self, config: GhilGlueFilterConfig | None = None):
        super().__init__()
        config = config if config is not None else GhilGlueFilterConfig()
        if not isinstance(config, GhilGlueFilterConfig):
            raise TypeError(f"GhilGlueFilter needs a GhilGlueFilterConfig, got {type(config).__qualname__}")
        self.config = config
        cond = config.text_encoder.dim
        self.current_encoder = FiLMResNet(config.image_encoder, config.width, cond)
        self.goal_encoder = FiLMResNet(config.image_encoder, config.width, cond)  # separate weights (paper)
        layers: list[nn.Module] = []
        c_in = 2 * config.image_encoder.n_tokens * config.width
        for h in config.hidden:
            layers += [nn.Linear(c_in, h), nn.LayerNorm(h), nn.SiLU(), nn.Dropout(config.dropout)]
            c_in = h
        layers.append(nn.Linear(c_in, 1))
        self.head = nn.Sequential(*layers)
        self.augment = ImageAugment(config.augment)
        self._text: list[TextEncoder] = []  # built lazily; outside the module tree (frozen, not checkpointed)

    def init_kwargs(self) -> dict[str, Any]:
        return {"config": self.config}

    def attach_ema(self, ema: nn.Module | None) -> None:
        """The classifier bootstraps nothing from an EMA copy; the trainer's EMA weights are still what it ships."""

    def text_encoder(self) -> TextEncoder:
        if not self._text:
            self._text.append(build_text_encoder(self.config.text_encoder))
        return self._text[0]

    # -- input checks -------------------------------------------------------------------------------------------

    def check_text(self, text: Any) -> str:
        """The instruction, or a ValueError for a non-string, an empty one, or one over ``max_text_len``."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the filter scores progress on an instruction: it must be a non-empty string, got "
                             f"{text!r}")
        if len(text) > self.config.max_text_len:
            raise ValueError(f"instruction of {len(text)} characters is longer than the filter's max_text_len="
                             f"{self.config.max_text_len} (the text encoder would truncate it): {text[:60]!r}...")
        return text

    def _check_frames(self, name: str, frames: Tensor) -> None:
        s = self.config.image_size
        if frames.dtype != torch.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != (s, s, 3):
            raise ValueError(f"{name} must be uint8 (B, {s}, {s}, 3) frames (filter image_size={s}), got "
                             f"{tuple(frames.shape)} {frames.dtype}")

    # -- the network --------------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _prepare(self, current: Tensor, goal: Tensor, train: bool) -> tuple[Tensor, Tensor]:
        """uint8 (B, H, W, 3) pairs -> float (B, 3, e, e) at the encoder size; augmented when training."""
        as_float = lambda x: x.to(self._device()).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
        cur, g = as_float(current), as_float(goal)
        size = self.config.encoder_size
        if train:
            return self.augment.pair(cur, g, size)  # independent parameters when augment.desync
        return resize(cur, size), resize(g, size)

    def _embed(self, texts: Sequence[str]) -> Tensor:
        return self.text_encoder()(list(texts)).to(self._device())  # (B, text_dim)

    def _logits(self, current: Tensor, goal: Tensor, cond: Tensor) -> Tensor:
        features = torch.cat([self.current_encoder(current, cond), self.goal_encoder(goal, cond)], dim=-1)
        return self.head(features).squeeze(-1)  # (B,)

    @torch.no_grad()
    def logits(self, current: Tensor, goal: Tensor, instructions: Sequence[str]) -> Tensor:
        """Batched scoring without augmentation: uint8 (B, S, S, 3) current frames and goals, B instructions ->
        (B,) logits (e.g. for the filter's accuracy on held-out pairs)."""
        current, goal = torch.as_tensor(current), torch.as_tensor(goal)
        self._check_frames("current", current)
        self._check_frames("goal", goal)
        if len(instructions) != len(current) or len(goal) != len(current):
            raise ValueError(f"{len(current)} current frames, {len(goal)} goals and {len(instructions)} instructions: "
                             "need one of each per row")
        texts = [self.check_text(t) for t in instructions]
        was_training = self.training
        self.eval()
        try:
            return self._logits(*self._prepare(current, goal, train=False), self._embed(texts))
        finally:
            self.train(was_training)

    # -- the SubgoalFilter contract -----------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, obs: Observation, candidates: np.ndarray, subtask: str) -> np.ndarray:
        """(K,) float64 logits, one per candidate (higher = makes more progress on ``subtask`` from ``obs``)."""
        cfg = self.config
        text = self.check_text(subtask)
        if cfg.camera not in obs.images:
            raise ValueError(f"the filter scores camera {cfg.camera!r}, which the observation lacks (has "
                             f"{sorted(obs.images)})")
        frame = np.asarray(obs.images[cfg.camera])
        s = cfg.image_size
        if frame.dtype != np.uint8 or frame.shape != (s, s, 3):
            raise ValueError(f"observation frame {cfg.camera!r} must be uint8 ({s}, {s}, 3) (filter image_size={s}), "
                             f"got {frame.shape} {frame.dtype}")
        goals = last_frames(check_candidates(candidates, (s, s)))
        k = len(goals)
        was_training = self.training
        self.eval()
        try:
            cur, g = self._prepare(torch.from_numpy(np.ascontiguousarray(frame))[None],
                                   torch.from_numpy(np.ascontiguousarray(goals)), train=False)
            cond = self._embed([text])  # (1, text_dim)
            # The current frame is encoded once and shared by the K candidates.
            s_feat = self.current_encoder(cur, cond).expand(k, -1)
            g_feat = self.goal_encoder(g, cond.expand(k, -1))
            logits = self.head(torch.cat([s_feat, g_feat], dim=-1)).squeeze(-1)
        finally:
            self.train(was_training)
        return logits.double().cpu().numpy()

    # -- training -----------------------------------------------------------------------------------------------

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """BCE on the paper's in-batch negatives (``build_negatives``) of a batch of positive subgoal samples
        (``ghil.data.subgoal_dataset.SubgoalBatch``: current frames ``image``, goal frames ``goal`` ``horizon``
        steps later, instructions, tasks and episode rows)."""
        images, goals = torch.as_tensor(batch.image), torch.as_tensor(batch.goal)
        self._check_frames("batch images", images)
        self._check_frames("batch goals", goals)
        instructions = [self.check_text(t) for t in batch.instructions]
        b = len(images)
        if len(goals) != b or len(instructions) != b:
            raise ValueError(f"batch has {b} images, {len(goals)} goals and {len(instructions)} instructions")
        plan = build_negatives(instructions, batch.episode_rows, self.config.negatives, tasks=batch.tasks)
        device = self._device()
        stack = torch.cat([images, goals]).to(device)
        current, goal = self._prepare(stack[plan.current.to(device)], stack[plan.goal.to(device)],
                                      train=self.training)
        logits = self._logits(current, goal, self._embed([instructions[i] for i in plan.text.tolist()]))
        return progress_loss(logits, plan)


class FirstCandidate:
    """The no-filter ablation (SuSIE): scores that keep the first candidate, ``[0, -1, -2, ...]``.

    Usage::

        FirstCandidate().score(obs, candidates, "open the drawer")     # array([ 0., -1., -2., -3.])
    """

    def score(self, obs: Observation, candidates: np.ndarray, subtask: str) -> np.ndarray:
        if not isinstance(subtask, str) or not subtask.strip():
            raise ValueError(f"subtask must be a non-empty string, got {subtask!r}")
        k = len(check_candidates(candidates))
        return np.arange(0, -k, -1, dtype=np.float64)  # (not -arange: its first score would print as -0.0)


__all__ = ["GhilGlueFilter", "GhilGlueFilterConfig", "FiLMResNet", "FirstCandidate", "NegativeFractions",
           "PairPlan", "build_negatives", "progress_loss", "negative_counts", "check_candidates", "last_frames",
           "KINDS"]
