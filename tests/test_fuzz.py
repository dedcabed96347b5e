"""Fuzz suite (issue 10): property-based (hypothesis) checks of every surface that takes untrusted input.

Surfaces and the property each must hold for *every* input:

* ``validate_action``: an :class:`InvalidActionError`, or ``{"type", "action"}`` with a fresh finite float64 vector of
  the type's length, gripper exactly +-1, built only from real numbers (no string, complex, bool or None anywhere).
* ``PlayTableEnv.step``: an ``InvalidActionError`` with the env's state unchanged (robot_obs, scene_obs, controller
  targets), or a step whose observation is finite (and whose images have the camera's shape and dtype).
* ``PlayTableEnv.reset``: an ``InvalidStateError`` / ``ValueError`` with the state (and the random stream)
  unchanged, or a finite observation that stays finite over two steps (no hang); a strict reset never accepts a
  state outside the strict bounds.
* ``DiTPolicy.predict_chunk``: a ``ValueError`` / ``TypeError`` / ``KeyError``, or a finite chunk of the right
  shape, inside the action space's range, gripper exactly +-1; the caller's arrays are never modified.
* ``CalvinDataset`` over a dataset whose frame files are damaged (truncated, bytes flipped, keys removed, arrays
  replaced by random shapes, dtypes and values): reading every sample gives data equal to what is stored (or to
  the valid replacement), or a ``DatasetError`` naming the damaged file; no file of the dataset changes.
* ``load_pretrained`` on a checkpoint whose ``config.json`` (JSON edits, byte flips) or ``model.safetensors`` (byte
  flips, truncation, random bytes) is damaged: a ``CheckpointError``, or a model with the original's weights and
  outputs; no file of the checkpoint changes.

Each input is classified as one of ``OUTCOMES`` (clear error / ok / crash / hang / silent garbage / data lost); the
tests require clear error or ok. The env runs in a forked worker process, because pybullet's C loops hold the GIL
and ignore signals: a step that does not return within the time limit kills the worker and counts as a hang (the
issue's 9e307 IK loop). The other surfaces run in-process under a SIGALRM limit per example.

Sizes: a bounded CI run by default (``CI_EXAMPLES``, the whole file in well under a minute); ``pytest
tests/test_fuzz.py --fuzz-long`` (or ``GHIL_FUZZ_LONG=1``) runs ``LONG_EXAMPLES`` (10,000 actions, 1,000 of each
other kind); ``GHIL_FUZZ_EXAMPLES=N`` runs N of every surface. Hypothesis is derandomized (a fixed seed per test)
with no example database, so every run tries the same inputs. ``benchmarks/fuzz_report.py`` runs the long sizes
and prints the outcome table.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from sim_eval.world import layout  # noqa: E402
from sim_eval.world.action_validation import (  # noqa: E402
    ACTION_TYPES,
    ROBOT_OBS_HIGH,
    ROBOT_OBS_LOW,
    SCENE_OBS_HIGH,
    SCENE_OBS_LOW,
    InvalidActionError,
    InvalidStateError,
    validate_action,
)

# -- sizes -----------------------------------------------------------------------------------------------------

SURFACES = ("validate_action", "env_step", "env_reset", "policy", "dataset", "checkpoint")
CI_EXAMPLES = {"validate_action": 2000, "env_step": 1000, "env_reset": 300, "policy": 300, "dataset": 150,
               "checkpoint": 150}
LONG_EXAMPLES = {"validate_action": 20000, "env_step": 10000, "env_reset": 1000, "policy": 1000, "dataset": 1000,
                 "checkpoint": 1000}
# Per-example time limit (s): generous for a loaded 2-core machine; a normal example takes milliseconds.
EXAMPLE_LIMIT_S = {"validate_action": 10.0, "env_step": 20.0, "env_reset": 30.0, "policy": 30.0, "dataset": 30.0,
                   "checkpoint": 30.0}

CLEAR, OK, CRASH, HANG, GARBAGE, LOST = "clear_error", "ok", "crash", "hang", "silent_garbage", "data_lost"
OUTCOMES = (CLEAR, OK, CRASH, HANG, GARBAGE, LOST)
GOOD = (CLEAR, OK)


def example_counts(long: bool = False) -> dict[str, int]:
    """Examples per surface: GHIL_FUZZ_EXAMPLES=N (every surface), else the long or the CI sizes."""
    if os.environ.get("GHIL_FUZZ_EXAMPLES"):
        n = int(os.environ["GHIL_FUZZ_EXAMPLES"])
        return {s: n for s in SURFACES}
    long = long or os.environ.get("GHIL_FUZZ_LONG", "") not in ("", "0")
    return dict(LONG_EXAMPLES if long else CI_EXAMPLES)


class Tally:
    """Outcome counts per surface, with the first few inputs of each bad outcome (for the report)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {s: Counter() for s in SURFACES}
        self.examples: dict[str, list[str]] = {s: [] for s in SURFACES}
        self.seconds: Counter = Counter()

    def add(self, surface: str, outcome: str, detail: str, given_input: Any) -> None:
        self.counts[surface][outcome] += 1
        if outcome not in GOOD and len(self.examples[surface]) < 10:
            self.examples[surface].append(f"{outcome}: {detail} <- {_short_repr(given_input)}")


def _short_repr(value: Any, limit: int = 300) -> str:
    try:
        text = repr(value)
    except Exception as err:  # an object whose __repr__ raises
        text = f"<unreprable {type(value).__name__}: {err}>"
    return text if len(text) <= limit else text[:limit] + "..."


def run_property(surface: str, strategy: st.SearchStrategy, check: Callable[[Any], tuple[str, str]],
                 n_examples: int, tally: Tally | None = None, strict: bool = True) -> None:
    """Run ``check`` over ``n_examples`` derandomized draws of ``strategy``; each result is tallied.

    ``strict`` (the tests): a bad outcome fails (hypothesis then shrinks it to a minimal input). Not strict (the
    report): every input runs and is only counted."""

    # The per-example limit is enforced in the checks (a worker process for the env, SIGALRM for the rest), which
    # return a hang at EXAMPLE_LIMIT_S; hypothesis' deadline, twice that, only backs them up: on its own it reports
    # a slow example after it finished, and cannot stop one stuck in C.
    deadline = EXAMPLE_LIMIT_S[surface] * 2000 if strict else None

    @settings(max_examples=n_examples, derandomize=True, database=None, deadline=deadline, print_blob=False,
              suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.generate, Phase.shrink) if strict else (Phase.explicit, Phase.generate))
    @given(strategy)
    def prop(value):
        start = time.perf_counter()
        outcome, detail = check(value)
        if tally is not None:
            tally.seconds[surface] += time.perf_counter() - start
            tally.add(surface, outcome, detail, value)
        if strict:
            assert outcome in GOOD, f"{surface}: {outcome}: {detail} for input {_short_repr(value)}"

    prop.__name__ = f"fuzz_{surface}"  # for hypothesis' reports (derandomize: the same inputs on every run)
    prop.__qualname__ = prop.__name__
    prop()


class _Timeout(BaseException):
    """Raised by SIGALRM in the main thread: an example ran past its limit (BaseException: no ``except Exception``
    in the code under test swallows it)."""


def _time_limited(fn: Callable[[], tuple[str, str]], limit_s: float) -> tuple[str, str]:
    def on_alarm(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        return fn()
    except _Timeout:
        return HANG, f"did not return within {limit_s:g} s"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:300]}"


# -- fuzzed values ------------------------------------------------------------------------------------------------


