"""CALVIN's evaluation loop for one chain (protocol §5), shared by ``ghil eval`` on every env.

The loop: reset the env once at the chain's start; for each of the 5 subtasks, ``agent.reset()`` (standard and
held-out modes; a ``Seedable`` agent is first seeded from the chain's seed and the subtask's index, so its record
depends on nothing but the chain), take ``start_info = env.get_info()``, then up to ``ep_len`` (360) steps of
``env.step(agent.step(obs, instruction))`` with the oracle checked after every step; the chain stops at the first
failure. An action the env would reject (wrong length, NaN, gripper not +-1) fails the subtask with the reason
recorded, instead of crashing the run.

Usage::

    chain = Chain(index=0, initial_state=state, tasks=tasks)
    record = run_chain(env, agent, TaskOracle(), chain, mode="standard", ep_len=360, seed=chain_seed(0, 0))
    record.n_completed
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ghil.interfaces import AgentDescription, CalvinAgent, Seedable
from sim_eval.world.action_validation import InvalidActionError, validate_action
from sim_eval.protocol.initial_states import state_to_obs
from sim_eval.protocol.instructions import chain_instructions, check_mode
from sim_eval.evaluation.records import (FAILURE_AGENT_ERROR, FAILURE_INVALID_ACTION, FAILURE_TIMEOUT, ChainRecord,
                              SubtaskRecord)

log = logging.getLogger(__name__)

EP_LEN = 360  # CALVIN's per-subtask step budget (12 s at 30 Hz); the published numbers all use it


class Env(Protocol):
    """What the loop needs from an env: calvin_env's PlayTableSimEnv API (PlayTableEnv and CalvinEnv have it)."""

    def reset(self, robot_obs: np.ndarray | None = None, scene_obs: np.ndarray | None = None) -> dict: ...

    def step(self, action) -> tuple[dict, int, bool, dict]: ...

    def get_info(self) -> dict: ...


class Oracle(Protocol):
    """calvin_env's ``Tasks``: the subset of ``task_filter`` achieved between two infos."""

    def get_task_info_for_set(self, start_info: dict, end_info: dict, task_filter: Set[str]) -> set: ...


class FrameSink(Protocol):
    """Receives one frame per env step (the image the agent saw, with what it was told and what it said)."""

    def add(self, rgb: np.ndarray, lines: list[str], description: AgentDescription) -> None: ...


@dataclass(frozen=True)
class Chain:
    index: int  # position in the official 1000-chain list
    initial_state: dict  # symbolic initial state
    tasks: tuple[str, ...]  # the 5 subtasks


def chain_seed(base_seed: int, chain_index: int) -> int:
    """The seed of one chain: a function of the run's seed and the chain alone, so no result depends on which
    worker or shard ran the chain, or on what it ran before."""
    return int(np.random.SeedSequence([int(base_seed), int(chain_index)]).generate_state(1)[0])


def state_digest(obs: dict) -> str:
    """16 hex digits of sha256 over the exact float64 bytes of ``robot_obs`` and ``scene_obs``."""
    import hashlib

    raw = np.concatenate([np.asarray(obs["robot_obs"], np.float64).ravel(),
                          np.asarray(obs["scene_obs"], np.float64).ravel()])
    return hashlib.sha256(raw.tobytes()).hexdigest()[:16]


def subtask_seed(chain_seed_: int, subtask: int) -> int:
    """The seed a ``Seedable`` agent gets before subtask ``subtask`` of a chain (long-horizon mode: subtask 0)."""
    return int(np.random.SeedSequence([int(chain_seed_), int(subtask)]).generate_state(1)[0])


