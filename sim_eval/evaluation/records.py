"""Per-chain evaluation records: what one CALVIN chain rollout produced, as written to ``chains.jsonl``.

A record holds everything the metrics need (the tasks, how many were completed, why the chain stopped) and nothing
that depends on how the run was scheduled, except ``wall_s``: the same chain gives the same record (``outcome()``)
whatever the worker count or shard.

Usage::

    rec = ChainRecord.from_json(line)         # strict: unknown or missing fields raise RecordError
    rec.n_completed                           # 0..5 consecutive successes
    line = rec.to_json()                      # one line, no newline
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from sim_eval.protocol.chains import CHAIN_LENGTH
from sim_eval.protocol.tasks import check_task_name

# Why a subtask failed. Anything but these is a bug in the harness.
FAILURE_TIMEOUT = "timeout"  # the oracle did not fire within ep_len steps
FAILURE_INVALID_ACTION = "invalid_action"  # the agent returned an action the env would reject (shape, NaN, gripper)
FAILURE_AGENT_ERROR = "agent_error"  # agent.step raised (recorded only with eval.agent_errors=record)
# A step (agent.step + env.step), or the reset before a subtask, did not return within eval.step_timeout_s: the
# worker process running the chain was killed (e.g. pybullet's IK looping forever in C, which no signal stops).
FAILURE_STUCK = "stuck"
FAILURE_KINDS = (FAILURE_TIMEOUT, FAILURE_INVALID_ACTION, FAILURE_AGENT_ERROR, FAILURE_STUCK)


class RecordError(ValueError):
    """A chain record that is malformed (a corrupt results file, or a file from another ghil version)."""


@dataclass(frozen=True)
class SubtaskRecord:
    """One attempted subtask of a chain."""

    task: str
    instruction: str  # what the agent was told (in long_horizon mode: the composite instruction)
    success: bool
    n_steps: int  # env steps taken; on success, the step after which the oracle fired (1-based)
    failure: str | None = None  # None on success, else one of FAILURE_KINDS
    detail: str | None = None  # human-readable reason, e.g. the InvalidActionError message
    # sha256 (first 16 hex digits) of the exact robot_obs + scene_obs bytes when the subtask ended: two records are
    # equal only when the trajectories ended bit for bit in the same state (None in records of older versions).
    end_state: str | None = None

    def __post_init__(self) -> None:
        check_task_name(self.task)
        if self.success != (self.failure is None):
            raise RecordError(f"subtask {self.task}: success={self.success} but failure={self.failure!r}")
        if self.failure is not None and self.failure not in FAILURE_KINDS:
            raise RecordError(f"subtask {self.task}: unknown failure kind {self.failure!r}")
        if not isinstance(self.n_steps, int) or self.n_steps < 0:
            raise RecordError(f"subtask {self.task}: n_steps must be a non-negative int, got {self.n_steps!r}")


@dataclass(frozen=True)
class ChainRecord:
    """One chain: its index in the official 1000, its tasks, and the attempted subtasks in order.

    A chain stops at its first failure, so ``subtasks`` holds ``n_completed`` successes followed by at most one
    failure, and ``len(subtasks) == n_completed`` only when all five succeeded.
    """

    chain_index: int  # position in the official 1000-chain list (0-based)
    initial_state: dict  # the symbolic state (led, lightbulb, slider, drawer, red/blue/pink_block, grasped)
    tasks: tuple[str, ...]  # the 5 subtasks
    subtasks: tuple[SubtaskRecord, ...]  # attempted subtasks, in order
    seed: int  # the seed everything was seeded with before this chain
    wall_s: float = 0.0  # seconds the chain took (the only scheduling-dependent field)

    def __post_init__(self) -> None:
        if len(self.tasks) != CHAIN_LENGTH:
            raise RecordError(f"chain {self.chain_index}: expected {CHAIN_LENGTH} tasks, got {len(self.tasks)}")
        for task in self.tasks:
            check_task_name(task)
        if len(self.subtasks) > CHAIN_LENGTH:
            raise RecordError(f"chain {self.chain_index}: more than {CHAIN_LENGTH} subtasks recorded")
        for k, sub in enumerate(self.subtasks):
            if sub.task != self.tasks[k]:
                raise RecordError(f"chain {self.chain_index}: subtask {k} is {sub.task}, the chain says {self.tasks[k]}")
            if not sub.success and k != len(self.subtasks) - 1:
                raise RecordError(f"chain {self.chain_index}: subtask {k} failed but the chain went on")
        if self.subtasks and self.subtasks[-1].success and len(self.subtasks) != CHAIN_LENGTH:
            raise RecordError(f"chain {self.chain_index}: stopped after a success, before the end of the chain")
        if not self.subtasks:
            raise RecordError(f"chain {self.chain_index}: no subtask attempted")

    @property
    def n_completed(self) -> int:
        """Consecutive successes from the start of the chain (0..5): the chain's contribution to avg length."""
        return sum(1 for sub in self.subtasks if sub.success)

    def outcome(self) -> dict:
        """Everything but the timing: equal for the same chain however the run was scheduled."""
        out = asdict(self)
        out.pop("wall_s")
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ChainRecord:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"not a JSON chain record ({exc}): {text[:80]!r}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> ChainRecord:
        if not isinstance(raw, dict):
            raise RecordError(f"a chain record must be a JSON object, got {type(raw).__name__}")
        _check_keys(raw, cls, "chain record")
        subs = raw["subtasks"]
        if not isinstance(subs, list):
            raise RecordError("chain record: 'subtasks' must be a list")
        for sub in subs:
            if not isinstance(sub, dict):
                raise RecordError("chain record: each subtask must be a JSON object")
            _check_keys(sub, SubtaskRecord, "subtask record")
        try:
            return cls(
                chain_index=int(raw["chain_index"]),
                initial_state=dict(raw["initial_state"]),
                tasks=tuple(raw["tasks"]),
                subtasks=tuple(SubtaskRecord(**sub) for sub in subs),
                seed=int(raw["seed"]),
                wall_s=float(raw.get("wall_s", 0.0)),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, RecordError):
                raise
            raise RecordError(f"malformed chain record: {exc}") from None


def _check_keys(raw: dict, cls, what: str) -> None:
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is f.default_factory}  # both MISSING: no default
    unknown, missing = set(raw) - names, required - set(raw)
    if unknown or missing:
        raise RecordError(f"{what}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