class Floaty:
    """An object with ``__float__`` (as a torch scalar tensor): accepted as a real number by design."""

    def __init__(self, value: float):
        self.value = value

    def __float__(self) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"Floaty({self.value!r})"


class BadFloat:
    """An object whose ``__float__`` raises (as a multi-element tensor's)."""

    def __init__(self, exc: str):
        self.exc = exc

    def __float__(self) -> float:
        raise {"TypeError": TypeError, "ValueError": ValueError, "RuntimeError": RuntimeError,
               "OverflowError": OverflowError}[self.exc]("no float for you")

    def __repr__(self) -> str:
        return f"BadFloat({self.exc})"


class BadArray:
    """An object whose ``__array__`` raises (or returns junk) and that has a length: numpy calls both."""

    def __init__(self, mode: str):
        self.mode = mode

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i):
        if self.mode == "index":
            raise IndexError(i)
        if not 0 <= i < 7:
            raise IndexError(i)
        return 0.0

    def __array__(self, dtype=None, copy=None):
        if self.mode == "array":
            raise RuntimeError("__array__ failed")
        return np.zeros(7) if self.mode == "ok" else np.array(["x"] * 7)

    def __repr__(self) -> str:
        return f"BadArray({self.mode})"


SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, -0.999999, 1.0000001, 2.0, 1e-308, 5e-324, -5e-324, 1e6, -1e6,
                  9e307, -9e307, 1.7976931348623157e308, -1.7976931348623157e308, math.nan, -math.nan, math.inf,
                  -math.inf, math.pi, 4 * math.pi + 1e-9, 2 * math.pi + 1e-9, 3.0, 1e3, 1e30, -1e30]
floats_any = st.one_of(
    st.floats(-1, 1),
    st.floats(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_subnormal=True, min_value=-1e-300, max_value=1e-300),
    st.sampled_from(SPECIAL_FLOATS),
)
gripper_values = st.one_of(st.sampled_from([1.0, -1.0, 1, -1, np.float32(1), np.int64(-1)]),
                           st.sampled_from([0.0, 0.5, -0.5, 2.0, math.nan, math.inf, True, False, "1", "-1", None,
                                            1 + 0j, np.float16(-1)]))
objects = st.one_of(st.builds(Floaty, floats_any),
                    st.builds(BadFloat, st.sampled_from(["TypeError", "ValueError", "RuntimeError", "OverflowError"])),
                    st.builds(BadArray, st.sampled_from(["index", "array", "ok", "junk"])),
                    st.just(object()), st.just(Ellipsis), st.just(frozenset({1.0})))
scalars = st.one_of(floats_any, st.integers(-2**70, 2**70), st.integers(-3, 3), st.booleans(), st.none(),
                    st.complex_numbers(max_magnitude=10), st.complex_numbers(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["0.1", "1", "-1", "nan", "inf", "", "cartesian_rel", "1e400"]),
                    st.text(max_size=4), st.binary(max_size=3), objects,
                    st.sampled_from([np.float32(0.1), np.float16(65504), np.int8(-1), np.uint64(2**64 - 1),
                                     np.bool_(True), np.complex64(1), np.str_("1"), np.datetime64(1, "s")]))
np_dtypes = st.sampled_from(["float64", "float32", "float16", "int64", "int32", "int8", "uint8", "uint64", "bool",
                             "complex128", "complex64", "<U3", "S2", "object", "longdouble"])


def _np_array(dtype: str, shape: tuple[int, ...], data) -> np.ndarray:
    if dtype == "object":
        n = int(np.prod(shape))
        out = np.empty(n, dtype=object)
        for i, v in enumerate(data.draw(st.lists(scalars, min_size=n, max_size=n))):
            out[i] = v  # item by item: numpy would unpack a sequence-like object
        return out.reshape(shape)
    if dtype in ("<U3", "S2"):
        return data.draw(hnp.arrays(dtype, shape))
    kind = np.dtype(dtype).kind
    elements = None
    if kind == "f":
        elements = st.floats(width=32 if dtype in ("float32", "float16") else 64, allow_nan=True,
                             allow_infinity=True, allow_subnormal=False) if dtype != "float16" else \
            st.floats(width=16, allow_nan=True, allow_infinity=True)
        if dtype == "longdouble":
            elements = st.floats(allow_nan=True, allow_infinity=True)
    return data.draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def numpy_payloads(draw, lengths=(0, 1, 3, 6, 7, 7, 7, 8, 8, 9, 15)):
    shape = draw(st.one_of(st.sampled_from(lengths).map(lambda n: (n,)),
                           st.sampled_from([(), (1, 7), (7, 1), (2, 7), (1, 8), (0, 7), (7, 7)]),
                           hnp.array_shapes(min_dims=0, max_dims=3, max_side=8)))
    dtype = draw(st.one_of(st.just("float64"), st.just("float32"), np_dtypes))
    return _np_array(dtype, shape, _Drawer(draw))


class _Drawer:
    """Adapts a composite's ``draw`` to the ``data.draw`` interface of ``_np_array``."""

    def __init__(self, draw):
        self.draw = draw


@st.composite
def action_vectors(draw, n: int | None = None):
    """Lists of ``n`` (or a random number of) values: mostly plausible numbers, sometimes anything."""
    n = draw(st.sampled_from([7, 7, 7, 8, 8, 3, 6, 9, 0, 1, 14])) if n is None else n
    element = draw(st.sampled_from(["in_range", "floats", "scalars"]))
    values = {"in_range": st.floats(-1, 1), "floats": floats_any, "scalars": scalars}[element]
    body = draw(st.lists(values, min_size=max(n - 1, 0), max_size=max(n - 1, 0)))
    if n == 0:
        return []
    gripper = draw(gripper_values)
    out = [*body, gripper]
    form = draw(st.sampled_from(["list", "tuple", "array", "array32", "list"]))
    if form == "tuple":
        return tuple(out)
    if form.startswith("array"):
        try:
            with np.errstate(all="ignore"):  # float32 overflow of huge values is part of the input
                return np.array(out, dtype=np.float32 if form == "array32" else None)
        except Exception:  # items numpy cannot take (BadFloat, BadArray): send the list as it is
            return out
    return out


@st.composite
def plausible_absolute(draw):
    """cartesian_abs / joint targets near the workspace and its edges (so accepted actions are stepped too)."""
    kind = draw(st.sampled_from(["cartesian_abs", "cartesian_abs_quat", "joint_abs", "joint_rel", "pose_tuple"]))
    g = draw(st.sampled_from([1.0, -1.0]))
    edge = st.floats(-2.5, 2.5)
    if kind == "cartesian_abs":
        return {"type": "cartesian_abs",
                "action": [*draw(st.lists(edge, min_size=3, max_size=3)),
                           *draw(st.lists(st.floats(-13, 13), min_size=3, max_size=3)), g]}
    if kind == "cartesian_abs_quat":
        q = np.array(draw(st.lists(st.floats(-1, 1), min_size=4, max_size=4)))
        if np.linalg.norm(q) > 1e-3 and draw(st.booleans()):
            q = q / np.linalg.norm(q)
        return {"type": "cartesian_abs", "action": [*draw(st.lists(edge, min_size=3, max_size=3)), *q.tolist(), g]}
    if kind == "pose_tuple":
        return (draw(st.lists(edge, min_size=3, max_size=3)),
                draw(st.lists(st.floats(-4, 4), min_size=draw(st.sampled_from([3, 4])), max_size=4)), g)
    return {"type": kind, "action": [*draw(st.lists(st.floats(-7, 7), min_size=7, max_size=7)), g]}