def reset_agent(agent: CalvinAgent, seed: int, subtask: int) -> None:
    """``agent.reset()``, preceded by ``agent.seed(...)`` for agents with random streams (learned stages)."""
    if isinstance(agent, Seedable):
        agent.seed(subtask_seed(seed, subtask))
    agent.reset()


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and (when already imported) torch's global RNGs, like CALVIN's ``seed_everything``."""
    random.seed(seed)
    np.random.seed(seed)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def instructions_for(chain: Chain, mode: str, seed: int, phrasings=None) -> list[str]:
    """What the agent is told for each subtask of ``chain`` (a function of the chain's tasks, mode, seed and the
    user's phrasings table, if any)."""
    return chain_instructions(chain.tasks, mode, np.random.default_rng(seed), phrasings)


def run_chain(env: Env, agent: CalvinAgent, oracle: Oracle, chain: Chain, mode: str, ep_len: int, seed: int,
              frames: FrameSink | None = None, record_agent_errors: bool = False,
              heartbeat: Callable[[int, int], None] | None = None,
              on_subtask: Callable[[int, SubtaskRecord], None] | None = None,
              phrasings=None) -> ChainRecord:
    """Roll out one chain under CALVIN's protocol and return its record.

    An exception from ``agent.step`` propagates, unless ``record_agent_errors``: then it fails the subtask as
    ``agent_error`` with the exception in ``detail`` (the chain stops there, the run goes on).

    ``heartbeat(k, step)`` is called before each step of subtask ``k`` (``step`` -1: before the resets that start
    it) and ``on_subtask(k, record)`` when subtask ``k`` ends: the evaluation's watchdog uses them to record a step
    that never returns. Neither changes the record.
    """
    check_mode(mode)
    t0 = time.perf_counter()
    beat = heartbeat or (lambda k, step: None)
    beat(0, -1)
    seed_everything(seed)
    if isinstance(getattr(env, "rng", None), np.random.Generator):
        env.rng = np.random.default_rng(seed)  # per-chain visual variation (playtable), independent of history
    instructions = instructions_for(chain, mode, seed, phrasings)
    robot_obs, scene_obs = state_to_obs(chain.initial_state)
    obs = env.reset(robot_obs=robot_obs, scene_obs=scene_obs)  # the only reset in a chain
    describe = getattr(agent, "describe", None)
    if mode == "long_horizon":
        reset_agent(agent, seed, 0)  # once: the agent must find the subtask boundaries itself
    subtasks: list[SubtaskRecord] = []
    for k, (task, instruction) in enumerate(zip(chain.tasks, instructions)):
        beat(k, -1)
        if mode != "long_horizon":
            reset_agent(agent, seed, k)
        start_info = env.get_info()
        result = SubtaskRecord(task, instruction, False, ep_len, FAILURE_TIMEOUT, f"no success within {ep_len} steps")
        for step in range(ep_len):
            beat(k, step)
            image = obs["rgb_obs"]["rgb_static"] if frames is not None else None  # read before the next step
            try:
                action = agent.step(obs, instruction)
            except Exception as exc:
                if not record_agent_errors:
                    raise
                log.warning("chain %d subtask %d (%s) step %d: the agent raised; recorded as agent_error",
                            chain.index, k, task, step, exc_info=True)
                result = SubtaskRecord(task, instruction, False, step, FAILURE_AGENT_ERROR,
                                       f"{type(exc).__name__}: {exc}")
                break
            if frames is not None:
                lines = [f"chain {chain.index}  subtask {k + 1}/{len(chain.tasks)}  step {step}  {task}", instruction]
                frames.add(image, lines, AgentDescription.coerce(describe() if describe else None))
            try:
                checked = validate_action(action)
                obs, _, _, info = env.step(checked)
            except InvalidActionError as exc:
                result = SubtaskRecord(task, instruction, False, step, FAILURE_INVALID_ACTION, str(exc))
                break
            if oracle.get_task_info_for_set(start_info, info, {task}):
                result = SubtaskRecord(task, instruction, True, step + 1)
                break
        subtasks.append(dataclasses.replace(result, end_state=state_digest(obs)))
        if on_subtask is not None:
            on_subtask(k, subtasks[-1])
        if not result.success:
            break
    return ChainRecord(chain.index, dict(chain.initial_state), tuple(chain.tasks), tuple(subtasks), int(seed),
                       round(time.perf_counter() - t0, 3))
