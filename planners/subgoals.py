"""Generated subgoals: a subgoal generator and a subgoal filter composed into one ``GoalProvider`` with a replanning
cadence, the hierarchy GHIL-Glue and SuSIE run (``agent=ghil_glue``, ``agent=susie``, ``agent=ghil_glue_video``).

Every ``replan_every`` environment steps the generator imagines ``n_candidates`` subgoals in one batched call
(``propose``: images (K, H, W, 3); a video generator, one with ``propose_clips``, is asked for its clips
(K, T, H, W, 3)), the filter scores them (clips on their last
frame) and the argmax is held as the goal until the next replan, a fixed timer as in GHIL-Glue's CALVIN loop (no
"subgoal reached" check). ``FirstCandidate`` as the filter gives SuSIE (no filtering).

The cadence in env steps. ``PolicyAgent`` asks for a goal only when its chunk queue runs dry, i.e. once every
``exec_len`` env steps, so this provider measures time with ``Observation.t`` (the control step within the episode,
which the CALVIN adapter and ``ghil run`` set), never by counting its calls. A request replans when at least
``replan_every`` steps have passed since the last replan; requests come every ``exec_len`` steps, so the replans
fall exactly every ``replan_every`` steps when ``exec_len`` divides it (the agent configs run exec_len 4 with
replan_every 20: replans at steps 0, 20, 40, ...), and every ``ceil(replan_every / exec_len) * exec_len`` steps
otherwise (exec_len 8: 0, 24, 48, ...; logged once as a warning). A caller whose observations carry no step count
(``t`` left at 0) passes ``exec_len``: the clock then counts ``exec_len`` steps per request. A new instruction, or
a clock that runs backwards (a new episode without ``reset()``), replans at once.

Robustness: a filter returning only non-finite scores (or scores of the wrong shape) falls back to candidate 0 and
logs why, once per episode; a few non-finite scores are ignored in the argmax. A generator output that is not uint8
(a float image with NaN, ...) or not (K, H, W, 3) at the camera's frame size, or a generator that reports NaN/inf
pixels itself (``NonFiniteSubgoalError``), is rejected: the previous subgoal is kept and the next request tries
again; with no previous subgoal (the first replan) that is a RuntimeError naming
the problem.

``follow_clip`` (video generators): instead of the clip's last frame, the goal follows the chosen clip frame by
frame. The clip's T frames are taken as evenly spaced over the ``clip_horizon`` steps after the observation it was
imagined from (frame j shows step (j + 1) * clip_horizon / T), and a request ``e`` steps after the replan gets the
first frame showing step ``e + clip_lead`` or later (the last frame once the clip is used up).

Usage::

    goals = GeneratedSubgoals(load_pretrained("checkpoints/susie_small"),
                              load_pretrained("checkpoints/ghil_glue_filter"), n_candidates=4, replan_every=20)
    agent = PolicyAgent(load_pretrained("checkpoints/dit_small"), goals=goals, exec_len=4)
    agent.seed(0); agent.reset(); agent.act(obs)      # agent.describe().subgoal: candidates, scores, chosen
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from typing import Any

import numpy as np

from ghil.interfaces import Seedable, SubgoalFilter, SubgoalGenerator
from ghil.runtime.policy_agent import derive_seed
from ghil.types import Observation, Subgoal
from planners.image_generator import NonFiniteSubgoalError

log = logging.getLogger(__name__)

# Stream ids mixed into the provider's seed, so the generator's and the filter's randomness never share a stream.
_GENERATOR_STREAM, _FILTER_STREAM = 0, 1


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class RejectedCandidates(ValueError):
    """A generator output that cannot be a subgoal (wrong dtype or shape, non-finite values)."""


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor (torch is not imported here)
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as err:  # ragged lists, objects: not an image batch
        raise RejectedCandidates(f"not an array ({type(value).__name__}: {err})") from None


def check_generated(value: Any, n_candidates: int, frame_shape: tuple[int, ...]) -> np.ndarray:
    """The generator's output as uint8 (K, H, W, 3) or (K, T, H, W, 3) with K == ``n_candidates`` and frames of
    ``frame_shape``; ``RejectedCandidates`` saying why otherwise."""
    array = _as_array(value)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.number) and not np.isfinite(array).all():
            raise RejectedCandidates(f"non-finite values ({int((~np.isfinite(array)).sum())} NaN/inf) in a "
                                     f"{array.dtype} output")
        raise RejectedCandidates(f"dtype {array.dtype}, not uint8 RGB")
    expected = f"({n_candidates}, {', '.join(map(str, frame_shape))}) or ({n_candidates}, T, ...)"
    if array.ndim not in (4, 5) or tuple(array.shape[-3:]) != tuple(frame_shape) or len(array) != n_candidates:
        raise RejectedCandidates(f"shape {array.shape}, expected {expected}")
    if array.ndim == 5 and array.shape[1] < 1:
        raise RejectedCandidates(f"clips of no frames, shape {array.shape}")
    return np.ascontiguousarray(array)


def proposal_method(generator: Any) -> tuple[Any, bool]:
    """The generator method a replan calls and whether it returns (tokens, previews): ``propose_tokens`` (token-space
    generators), else ``propose_clips`` (video generators give whole clips, so the policy can follow the chosen one;
    their ``propose`` returns only the last frames), else ``propose``. Looked up per call, so a patched method counts."""
    propose_tokens = getattr(generator, "propose_tokens", None)
    if callable(propose_tokens):
        return propose_tokens, True
    return getattr(generator, "propose_clips", generator.propose), False


def check_tokens(value: Any, n_candidates: int) -> np.ndarray:
    """A token generator's candidates as finite float32 (K, n_tokens, W); ``RejectedCandidates`` otherwise."""
    array = _as_array(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise RejectedCandidates(f"tokens of dtype {array.dtype}, not float")
    if array.ndim != 3 or len(array) != n_candidates:
        raise RejectedCandidates(f"tokens of shape {array.shape}, expected ({n_candidates}, n_tokens, W)")
    if not np.isfinite(array).all():
        raise RejectedCandidates(f"non-finite values ({int((~np.isfinite(array)).sum())} NaN/inf) in the tokens")
    return np.ascontiguousarray(array, dtype=np.float32)


class GeneratedSubgoals:
    """Generator + filter + replanning timer, a ``GoalProvider`` and ``Seedable`` (see the module docstring).

    Usage::

        goals = GeneratedSubgoals(generator, FirstCandidate(), n_candidates=1)     # SuSIE
        goals.reset()
        subgoal = goals.goal(obs)         # Subgoal(image, clip, candidates, scores, chosen, source)
    """

    def __init__(self, generator: SubgoalGenerator, filter: SubgoalFilter, n_candidates: int = 4,
                 replan_every: int = 20, camera: str = "rgb_static", follow_clip: bool = False,
                 clip_horizon: int | None = None, clip_lead: int = 4, exec_len: int | None = None,
                 source: str | None = None, n_steps: int | None = None, image_guidance: float | None = None,
                 text_guidance: float | None = None):
        if not isinstance(generator, SubgoalGenerator):
            raise TypeError(f"generator must be a ghil.interfaces.SubgoalGenerator (propose(obs, subtask, "
                            f"n_candidates)), got {type(generator).__name__}")
        if not isinstance(filter, SubgoalFilter):
            raise TypeError(f"filter must be a ghil.interfaces.SubgoalFilter (score(obs, candidates, subtask)), got "
                            f"{type(filter).__name__}")
        for name, value, low in (("n_candidates", n_candidates, 1), ("replan_every", replan_every, 1),
                                 ("clip_lead", clip_lead, 0)):
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name, value in (("exec_len", exec_len), ("clip_horizon", clip_horizon), ("n_steps", n_steps)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        self.generator = generator
        self.filter = filter
        self.n_candidates = int(n_candidates)
        self.replan_every = int(replan_every)
        self.camera = str(camera)
        self.follow_clip = bool(follow_clip)
        self.clip_horizon = int(clip_horizon) if clip_horizon is not None else None
        self.clip_lead = int(clip_lead)
        self.exec_len = int(exec_len) if exec_len is not None else None
        # The generator's sampler steps per replan (None: its checkpoint's default); checked once here.
        self.n_steps = int(n_steps) if n_steps is not None else None
        if self.n_steps is not None:
            sampler = getattr(generator, "sampler", None)
            if sampler is None or not callable(getattr(sampler, "check_steps", None)):
                raise ValueError(f"n_steps={n_steps} was given but {type(generator).__name__} has no sampler to set")
            sampler.check_steps(self.n_steps)
        # Guidance scales per replan (None: the generator's configured ones); only generators whose propose takes
        # them (the diffusion generators) accept a value.
        self.guidance = {k: float(v) for k, v in (("image_guidance", image_guidance), ("text_guidance", text_guidance))
                         if v is not None}
        for key, value in self.guidance.items():
            if not math.isfinite(value):
                raise ValueError(f"{key} must be finite, got {value}")
            if key not in inspect.signature(proposal_method(generator)[0]).parameters:
                raise ValueError(f"{key} was given but {type(generator).__name__} takes no guidance scale")
        self.source = source or getattr(generator, "type_name", "") or type(generator).__name__
        self._warned_once: set[str] = set()  # warnings about the set-up itself: once per provider
        self.reset()

    @property
    def _steps(self) -> dict[str, Any]:
        return {**({} if self.n_steps is None else {"n_steps": self.n_steps}), **self.guidance}

    # -- GoalProvider / Seedable --------------------------------------------------------------------------------

    def bind_policy(self, policy: Any) -> None:
        """Hand the policy to stages that work in its encoder token space (``PolicyAgent`` calls this): they check
        the space matches and share its per-frame tokens. Stages without ``bind_policy`` are left alone."""
        for stage in (self.generator, self.filter):
            bind = getattr(stage, "bind_policy", None)
            if callable(bind):
                bind(policy)

    def seed(self, seed: int) -> None:
        """Restart the generator's (and a seedable filter's) random streams from ``seed``."""
        for stream, stage in ((_GENERATOR_STREAM, self.generator), (_FILTER_STREAM, self.filter)):
            if isinstance(stage, Seedable):
                stage.seed(derive_seed(seed, stream))

    def reset(self) -> None:
        """Forget the subgoal in force and the timer (a new subtask)."""
        self._subgoal: Subgoal | None = None  # the chosen candidate, as the last replan made it
        self._instruction: str | None = None  # the instruction the subgoal was made for
        self._t_replan: int | None = None  # clock at the last (successful) replan
        self._t_last: int | None = None  # clock at the last request
        self._stride: int | None = None  # the spacing of the last two requests
        self._n_requests = 0
        self._retry = False  # the last replan was rejected: try again at the next request
        self._warned: set[str] = set()  # per-episode warnings
        self.n_replans = 0  # successful replans this episode
        self.n_rejected = 0  # generator outputs rejected this episode
        self.n_fallbacks = 0  # replans whose scores were unusable (candidate 0 kept)

    def goal(self, obs: Observation) -> Subgoal:
        text = obs.instruction
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"generated subgoals need the instruction (Observation.instruction), got {text!r}")
        now = self._clock(obs)
        self._check_request_stride(now)
        due = (self._subgoal is None or self._retry or text != self._instruction or now < self._t_replan
               or now - self._t_replan >= self.replan_every)
        if due:
            self._replan(obs, text, now)
        self._t_last = now
        self._n_requests += 1
        if self.follow_clip and self._subgoal.clip is not None:
            return self._clip_goal(now - self._t_replan)
        return self._subgoal

    # -- the timer ----------------------------------------------------------------------------------------------

    def _clock(self, obs: Observation) -> int:
        """Env steps since the episode started: ``obs.t``, or ``exec_len`` per request when it is given."""
        if self.exec_len is not None:
            return self._n_requests * self.exec_len
        return int(obs.t)

    def _check_request_stride(self, now: int) -> None:
        """Warn (once) when the requests' spacing does not divide replan_every, so replans drift from its value."""
        if self._t_last is None or now <= self._t_last:
            return
        stride, previous = now - self._t_last, self._stride
        self._stride = stride
        # Only a cadence warns: the same stride twice in a row (an asynchronous caller's irregular strides do not).
        if stride == previous and self.replan_every % stride and "stride" not in self._warned_once:
            self._warned_once.add("stride")
            effective = math.ceil(self.replan_every / stride) * stride
            log.warning("goals are requested every %d env steps (the policy's exec_len), which does not divide "
                        "replan_every=%d: subgoals are replanned every %d steps instead; choose an agent exec_len "
                        "that divides replan_every for the exact cadence", stride, self.replan_every, effective)

    # -- replanning ---------------------------------------------------------------------------------------------

    def _warn_episode(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message + " (logged once per episode)", *args)

    def _replan(self, obs: Observation, text: str, now: int) -> None:
        if self.camera not in obs.images:
            raise ValueError(f"generated subgoals show camera {self.camera!r}, which the observation lacks (has "
                             f"{sorted(obs.images)})")
        frame_shape = tuple(np.shape(obs.images[self.camera]))
        tokens = None
        try:
            propose, gives_tokens = proposal_method(self.generator)
            if gives_tokens:  # a token-space generator: its tokens steer the policy, previews are shown
                raw_tokens, previews = propose(obs, text, self.n_candidates, **self._steps)
                tokens = check_tokens(raw_tokens, self.n_candidates)
                candidates = check_generated(previews, self.n_candidates, frame_shape)
            else:
                candidates = check_generated(propose(obs, text, self.n_candidates, **self._steps), self.n_candidates,
                                             frame_shape)
        except (RejectedCandidates, NonFiniteSubgoalError) as err:
            self.n_rejected += 1
            if self._subgoal is None:
                raise RuntimeError(f"{type(self.generator).__name__}.propose returned an unusable subgoal batch "
                                   f"({err}) at the first replan, so there is no previous subgoal to keep") from None
            self._retry = True
            self._warn_episode("rejected", "%s.propose returned an unusable subgoal batch (%s) at step %d: keeping "
                               "the previous subgoal and retrying at the next request",
                               type(self.generator).__name__, err, now)
            return
        score_tokens = getattr(self.filter, "score_tokens", None)
        if tokens is not None and callable(score_tokens):
            raw_scores = score_tokens(obs, tokens, text)
        else:
            raw_scores = self.filter.score(obs, candidates, text)
        chosen, scores = self._choose(raw_scores, len(candidates), now)
        clip = candidates[chosen] if candidates.ndim == 5 else None
        image = clip[-1] if clip is not None else candidates[chosen]
        self._subgoal = Subgoal(image=np.ascontiguousarray(image), clip=clip, candidates=candidates, scores=scores,
                                chosen=chosen, source=self.source,
                                tokens=None if tokens is None else np.ascontiguousarray(tokens[chosen]))
        self._instruction, self._t_replan, self._retry = text, now, False
        self.n_replans += 1

    def _choose(self, raw_scores: Any, k: int, now: int) -> tuple[int, np.ndarray | None]:
        """The argmax over the finite scores; candidate 0 (logged) when none is usable. Returns the scores to
        record (None when they are not one per candidate)."""
        name = type(self.filter).__name__
        try:
            scores = np.asarray(raw_scores, dtype=np.float64)
        except (TypeError, ValueError):
            scores = np.empty(0)
        if scores.shape != (k,):
            self.n_fallbacks += 1
            self._warn_episode("scores_shape", "%s.score returned scores of shape %s for %d candidates at step %d: "
                               "keeping candidate 0", name, np.shape(raw_scores), k, now)
            return 0, None
        finite = np.isfinite(scores)
        if not finite.any():
            self.n_fallbacks += 1
            self._warn_episode("scores_non_finite", "%s.score returned only non-finite scores %s at step %d: "
                               "keeping candidate 0", name, scores.tolist(), now)
            return 0, scores
        return int(np.argmax(np.where(finite, scores, -np.inf))), scores

    def _clip_goal(self, elapsed: int) -> Subgoal:
        """The frame of the chosen clip showing step ``elapsed + clip_lead`` after the replan (or the last one)."""
        clip = self._subgoal.clip
        n_frames = len(clip)
        horizon = (self.clip_horizon or int(getattr(getattr(self.generator, "config", None), "horizon", 0) or 0)
                   or self.replan_every)
        target = elapsed + self.clip_lead
        index = min(n_frames - 1, max(0, math.ceil(target * n_frames / horizon) - 1))
        return dataclasses.replace(self._subgoal, image=np.ascontiguousarray(clip[index]))


__all__ = ["GeneratedSubgoals", "RejectedCandidates", "check_generated", "check_tokens", "proposal_method"]