nested = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=8),
                                                          st.tuples(children, children, children)), max_leaves=20)
payloads = st.one_of(action_vectors(), numpy_payloads(), nested, scalars,
                     st.tuples(action_vectors(3), action_vectors(4), gripper_values),
                     st.tuples(nested, nested, nested))
action_types = st.one_of(st.sampled_from(list(ACTION_TYPES)), st.sampled_from(["CARTESIAN_REL", "", "joint", "abs"]),
                         scalars, st.lists(st.sampled_from(list(ACTION_TYPES)), max_size=2), st.just(("joint_abs",)))


@st.composite
def dict_actions(draw):
    d: dict = {}
    if draw(st.integers(0, 9)):
        d["type"] = draw(action_types)
    if draw(st.integers(0, 9)):
        kind = d.get("type")
        n = ACTION_TYPES[kind][0] if isinstance(kind, str) and kind in ACTION_TYPES else None
        d["action"] = draw(st.one_of(action_vectors(n), payloads))
    if not draw(st.integers(0, 5)):
        d[draw(st.one_of(st.text(max_size=3), st.integers()))] = draw(scalars)
    return d


@st.composite
def valid_relative(draw):
    """A relative action meant to be accepted, in one of the forms an agent sends (edges of [-1, 1] included)."""
    body = draw(st.lists(st.one_of(st.floats(-1, 1), st.sampled_from([-1.0, 1.0, 0.0, -0.0, 5e-324, 0.999999])),
                         min_size=6, max_size=6))
    values = [*body, draw(st.sampled_from([1.0, -1.0, 1, -1]))]
    form = draw(st.sampled_from(["list", "tuple", "float64", "float32", "int", "dict"]))
    if form == "int":
        return [int(round(v)) for v in values]
    if form in ("float64", "float32"):
        return np.array(values, dtype=form)
    if form == "dict":
        return {"type": "cartesian_rel", "action": values}
    return tuple(values) if form == "tuple" else values


actions = st.one_of(
    valid_relative(),  # accepted inputs: stepped, so their observations are checked too
    valid_relative(),
    plausible_absolute(),
    action_vectors(7),  # a relative action, sometimes with bad values
    action_vectors(),
    dict_actions(),
    plausible_absolute(),
    numpy_payloads(),
    st.tuples(action_vectors(3), action_vectors(4), gripper_values),
    nested,
    scalars,
    st.sampled_from([None, {}, [], (), "0 0 0 0 0 0 1", b"\x00" * 7, set(), {"action": None, "type": None}]),
)

# -- validate_action ---------------------------------------------------------------------------------------------

_NOT_NUMBERS = (str, bytes, bool, np.bool_, complex, np.complexfloating, np.str_, np.bytes_, type(None))


def _only_real_numbers(value: Any, depth: int = 0) -> bool:
    """Independent oracle: ``value`` is built only from real numbers (ints, floats, numpy real scalars or arrays,
    objects with ``__float__``), never from strings, bytes, bools, complex numbers or None."""
    if depth > 50:
        return False
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            return all(_only_real_numbers(v, depth + 1) for v in value.ravel())
        return value.dtype.kind in "fiu"
    if isinstance(value, _NOT_NUMBERS) or isinstance(value, np.generic) and value.dtype.kind not in "fiu":
        return False
    if isinstance(value, Mapping):
        return _only_real_numbers(value.get("action"), depth + 1)
    if isinstance(value, (list, tuple)):
        return all(_only_real_numbers(v, depth + 1) for v in value)
    return isinstance(value, (int, float, np.integer, np.floating)) or hasattr(value, "__float__")


def check_validated(action: Any, result: dict) -> str | None:
    """What is wrong with an accepted action's normalised form (None: nothing)."""
    if not isinstance(result, dict) or set(result) != {"type", "action"} or result["type"] not in ACTION_TYPES:
        return f"unexpected result {result!r}"
    arr = result["action"]
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float64 or arr.ndim != 1:
        return f"the action is not a flat float64 array: {arr!r}"
    if arr.shape[0] not in ACTION_TYPES[result["type"]]:
        return f"{result['type']} with {arr.shape[0]} values"
    if not np.isfinite(arr).all():
        return f"non-finite values accepted: {arr.tolist()}"
    if arr[-1] not in (-1.0, 1.0):
        return f"gripper {arr[-1]!r} accepted"
    if result["type"] == "cartesian_rel" and np.abs(arr[:6]).max(initial=0) > 1.0:
        return f"relative values beyond [-1, 1] accepted: {arr.tolist()}"
    if result["type"] == "cartesian_abs" and not ((layout.WORKSPACE_LOW_M <= arr[:3]).all()
                                                  and (arr[:3] <= layout.WORKSPACE_HIGH_M).all()):
        return f"an absolute target outside the workspace accepted: {arr.tolist()}"
    if result["type"].startswith("joint") and np.abs(arr[:7]).max() > layout.MAX_JOINT_ACTION_RAD:
        return f"joint values beyond {layout.MAX_JOINT_ACTION_RAD} rad accepted: {arr.tolist()}"
    if not _only_real_numbers(action):
        return "accepted an action that is not made of real numbers"
    if isinstance(action, np.ndarray) and np.shares_memory(arr, action):
        return "the result aliases the caller's array"
    return None


def check_validate_action(action: Any) -> tuple[str, str]:
    def run() -> tuple[str, str]:
        try:
            result = validate_action(action)
        except InvalidActionError as err:
            return CLEAR, _error(err)
        except Exception as err:
            return CRASH, _error(err)
        problem = check_validated(action, result)
        return (GARBAGE, problem) if problem else (OK, result["type"])

    return _time_limited(run, EXAMPLE_LIMIT_S["validate_action"])


def test_fuzz_validate_action(fuzz_counts):
    run_property("validate_action", actions, check_validate_action, fuzz_counts["validate_action"])


# -- the env, in a worker process --------------------------------------------------------------------------------

ENV_KWARGS = dict(static_size=32, gripper_size=32, cameras=("static",), seed=0)
RESET_EVERY = 50  # steps between re-centring resets (accepted steps drift the arm)
AFTER_RESET_STEPS = 2  # zero-action steps after each accepted reset (a joint at 9e307 turned NaN on the first one)


def _env_state(env) -> tuple:
    obs = env.get_obs()
    r = env.robot
    return (np.array(obs["robot_obs"], dtype=float), np.array(obs["scene_obs"], dtype=float),
            np.array(r.target_pos, dtype=float), np.array(r.target_orn, dtype=float), r.gripper_action,
            copy.deepcopy(env.rng.bit_generator.state))


def _same_state(a: tuple, b: tuple) -> bool:
    arrays_equal = all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a[:4], b[:4]))
    return arrays_equal and a[4] == b[4] and a[5] == b[5]


def _obs_problem(obs: dict) -> str | None:
    robot, scene = np.asarray(obs["robot_obs"]), np.asarray(obs["scene_obs"])
    if robot.shape != (15,) or scene.shape != (24,):
        return f"observation shapes {robot.shape}, {scene.shape}"
    if not (np.isfinite(robot).all() and np.isfinite(scene).all()):
        return f"non-finite observation: robot_obs {robot.tolist()}, scene_obs {scene.tolist()}"
    rgb = obs["rgb_obs"]["rgb_static"]
    size = ENV_KWARGS["static_size"]
    if rgb.dtype != np.uint8 or rgb.shape != (size, size, 3):
        return f"rgb_static {rgb.dtype} {rgb.shape}"
    depth = obs["depth_obs"]["depth_static"]
    if not np.isfinite(depth).all():
        return "non-finite depth"
    return None


def _env_step_check(env, action) -> tuple[str, str]:
    before = _env_state(env)
    try:
        obs, _, _, _ = env.step(action)
    except InvalidActionError as err:
        return (CLEAR, _error(err)) if _same_state(before, _env_state(env)) else \
            (LOST, f"a refused action changed the env's state ({_error(err)})")
    except Exception as err:
        return CRASH, _error(err)
    problem = _obs_problem(obs)
    if problem is None and not _only_real_numbers(action):
        problem = "stepped an action that is not made of real numbers"
    return (GARBAGE, problem) if problem else (OK, "stepped")


def _env_reset_check(env, given_input) -> tuple[str, str]:
    robot_obs, scene_obs, strict = given_input
    before = _env_state(env)
    try:
        obs = env.reset(robot_obs, scene_obs, strict=strict)
    except (InvalidStateError, ValueError) as err:
        return (CLEAR, _error(err)) if _same_state(before, _env_state(env)) else \
            (LOST, f"a refused reset changed the env's state ({_error(err)})")
    except Exception as err:
        return CRASH, _error(err)
    problem = _obs_problem(obs)
    for _ in range(AFTER_RESET_STEPS if problem is None else 0):  # an accepted state must stay simulable
        try:
            obs, _, _, _ = env.step([0.0] * 6 + [1.0])
        except Exception as err:
            return CRASH, f"a step after the accepted reset failed: {_error(err)}"
        problem = _obs_problem(obs)
        if problem:
            problem = f"after an accepted reset and a step: {problem}"
    if problem is None and (strict or (strict is None and env.strict_reset)):
        for state, low, high, name in ((robot_obs, ROBOT_OBS_LOW, ROBOT_OBS_HIGH, "robot_obs"),
                                       (scene_obs, SCENE_OBS_LOW, SCENE_OBS_HIGH, "scene_obs")):
            if state is not None:
                arr = np.asarray(state, dtype=float)
                if ((arr < low) | (arr > high)).any():
                    problem = f"a strict reset accepted {name} outside the strict bounds: {arr.tolist()}"
    if problem is None:
        for state in (robot_obs, scene_obs):
            if state is not None and not _only_real_numbers(state):
                problem = f"reset accepted a state that is not made of real numbers: {state!r}"
    return (GARBAGE, problem) if problem else (OK, "reset, stepped")


def _env_server(conn, env_kwargs: dict) -> None:
    from sim_eval.world.playtable.env import PlayTableEnv

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C and kills this process
    env = PlayTableEnv(**env_kwargs)
    neutral, scene = layout.NEUTRAL_ROBOT_OBS.copy(), env.sample_scene_obs()
    env.reset(neutral, scene)
    conn.send(("ready", ""))
    steps = 0
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        kind, payload = msg
        try:
            if kind == "step":
                result = _env_step_check(env, payload)
                steps += 1
                if steps % RESET_EVERY == 0:
                    env.reset(neutral, scene)
            else:
                result = _env_reset_check(env, payload)
        except BaseException as err:  # a failure of the check itself (state read-back): report, never die silently
            result = (CRASH, f"in the check: {_error(err)}")
        conn.send(result)


class EnvWorker:
    """A ``PlayTableEnv`` in a forked child process. ``call`` waits at most ``limit_s``; a call that does not return
    in time (pybullet's C loops hold the GIL and ignore signals) kills the child, is a hang, and a new child starts
    for the next call. A child that dies (a segfault) is a crash."""

    def __init__(self, limit_s: float, env_kwargs: Mapping | None = None):
        self.limit_s = limit_s
        self.env_kwargs = dict(env_kwargs or ENV_KWARGS)
        self.proc = None
        self.conn = None
        self.restarts = 0

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_env_server, args=(child, self.env_kwargs), daemon=True)
        self.proc.start()
        child.close()
        try:
            if not self.conn.poll(120):
                raise EOFError
            self.conn.recv()
        except (EOFError, OSError):
            self.close()
            raise RuntimeError("the env worker did not start within 120 s (its traceback, if any, is above)") from None

    def call(self, kind: str, payload: Any) -> tuple[str, str]:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        try:
            self.conn.send((kind, payload))
        except Exception as err:  # an input that cannot be pickled (none of our strategies makes one)
            return CRASH, f"cannot send the input to the worker: {_error(err)}"
        try:
            if self.conn.poll(self.limit_s):
                return self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.exitcode if self.proc.join(5) is None else None
            self._kill()
            return CRASH, f"the env process died (exit code {code})"
        self._kill()
        return HANG, f"{kind} did not return within {self.limit_s:g} s (the worker was killed)"

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(10)
        if self.conn is not None:
            self.conn.close()
        self.proc, self.conn = None, None
        self.restarts += 1

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(10)
            except (OSError, BrokenPipeError):
                pass
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.proc, self.conn = None, None


@pytest.fixture(scope="module")
def env_worker():
    worker = EnvWorker(EXAMPLE_LIMIT_S["env_step"])
    yield worker
    worker.close()


@pytest.mark.timeout(600)
def test_fuzz_env_step(env_worker, fuzz_counts):
    run_property("env_step", actions, lambda a: env_worker.call("step", a), fuzz_counts["env_step"])


def _base_scene() -> np.ndarray:
    """A valid scene: doors closed, lights off, blocks on the table (the env's own sampler, seed 0)."""
    from sim_eval.world.playtable.env import PlayTableEnv

    return PlayTableEnv.sample_scene_obs(None, np.random.default_rng(0))


@st.composite
def state_vectors(draw, base: np.ndarray):
    """A state vector: the valid ``base`` with a few values replaced, or one of another length, dtype or form."""
    form = draw(st.sampled_from(["mutated"] * 4 + ["near"] * 3 + ["none", "length", "numpy", "scalars", "nested"]))
    n = base.shape[0]
    if form == "none":
        return None
    if form == "length":
        m = draw(st.sampled_from([0, 1, n - 1, n + 1, 2 * n, 7, 15, 24, 39]))
        return draw(st.lists(st.floats(-1, 1), min_size=m, max_size=m))
    if form == "numpy":
        return draw(numpy_payloads(lengths=(n, n, n, n - 1, n + 1)))
    if form == "scalars":
        return draw(st.lists(scalars, min_size=n, max_size=n))
    if form == "nested":
        return draw(nested)
    arr = base.copy()
    if form == "near":  # small moves of every value (light states kept): mostly accepted states
        arr = arr + np.array(draw(st.lists(st.floats(-0.05, 0.05), min_size=n, max_size=n)))
        if n == layout.SCENE_OBS_DIM:
            arr[[layout.LIGHTBULB_IDX, layout.LED_IDX]] = draw(st.sampled_from([(0, 0), (1, 0), (0, 1), (1, 1)]))
        else:
            arr[-1] = draw(st.sampled_from([1.0, -1.0, 0.3]))
    for _ in range(draw(st.integers(0, 3)) if form == "mutated" else 0):
        i = draw(st.integers(0, n - 1))
        arr[i] = draw(st.one_of(floats_any, st.floats(-10, 10), st.just(base[i] + draw(st.floats(-0.2, 0.2)))))
    as_form = draw(st.sampled_from(["array", "list", "array32"]))
    if as_form == "array32":
        with np.errstate(over="ignore"):  # huge values become inf: part of the input
            return arr.astype(np.float32)
    return arr if as_form == "array" else arr.tolist()


def reset_inputs(scene: np.ndarray) -> st.SearchStrategy:
    return st.tuples(state_vectors(layout.NEUTRAL_ROBOT_OBS.copy()), state_vectors(scene),
                     st.sampled_from([None, False, True]))


@pytest.mark.timeout(600)
def test_fuzz_env_reset(env_worker, fuzz_counts):
    run_property("env_reset", reset_inputs(_base_scene()), lambda x: env_worker.call("reset", x),
                 fuzz_counts["env_reset"])


# -- the policy --------------------------------------------------------------------------------------------------


def build_policies() -> list:
    """Tiny untrained-but-fitted DiT policies: goal-conditioned (rel_ee), language-conditioned, joint-space."""
    import torch
    from _policy_fixtures import fake_stats, tiny_config

    from policies.dit import DiTPolicy
    from policies.shortcut import ShortcutConfig

    torch.manual_seed(0)
    out = []
    for overrides, stats in (({}, fake_stats()),
                             (dict(use_goal=False, use_language=True), fake_stats()),
                             (dict(action_space="joint_abs"), fake_stats(8, "joint_actions"))):
        policy = DiTPolicy(tiny_config(**overrides), ShortcutConfig())
        policy.fit_normalizer(stats)
        policy.eval()
        out.append(policy)
    return out


@st.composite
def images(draw, size: int = 32):
    kind = draw(st.sampled_from(["valid", "valid", "valid", "array", "other"]))
    if kind == "valid":
        return draw(hnp.arrays(np.uint8, (size, size, 3), elements=st.integers(0, 255), fill=st.integers(0, 255)))
    if kind == "other":
        return draw(st.one_of(st.none(), st.lists(st.integers(0, 255), max_size=4), st.text(max_size=3), objects))
    shape = draw(st.one_of(st.sampled_from([(size, size, 3), (size, size), (size, size, 4), (3, size, size),
                                            (1, size, size, 3), (0,), (2 * size, 2 * size, 3), (size, size, 1),
                                            (8, 8, 3), ()]),
                           hnp.array_shapes(min_dims=0, max_dims=4, max_side=6)))
    dtype = draw(st.sampled_from(["uint8", "float32", "float64", "int64", "bool", "int8", "uint16", "float16",
                                  "complex64", "<U1"]))
    size_ok = int(np.prod(shape)) <= 40000
    if not size_ok:
        shape = (size, size, 3)
    if np.dtype(dtype).kind == "f":
        return draw(hnp.arrays(dtype, shape, elements=st.floats(allow_nan=True, allow_infinity=True,
                                                                 width=16 if dtype == "float16" else 32),
                               fill=st.floats(0, 1, width=16 if dtype == "float16" else 32)))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def proprios(draw):
    kind = draw(st.sampled_from(["valid", "valid", "mutated", "mutated", "huge", "array", "other"]))
    base = np.random.default_rng(draw(st.integers(0, 3))).normal(size=15)
    if kind == "valid":
        return base.astype(draw(st.sampled_from([np.float32, np.float64])))
    if kind in ("mutated", "huge"):
        values = floats_any if kind == "mutated" else st.sampled_from([1e6, 1e10, 1e19, 1e30, 3e38, 1e300, -1e30,
                                                                       1e5, 1e7])
        for _ in range(draw(st.integers(1, 4))):
            base[draw(st.integers(0, 14))] = draw(values)
        return base if draw(st.booleans()) else base.tolist()
    if kind == "array":
        return draw(numpy_payloads(lengths=(15, 15, 14, 16, 0, 30)))
    return draw(st.one_of(scalars, nested))


POLICY_FIELDS = ("images", "proprio", "goal", "instruction", "t", "n_steps")


def policy_inputs() -> st.SearchStrategy:
    """(policy index, images, proprio, goal, instruction, t, n_steps): valid inputs with none, one or every field
    fuzzed (valid ones run the whole sampler, so their chunks are checked too)."""

    @st.composite
    def build(draw):
        which = draw(st.integers(0, 2))
        mode = draw(st.sampled_from(["valid", "one", "one", "one", "all"]))
        bad = set(POLICY_FIELDS) if mode == "all" else {draw(st.sampled_from(POLICY_FIELDS))} if mode == "one" \
            else set()
        valid_image = hnp.arrays(np.uint8, (32, 32, 3), elements=st.integers(0, 255), fill=st.integers(0, 255))
        cams = ["rgb_static", "rgb_gripper"]
        if "images" in bad:
            imgs = {c: draw(images()) for c in cams if draw(st.integers(0, 15))}
            if not draw(st.integers(0, 9)):
                imgs[draw(st.sampled_from(["rgb_extra", "depth_static", ""]))] = draw(images())
            if not draw(st.integers(0, 20)):
                imgs = draw(st.one_of(st.none(), st.lists(st.integers(), max_size=2), st.text(max_size=2)))
        else:
            imgs = {c: draw(valid_image) for c in cams}
        if "proprio" in bad:
            proprio = draw(proprios())
        else:  # a real-looking state, sometimes far outside the (fake) training statistics but plausible
            proprio = np.random.default_rng(draw(st.integers(0, 99))).normal(size=15) * draw(
                st.sampled_from([1.0, 1.0, 10.0, 1e3]))
            proprio = proprio.astype(draw(st.sampled_from([np.float32, np.float64])))
        if "goal" in bad:
            goal = draw(st.one_of(st.none(), images()))
        else:
            goal = None if which == 1 else draw(valid_image)
        if "instruction" in bad:
            instruction = draw(st.one_of(st.none(), st.just(""), st.just("   "), st.text(max_size=20), st.integers(),
                                         st.lists(st.text(max_size=3), max_size=2)))
        else:
            instruction = draw(st.one_of(st.just("open the drawer"), st.text(min_size=1, max_size=30).filter(
                str.strip))) if which == 1 else draw(st.one_of(st.none(), st.just("open the drawer")))
        t = draw(st.one_of(st.integers(-1, 2**70), st.sampled_from([1.5, math.nan, None, "3", True]))) \
            if "t" in bad else draw(st.integers(0, 1000))
        n_steps = draw(st.sampled_from([0, -1, 3, 128, 256, 1.0, "2", True, 2**70])) if "n_steps" in bad else \
            draw(st.sampled_from([None, 1, 2, 4]))
        return which, imgs, proprio, goal, instruction, t, n_steps

    return build()


def _snapshot(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snapshot(v) for v in value]
    return value


def _unchanged(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        if not (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if a.dtype.kind == "O":  # NaN != NaN inside object arrays: compare the items' reprs
            return [repr(v) for v in a.ravel()] == [repr(v) for v in b.ravel()]
        return np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_unchanged(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_unchanged(x, y) for x, y in zip(a, b))
    return True


def make_policy_check(policies: list) -> Callable[[Any], tuple[str, str]]:
    import torch

    from ghil.types import Observation

    def check(given_input) -> tuple[str, str]:
        which, imgs, proprio, goal, instruction, t, n_steps = given_input
        policy = policies[which]
        before = _snapshot([imgs, proprio, goal])

        def run() -> tuple[str, str]:
            try:
                obs = Observation(images=imgs, proprio=proprio, t=t, instruction=instruction)
                chunk = policy.predict_chunk(obs, goal, n_steps=n_steps, generator=torch.Generator().manual_seed(0))
            except (ValueError, TypeError, KeyError) as err:
                return CLEAR, _error(err)
            except Exception as err:
                return CRASH, _error(err)
            a = chunk.actions
            cfg = policy.config
            if tuple(a.shape) != (cfg.chunk_len, cfg.action_dim) or a.dtype != torch.float32:
                return GARBAGE, f"chunk {tuple(a.shape)} {a.dtype}"
            if not torch.isfinite(a).all():
                return GARBAGE, "non-finite actions"
            space = policy.space
            low, high = ((torch.tensor(space.low), torch.tensor(space.high)) if space.low is not None
                         else policy.normalizer.bounds("actions"))
            g = a[:, space.gripper_index]
            arm = [i for i in range(cfg.action_dim) if i != space.gripper_index]
            if ((a[:, arm] < low[arm]) | (a[:, arm] > high[arm])).any():
                return GARBAGE, f"actions outside the action space's range: {a.tolist()}"
            if not ((g == 1.0) | (g == -1.0)).all():
                return GARBAGE, f"gripper not exactly +-1: {g.tolist()}"
            if chunk.t0 != int(t):
                return GARBAGE, f"t0 {chunk.t0} for t {t!r}"
            if not _only_real_numbers(proprio):
                return GARBAGE, "acted on a proprio that is not made of real numbers"
            return OK, "chunk"

        outcome, detail = _time_limited(run, EXAMPLE_LIMIT_S["policy"])
        changed = [name for name, old, new in zip(("images", "proprio", "goal"), before, (imgs, proprio, goal))
                   if not _unchanged(old, new)]
        if outcome in GOOD and changed:
            return LOST, f"predict_chunk modified the caller's {changed} ({outcome}: {detail})"
        return outcome, detail

    return check


@pytest.fixture(scope="module")
def policies():
    pytest.importorskip("torch")
    import torch

    torch.set_num_threads(1)
    return build_policies()


@pytest.mark.timeout(600)
def test_fuzz_policy(policies, fuzz_counts):
    run_property("policy", policy_inputs(), make_policy_check(policies), fuzz_counts["policy"])


# -- the dataset loader -----------------------------------------------------------------------------------------


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class DatasetFixture:
    """A synthetic dataset written once; each check damages some of its frame files, reads every sample, then
    restores them."""

    def __init__(self, root: Path):
        from _policy_fixtures import write_synthetic_dataset

        from ghil.data.calvin_format import frame_file_name

        self.root = write_synthetic_dataset(root, n_episodes=2, frames_per_episode=8)
        self.split = self.root / "training"
        self.frames = sorted(self.split.glob("episode_*.npz"))
        self.original = {p: p.read_bytes() for p in self.frames}
        self.arrays = {p: dict(np.load(p)) for p in self.frames}
        self.digest = _tree_digest(self.root)
        self.reference = self._read_all()
        assert frame_file_name(0) == self.frames[0].name

    def _read_all(self):
        from ghil.data.calvin_dataset import CalvinDataset

        ds = CalvinDataset(self.root, "training", window_len=1, goal_horizon=(0, 4))
        return [ds[i] for i in range(len(ds))]

    def restore(self) -> None:
        for p, data in self.original.items():
            if not p.exists() or p.read_bytes() != data:
                p.write_bytes(data)


@st.composite
def dataset_damage(draw, n_frames: int):
    """A list of (frame index, damage) pairs: 1 or 2 damaged frames."""
    out = []
    for _ in range(draw(st.integers(1, 2))):
        frame = draw(st.sampled_from([0, 0, 1, n_frames // 2, n_frames - 1, draw(st.integers(0, n_frames - 1))]))
        kind = draw(st.sampled_from(["truncate", "flip", "flip", "remove_key", "replace", "replace", "extra_key",
                                     "empty", "garbage"]))
        if kind == "truncate":
            damage = ("truncate", draw(st.floats(0, 1, exclude_max=True)))
        elif kind == "flip":
            damage = ("flip", draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                            min_size=1, max_size=4)))
        elif kind == "remove_key":
            damage = ("remove_key", draw(st.sampled_from(["rgb_static", "rgb_gripper", "robot_obs", "scene_obs",
                                                          "actions", "rel_actions", "joint_actions"])))
        elif kind == "replace":
            key = draw(st.sampled_from(["rgb_static", "rgb_gripper", "robot_obs", "scene_obs", "actions",
                                        "rel_actions"]))
            value = draw(st.one_of(numpy_payloads(lengths=(7, 15, 24, 0, 8)), images(),
                                   st.sampled_from(["nan", "scaled", "gripper"])))
            damage = ("replace", key, value)
        elif kind == "extra_key":
            damage = ("extra_key", draw(st.sampled_from(["junk", "rgb_tactile", "depth_static"])))
        else:
            damage = (kind, draw(st.binary(max_size=64)))
        out.append((frame, damage))
    return out


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _apply_damage(fx: DatasetFixture, frame: int, damage: tuple) -> tuple[Path, dict[str, np.ndarray] | None]:
    """Damage one frame file; returns it and the arrays a reader must then see if it accepts the file (None when
    the file's content must be refused or read as the original)."""
    path = fx.frames[frame]
    data = fx.original[path]  # each damage starts from the stored file (a later one on the same frame replaces it)
    kind = damage[0]
    if kind == "truncate":
        path.write_bytes(data[: int(damage[1] * len(data))])
        return path, None
    if kind == "flip":
        buf = bytearray(data)
        for pos, xor in damage[1]:
            buf[int(pos * len(buf))] ^= xor
        path.write_bytes(bytes(buf))
        return path, None
    if kind in ("empty", "garbage"):
        path.write_bytes(b"" if kind == "empty" else damage[1])
        return path, None
    arrays = {k: v.copy() for k, v in fx.arrays[path].items()}  # the original arrays (an earlier damage aside)
    if kind == "remove_key":
        arrays.pop(damage[1], None)
    elif kind == "extra_key":
        arrays[damage[1]] = np.zeros((4, 4, 3), np.uint8)
    else:
        _, key, value = damage
        if isinstance(value, str):  # value edits on the right shape and dtype
            arr = arrays[key].copy()
            if value == "nan" and arr.dtype.kind == "f":
                arr.flat[0] = np.nan
            elif value == "scaled" and arr.dtype.kind == "f":
                arr = arr * 1e6
            elif value == "gripper" and key in ("actions", "rel_actions", "robot_obs"):
                arr[{"robot_obs": 14}.get(key, 6)] = 0.5
            value = arr
        if isinstance(value, np.ndarray) and value.dtype.kind == "O":
            value = np.zeros(3)  # np.savez(allow_pickle) would pickle it; the reader refuses pickles anyway
        if not isinstance(value, np.ndarray):
            value = np.asarray(value) if value is not None else np.zeros(0)
            if value.dtype.kind == "O":
                value = np.zeros(3)
        arrays[key] = value
    path.write_bytes(_npz_bytes(arrays))
    return path, arrays


def make_dataset_check(fx: DatasetFixture) -> Callable[[Any], tuple[str, str]]:
    from ghil.data.calvin_dataset import CalvinDataset
    from ghil.data.calvin_format import DatasetError

    def check(damages) -> tuple[str, str]:
        fx.restore()
        damaged: dict[Path, dict | None] = {}
        for frame, damage in damages:
            path, arrays = _apply_damage(fx, frame, damage)
            damaged[path] = arrays
        digest = _tree_digest(fx.root)

        def run() -> tuple[str, str]:
            try:
                ds = CalvinDataset(fx.root, "training", window_len=1, goal_horizon=(0, 4))
                samples = [ds[i] for i in range(len(ds))]
            except DatasetError as err:
                named = [p.name for p in damaged if p.name in str(err)]
                return (CLEAR, _error(err)) if named else \
                    (CRASH, f"a DatasetError that names none of the damaged files {sorted(p.name for p in damaged)}:"
                            f" {_error(err)}")
            except Exception as err:
                return CRASH, _error(err)
            if len(samples) != len(fx.reference):
                return GARBAGE, f"{len(samples)} samples instead of {len(fx.reference)}"
            for sample, ref in zip(samples, fx.reference):
                for key, ref_value in ref.items():
                    value = sample[key]
                    expected = ref_value
                    name = key.removeprefix("goal_")
                    if key != "goal_frame_id" and name in fx.arrays[fx.frames[0]]:
                        fid = int(sample["goal_frame_id"] if key.startswith("goal_") else sample["frame_ids"][0])
                        arrays = damaged.get(fx.frames[fid])
                        if arrays is not None:
                            if name not in arrays:
                                return GARBAGE, f"{key!r} returned although its frame file no longer stores it"
                            expected = arrays[name] if key.startswith("goal_") else arrays[name][None]
                    value, expected = np.asarray(value), np.asarray(expected)
                    if value.shape != expected.shape or value.dtype != expected.dtype or \
                            not np.array_equal(value, expected, equal_nan=value.dtype.kind == "f"):
                        return GARBAGE, f"sample key {key!r} differs from the stored data without an error"
                    if value.dtype.kind == "f" and not np.isfinite(value).all():
                        return GARBAGE, f"non-finite {key!r} returned"
            return OK, "read"

        outcome, detail = _time_limited(run, EXAMPLE_LIMIT_S["dataset"])
        if _tree_digest(fx.root) != digest:
            outcome, detail = LOST, "reading the dataset changed or deleted files in it"
        fx.restore()
        return outcome, detail

    return check


@pytest.fixture(scope="module")
def dataset_fixture(tmp_path_factory):
    pytest.importorskip("torch")  # _policy_fixtures imports it
    return DatasetFixture(tmp_path_factory.mktemp("fuzz_data") / "ds")


@pytest.mark.timeout(600)
def test_fuzz_dataset(dataset_fixture, fuzz_counts):
    run_property("dataset", dataset_damage(len(dataset_fixture.frames)), make_dataset_check(dataset_fixture),
                 fuzz_counts["dataset"])


# -- checkpoint loading ------------------------------------------------------------------------------------------


class CheckpointFixture:
    """A tiny saved checkpoint, its weights and its reference outputs; each check damages a copy."""

    def __init__(self, folder: Path):
        import torch
        from _policy_fixtures import fake_batch, fake_stats, tiny_config

        from policies.dit import DiTPolicy
        from policies.shortcut import ShortcutConfig

        torch.manual_seed(0)
        policy = DiTPolicy(tiny_config(), ShortcutConfig())
        policy.fit_normalizer(fake_stats())
        self.folder = policy.save_pretrained(folder / "ckpt")
        self.scratch = folder / "scratch"
        self.config_text = (self.folder / "config.json").read_text()
        self.config = json.loads(self.config_text)
        self.weights = (self.folder / "model.safetensors").read_bytes()
        self.state = {k: v.clone() for k, v in policy.state_dict().items()}
        self.batch = fake_batch(policy.config, b=2)
        self.reference = self.outputs(policy)

    def outputs(self, policy):
        import torch

        b = self.batch
        return policy.sample_actions(b.images, b.goal, b.proprio, None, None, torch.Generator().manual_seed(0))


def _json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _json_paths(v, (*prefix, i))
    return out


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.integers(-3, 200),
                                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6)),
                           lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c,
                                                                                        max_size=2)), max_leaves=4)


@st.composite
def checkpoint_damage(draw, config: dict):
    target = draw(st.sampled_from(["config_edit", "config_edit", "config_bytes", "weights_flip", "weights_flip",
                                   "weights_truncate", "weights_random", "weights_header"]))
    if target == "config_edit":
        paths = _json_paths(config)
        edits = []
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths))
            op = draw(st.sampled_from(["set", "set", "delete", "add", "bump", "bump"]))
            value = draw(json_values) if op in ("set", "add") else draw(st.sampled_from([1, -1, 2, 0.5, 1e-9]))
            edits.append((path, op, value, draw(st.text(min_size=1, max_size=6))))
        return ("config_edit", edits)
    if target == "config_bytes":
        return ("config_bytes", draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                              min_size=1, max_size=3)))
    if target == "weights_flip":
        return ("weights_flip", draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                              min_size=1, max_size=3)))
    if target == "weights_header":  # flips inside the 8-byte length + JSON header
        return ("weights_header", draw(st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), min_size=1,
                                                max_size=3)))
    if target == "weights_truncate":
        return ("weights_truncate", draw(st.floats(0, 1, exclude_max=True)))
    return ("weights_random", draw(st.binary(max_size=256)))


def _edit_json(config: dict, edits: list) -> Any:
    root: Any = copy.deepcopy(config)
    for path, op, value, new_key in edits:
        holder, key = None, None
        node = root
        try:
            for k in path:
                holder, key, node = node, k, node[k]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this path
        if op == "set":
            if holder is None:
                root = value
            else:
                holder[key] = value
        elif op == "delete" and holder is not None:
            del holder[key]
        elif op == "add" and isinstance(node, dict):
            node[new_key] = value
        elif op == "bump" and holder is not None and isinstance(node, (int, float)) and not isinstance(node, bool):
            holder[key] = node + value
    return root


def make_checkpoint_check(fx: CheckpointFixture) -> Callable[[Any], tuple[str, str]]:
    import torch

    from ghil.checkpoint import CheckpointError, load_pretrained

    def check(damage) -> tuple[str, str]:
        if fx.scratch.exists():
            shutil.rmtree(fx.scratch)
        shutil.copytree(fx.folder, fx.scratch)
        config_file, weights_file = fx.scratch / "config.json", fx.scratch / "model.safetensors"
        kind = damage[0]
        if kind == "config_edit":
            config_file.write_text(json.dumps(_edit_json(fx.config, damage[1])))
        elif kind == "config_bytes":
            buf = bytearray(fx.config_text.encode())
            for pos, xor in damage[1]:
                buf[int(pos * len(buf))] ^= xor
            config_file.write_bytes(bytes(buf))
        elif kind in ("weights_flip", "weights_header"):
            buf = bytearray(fx.weights)
            for pos, xor in damage[1]:
                buf[int(pos * len(buf)) if kind == "weights_flip" else min(pos, len(buf) - 1)] ^= xor
            weights_file.write_bytes(bytes(buf))
        elif kind == "weights_truncate":
            weights_file.write_bytes(fx.weights[: int(damage[1] * len(fx.weights))])
        else:
            weights_file.write_bytes(damage[1])
        digest = _tree_digest(fx.scratch)

        def run() -> tuple[str, str]:
            try:
                model = load_pretrained(fx.scratch)
            except CheckpointError as err:
                return CLEAR, _error(err)
            except Exception as err:
                return CRASH, _error(err)
            state = model.state_dict()
            if state.keys() != fx.state.keys() or any(not torch.equal(state[k], fx.state[k]) for k in state):
                return GARBAGE, "the loaded weights differ from the saved ones"
            try:
                out = fx.outputs(model)
            except Exception as err:
                return CRASH, f"the loaded model cannot run: {_error(err)}"
            if out.shape != fx.reference.shape or not torch.equal(out, fx.reference):
                return GARBAGE, "the loaded model's outputs differ from the saved model's"
            return OK, "loaded"

        outcome, detail = _time_limited(run, EXAMPLE_LIMIT_S["checkpoint"])
        if _tree_digest(fx.scratch) != digest:
            outcome, detail = LOST, "loading changed files of the checkpoint"
        return outcome, detail

    return check


@pytest.fixture(scope="module")
def checkpoint_fixture(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import torch

    torch.set_num_threads(1)
    return CheckpointFixture(tmp_path_factory.mktemp("fuzz_ckpt"))


@pytest.mark.timeout(600)
def test_fuzz_checkpoint(checkpoint_fixture, fuzz_counts):
    run_property("checkpoint", checkpoint_damage(checkpoint_fixture.config), make_checkpoint_check(checkpoint_fixture),
                 fuzz_counts["checkpoint"])


# -- sizes as a fixture ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fuzz_counts(request) -> dict[str, int]:
    long = bool(request.config.getoption("--fuzz-long", default=False))
    return example_counts(long)


def test_sizes_are_bounded_in_ci_and_long_on_request(monkeypatch):
    """The default run is small; the long one meets the issue's sizes (10,000 actions, 1,000 of each other)."""
    monkeypatch.delenv("GHIL_FUZZ_EXAMPLES", raising=False)
    monkeypatch.delenv("GHIL_FUZZ_LONG", raising=False)
    assert example_counts(False) == CI_EXAMPLES
    long = example_counts(True)
    assert long["env_step"] >= 10000 and min(long.values()) >= 1000
    monkeypatch.setenv("GHIL_FUZZ_EXAMPLES", "7")
    assert set(example_counts(False).values()) == {7}


# -- the defects this suite found, each reproduced ---------------------------------------------------------------


def test_a_bool_among_numbers_is_not_an_action():
    """numpy turns [0.0, ..., True] into floats: the bool gripper was accepted as +1 (the module doc says bools are
    refused)."""
    for action in ([0.0] * 6 + [True], (0, 0, 0, 0, 0, 0, np.bool_(False)),
                   {"type": "joint_abs", "action": [0.0] * 7 + [True]}, ([0.3, 0.0, 0.5], [0.0, 0.0, 0.0], True)):
        with pytest.raises(InvalidActionError, match="bool"):
            validate_action(action)
    assert validate_action([0.0] * 6 + [1])["action"][-1] == 1.0  # an int gripper stays valid


def test_an_object_that_fails_to_convert_is_an_invalid_action():
    """An item whose __float__ (or an object whose __array__) raises RuntimeError escaped as a RuntimeError."""
    for action in (BadFloat("RuntimeError"), [0.0] * 6 + [BadFloat("RuntimeError")], BadArray("array"),
                   {"type": "cartesian_rel", "action": BadArray("array")}):
        with pytest.raises(InvalidActionError, match="RuntimeError"):
            validate_action(action)


def test_extreme_finite_proprio_is_refused_as_such_not_blamed_on_the_weights(policies):
    """Issue 10: proprio 1e30 overflowed inside the network and raised FloatingPointError "(corrupted weights?)"; 1e300
    passed the float64 finiteness check and became inf in float32."""
    import torch

    from ghil.types import Observation

    policy = policies[0]
    img = np.zeros((32, 32, 3), np.uint8)
    for value, message in ((1e30, "not a plausible robot state"), (1e7, "not a plausible robot state"),
                           (1e300, "beyond float32")):
        proprio = np.zeros(15)
        proprio[3] = value
        with pytest.raises(ValueError, match=message):
            policy.predict_chunk(Observation(images={"rgb_static": img, "rgb_gripper": img}, proprio=proprio), img)
    proprio = np.full(15, 1e3)  # far outside the data but a number the network handles: still acts
    chunk = policy.predict_chunk(Observation(images={"rgb_static": img, "rgb_gripper": img}, proprio=proprio), img,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(chunk.actions).all()


def test_an_image_that_fails_to_convert_is_a_type_error(policies):
    from ghil.types import Observation

    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(TypeError, match="image 'rgb_gripper'"):
        policies[0].predict_chunk(Observation(images={"rgb_static": img, "rgb_gripper": BadArray("array")},
                                              proprio=np.zeros(15)), img)


def test_a_first_frame_missing_a_promised_key_is_a_dataset_error_naming_it(dataset_fixture):
    """A key the stored FrameSpec promises, missing from the first frame, was a KeyError "not stored in <split>" (as
    for a key the dataset never had), not a DatasetError naming the damaged file."""
    from ghil.data.calvin_dataset import CalvinDataset
    from ghil.data.calvin_format import DatasetError

    fx = dataset_fixture
    try:
        _apply_damage(fx, 0, ("remove_key", "rgb_static"))
        with pytest.raises(DatasetError, match=fx.frames[0].name + r".*'rgb_static' is not stored"):
            CalvinDataset(fx.root, "training")
    finally:
        fx.restore()


def test_edited_model_settings_are_refused(checkpoint_fixture, tmp_path):
    """The weights hash let an edited setting through: n_inference_steps 2 -> 1 loaded the same weights and acted
    differently. config.json now records init_sha256 over type + init."""
    from ghil.checkpoint import INIT_HASH_KEY, CheckpointError, load_pretrained

    folder = shutil.copytree(checkpoint_fixture.folder, tmp_path / "ckpt")
    meta = json.loads((folder / "config.json").read_text())
    meta["init"]["sampler"]["n_inference_steps"] = 1
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model settings .* were modified or corrupted"):
        load_pretrained(folder)
    meta["init"] = [1, 2]
    del meta[INIT_HASH_KEY]
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'init' an object"):
        load_pretrained(folder)


def test_the_env_worker_turns_a_stuck_step_into_a_hang(monkeypatch):
    """What makes 'never a hang' checkable: a step stuck where no signal reaches (the 9e307 IK loop, here a sleep in
    the worker) is killed after the limit, reported as a hang, and the next call runs in a fresh worker."""
    import test_fuzz as module

    def stuck(env, action):
        time.sleep(60)

    worker = EnvWorker(limit_s=2.0)
    try:
        monkeypatch.setattr(module, "_env_step_check", stuck)  # the forked worker inherits it
        start = time.perf_counter()
        outcome, detail = worker.call("step", [0.0] * 6 + [1.0])
        assert outcome == HANG and "within 2 s" in detail and time.perf_counter() - start < 15
        monkeypatch.undo()
        assert worker.call("step", [0.0] * 6 + [1.0])[0] == OK and worker.restarts == 1
    finally:
        worker.close()


@pytest.mark.parametrize("field, idx, value", [("scene_obs", layout.DRAWER_IDX, 1e306),
                                               ("scene_obs", layout.SLIDER_IDX, 1.7976931348623157e308),
                                               ("robot_obs", 7, 9e307)])
def test_a_finite_state_the_physics_cannot_hold_is_refused_in_lenient_mode(field, idx, value):
    """Found by the reset fuzz: a lenient reset with the drawer at 1e306 read back NaN; a joint at 9e307 turned NaN on
    the first step and the IK of the next step never returned. Values beyond 1e9 are refused in both modes."""
    from sim_eval.world.action_validation import MAX_STATE_MAGNITUDE, validate_state_obs

    state = {"robot_obs": layout.NEUTRAL_ROBOT_OBS.copy(), "scene_obs": _base_scene()}
    state[field][idx] = value
    with pytest.raises(InvalidStateError, match=rf"beyond \+-1e\+09 .* {field}\[{idx}\] "):
        validate_state_obs(**state, strict=False)
    state[field][idx] = MAX_STATE_MAGNITUDE  # the bound itself still teleports, as calvin_env
    validate_state_obs(**state, strict=False)
