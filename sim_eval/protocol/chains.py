"""CALVIN's evaluation chains: the symbolic task model, the official generator, and the official 1000 chains.

``get_sequences(n)`` reproduces ``calvin_agent.evaluation.multistep_sequences.get_sequences`` exactly (content and
order), single-process. CALVIN runs one worker process per state, each calling ``np.random.seed(i)`` for its state
index ``i``, then shuffles the pooled chains with the parent's global RNG freshly seeded with 0. Worker processes
never touch the parent's RNG, so one private ``RandomState(i)`` per state plus a ``RandomState(0)`` for the shuffle
gives the same streams without touching numpy's global RNG.

Usage::

    from sim_eval.protocol import chains
    official = chains.load_official_chains()          # [(initial_state, (task1, ..., task5)), ...] x 1000
    assert chains.get_sequences(1000) == official
    first_100 = chains.official_subset(100)           # "the first 100 of the official 1000"
    chains.is_valid_chain(*official[0])               # True
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from sim_eval.protocol.initial_states import BLOCK_KEYS, SYMBOLIC_STATE_KEYS, canonical_state, enumerate_symbolic_states
from sim_eval.protocol.tasks import TASK_CATEGORIES, TASK_NAMES, check_task_name

CHAIN_LENGTH = 5
NUM_OFFICIAL_CHAINS = 1000
OFFICIAL_CHAINS_FILE = "calvin_eval_sequences_1000.json"
_SHUFFLE_SEED = 0

_COLOURS = ("red", "blue", "pink")
_SLIDER_HALVES = ("slider_right", "slider_left")


@dataclass(frozen=True)
class Transition:
    """One symbolic alternative of a task: if every ``condition`` variable takes one of its allowed values, the
    task is applicable and sets the ``effect`` variables."""

    condition: Mapping[str, frozenset]
    effect: Mapping[str, object]

    def applies(self, state: Mapping) -> bool:
        return all(state[key] in allowed for key, allowed in self.condition.items())

    def apply(self, state: Mapping) -> dict:
        return {**state, **self.effect}


def _transition(condition: Mapping, effect: Mapping) -> Transition:
    """Build a transition; a tuple in ``condition`` lists several allowed values, anything else is one value."""
    allowed = {k: frozenset(v) if isinstance(v, tuple) else frozenset((v,)) for k, v in condition.items()}
    return Transition(allowed, dict(effect))


def _others(block: str) -> list[str]:
    return [b for b in BLOCK_KEYS if b != block]


def _build_transitions() -> dict[str, tuple[Transition, ...]]:
    """CALVIN's symbolic task model (protocol §3.2). Every task needs ``grasped == 0`` except place and stack."""
    t: dict[str, list[Transition]] = {}
    free = {"grasped": 0}
    for colour in _COLOURS:
        block = f"{colour}_block"
        for verb in ("rotate", "push"):
            for side in ("right", "left"):
                t[f"{verb}_{block}_{side}"] = [_transition({block: "table", **free}, {block: "table"})]
    t["move_slider_left"] = [_transition({"slider": "right", **free}, {"slider": "left"})]
    t["move_slider_right"] = [_transition({"slider": "left", **free}, {"slider": "right"})]
    t["open_drawer"] = [_transition({"drawer": "closed", **free}, {"drawer": "open"})]
    t["close_drawer"] = [_transition({"drawer": "open", **free}, {"drawer": "closed"})]
    for colour in _COLOURS:
        block = f"{colour}_block"
        lifted = {block: "grasped", "grasped": 1}
        t[f"lift_{block}_table"] = [_transition({block: "table", **free}, lifted)]
        # A block in a slider half is reachable only while the door covers the other half.
        t[f"lift_{block}_slider"] = [
            _transition({block: "slider_left", "slider": "right", **free}, lifted),
            _transition({block: "slider_right", "slider": "left", **free}, lifted),
        ]
        t[f"lift_{block}_drawer"] = [_transition({block: "drawer", "drawer": "open", **free}, lifted)]
    t["place_in_slider"] = [
        _transition({block: "grasped", "slider": side, "grasped": 1}, {block: f"slider_{side}", "grasped": 0})
        for block in BLOCK_KEYS
        for side in ("right", "left")
    ]
    t["place_in_drawer"] = [
        _transition({block: "grasped", "drawer": "open", "grasped": 1}, {block: "drawer", "grasped": 0})
        for block in BLOCK_KEYS
    ]
    t["stack_block"] = [
        _transition(
            {top: "grasped", bottom: "table", "grasped": 1},
            {top: "stacked_top", bottom: "stacked_bottom", "grasped": 0},
        )
        for top in BLOCK_KEYS
        for bottom in _others(top)
    ]
    t["unstack_block"] = [
        _transition({top: "stacked_top", bottom: "stacked_bottom", **free}, {top: "table", bottom: "table"})
        for top in BLOCK_KEYS
        for bottom in _others(top)
    ]
    for light in ("lightbulb", "led"):
        t[f"turn_on_{light}"] = [_transition({light: 0, **free}, {light: 1})]
        t[f"turn_off_{light}"] = [_transition({light: 1, **free}, {light: 0})]
    # Only the one block left on the table can be swept into the open drawer.
    t["push_into_drawer"] = [
        _transition(
            {block: "table", **{o: _SLIDER_HALVES for o in _others(block)}, "drawer": "open", **free},
            {block: "drawer", "grasped": 0},
        )
        for block in BLOCK_KEYS
    ]
    return {name: tuple(t[name]) for name in TASK_NAMES}


TRANSITIONS: dict[str, tuple[Transition, ...]] = _build_transitions()


def successor_states(state: Mapping, task: str) -> list[dict]:
    """Every state the task can lead to from ``state`` (one per applicable alternative; empty if infeasible)."""
    missing = [key for key in SYMBOLIC_STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"symbolic state lacks keys {missing}")
    return [tr.apply(state) for tr in TRANSITIONS[check_task_name(task)] if tr.applies(state)]


def is_valid_chain(state: Mapping, tasks: Sequence[str]) -> bool:
    """CALVIN's ``check_sequence``: every task matches exactly one alternative, and the categories are distinct.

    "Exactly one" also rules out ambiguous tasks, e.g. ``stack_block`` with two blocks on the table to stack on.
    """
    categories = [TASK_CATEGORIES[check_task_name(task)] for task in tasks]
    if len(set(categories)) != len(categories):
        return False
    for task in tasks:
        successors = successor_states(state, task)
        if len(successors) != 1:
            return False
        state = successors[0]
    return True


# --- Fast, exact replay of CALVIN's sampler -------------------------------------------------------------------
# CALVIN draws ~7.5 million candidate chains for N = 1000 (about 1 in 7500 is valid), one np.random.choice call each;
# replaying that call by call takes ~90 s. The draws are batched instead, consuming the identical random stream:
# choice(34, 5, replace=False) is permutation(34)[:5], a Fisher-Yates shuffle that for i = 33..1 draws
# j = random_interval(i) (32-bit draws masked to the smallest all-ones mask >= i, rejected while > i). Legacy
# randint(0, high) with per-element array bounds draws each element with that same masked rejection, so one randint
# call over bounds [33, 32, ..., 1] * K yields the j's of K consecutive choice calls.
_NUM_TASKS = len(TASK_NAMES)
_SHUFFLE_BOUNDS = np.arange(_NUM_TASKS - 1, 0, -1)  # i = 33, 32, ..., 1
_BATCH = 4096
_CATEGORY_ARRAY = np.array([TASK_CATEGORIES[name] for name in TASK_NAMES])


def draw_task_prefixes(rng: np.random.RandomState, count: int) -> np.ndarray:
    """``count`` consecutive ``rng.choice(34, size=5, replace=False)`` draws as a ``(count, 5)`` array, batched.

    Leaves ``rng`` exactly where the ``count`` sequential calls would.
    """
    bounds = np.tile(_SHUFFLE_BOUNDS + 1, count)  # randint's high is exclusive
    swaps = rng.randint(0, bounds, dtype=np.uint32).reshape(count, len(_SHUFFLE_BOUNDS)).T.astype(np.intp)
    # perms[p, k] is position p of permutation k; this layout makes each Fisher-Yates step one contiguous row
    # plus one flat gather/scatter, far faster than 2-D fancy indexing.
    perms = np.tile(np.arange(_NUM_TASKS, dtype=np.int8)[:, None], (1, count))
    flat = perms.reshape(-1)
    columns = np.arange(count)
    for step, i in enumerate(_SHUFFLE_BOUNDS):
        row_i = perms[i].copy()
        j_flat = swaps[step] * count + columns
        perms[i] = flat[j_flat]
        flat[j_flat] = row_i
    return perms[:CHAIN_LENGTH].T.astype(np.intp)


@dataclass(frozen=True)
class _StateGraph:
    """Every symbolic state reachable from the 192 initial states (about 2200), with a successor table.

    ``successor[s, t]`` is the index of the unique successor of state ``s`` under task ``t``, or ``DEAD`` when the
    task matches zero or several alternatives; ``DEAD`` is itself a row that maps everything to ``DEAD``, so a
    whole batch of chains is walked with five vectorised lookups.
    """

    index: dict[tuple, int]
    successor: np.ndarray

    @property
    def dead(self) -> int:
        return self.successor.shape[0] - 1


@functools.lru_cache(maxsize=1)
def _state_graph() -> _StateGraph:
    states = [tuple(state.items()) for state in enumerate_symbolic_states()]
    index = {state: i for i, state in enumerate(states)}
    rows: list[list[int | None]] = []
    for state in states:  # breadth-first: `states` grows while it is walked
        row: list[int | None] = []
        for task in TASK_NAMES:
            successors = successor_states(dict(state), task)
            if len(successors) != 1:
                row.append(None)
                continue
            nxt = tuple(successors[0].items())
            if nxt not in index:
                index[nxt] = len(states)
                states.append(nxt)
            row.append(index[nxt])
        rows.append(row)
    dead = len(states)
    successor = np.array([[dead if s is None else s for s in row] for row in rows] + [[dead] * _NUM_TASKS])
    return _StateGraph(index, successor)


def _valid_rows(start: int, prefixes: np.ndarray) -> np.ndarray:
    """Vectorised ``is_valid_chain`` for a batch of task-index chains from state index ``start``."""
    graph = _state_graph()
    categories = np.sort(_CATEGORY_ARRAY[prefixes], axis=1)
    distinct = np.all(categories[:, 1:] != categories[:, :-1], axis=1)
    state = np.full(len(prefixes), start)
    for column in prefixes.T:
        state = graph.successor[state, column]
    return distinct & (state != graph.dead)


def chains_for_state(state: Mapping, num_chains: int, state_index: int) -> list[tuple[str, ...]]:
    """CALVIN's per-state sampler: seed with the state's index, draw 5 distinct tasks until enough are valid.

    Returns the first ``num_chains`` valid draws of ``RandomState(state_index).choice(34, 5, replace=False)``, in
    draw order; duplicates are kept, as in CALVIN. ``state`` must be one of the 192 initial states.
    """
    start = _state_graph().index[tuple(canonical_state(state).items())]
    rng = np.random.RandomState(state_index)
    chains: list[tuple[str, ...]] = []
    while len(chains) < num_chains:
        prefixes = draw_task_prefixes(rng, _BATCH)
        for task_ids in prefixes[_valid_rows(start, prefixes)][: num_chains - len(chains)].tolist():
            chains.append(tuple(TASK_NAMES[i] for i in task_ids))
    return chains


def chains_per_state(num_sequences: int, num_states: int) -> list[int]:
    """``np.array_split`` counts: the first ``num_sequences % num_states`` states get one chain more."""
    return [len(part) for part in np.array_split(np.arange(num_sequences), num_states)]


@functools.lru_cache(maxsize=8)
def _generate(num_sequences: int) -> tuple[tuple[tuple, tuple[str, ...]], ...]:
    states = enumerate_symbolic_states()
    pooled: list[tuple[dict, tuple[str, ...]]] = []
    for index, (state, count) in enumerate(zip(states, chains_per_state(num_sequences, len(states)))):
        pooled.extend((state, chain) for chain in chains_for_state(state, count, index))
    np.random.RandomState(_SHUFFLE_SEED).shuffle(pooled)
    # Cached as tuples so callers can never mutate the cache through a returned dict.
    return tuple((tuple(state.items()), chain) for state, chain in pooled)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def get_sequences(num_sequences: int = NUM_OFFICIAL_CHAINS, num_workers: int | None = None) -> list:
    """CALVIN's ``get_sequences``: ``num_sequences`` chains as ``[(initial_state dict, (5 task names)), ...]``.

    ``num_workers`` is accepted for signature compatibility only: the result never depends on it and generation
    runs in this process. Note ``get_sequences(100)`` is *not* the first 100 official chains (``official_subset``).
    """
    if not _is_int(num_sequences) or num_sequences < 1:
        raise ValueError(f"num_sequences must be a positive integer, got {num_sequences!r}")
    return [(dict(state), chain) for state, chain in _generate(int(num_sequences))]


@functools.lru_cache(maxsize=1)
def _official() -> tuple[tuple[tuple, tuple[str, ...]], ...]:
    text = resources.files("sim_eval.protocol").joinpath("data", OFFICIAL_CHAINS_FILE).read_text(encoding="utf-8")
    entries = json.loads(text)
    if len(entries) != NUM_OFFICIAL_CHAINS:
        raise ValueError(f"{OFFICIAL_CHAINS_FILE} holds {len(entries)} chains, expected {NUM_OFFICIAL_CHAINS}")
    return tuple(
        (
            tuple(canonical_state(entry["initial_state"]).items()),
            tuple(check_task_name(task) for task in entry["sequence"]),
        )
        for entry in entries
    )


def load_official_chains() -> list[tuple[dict, tuple[str, ...]]]:
    """The official 1000 chains, in their official order, as ``[(initial_state dict, (5 task names)), ...]``."""
    return [(dict(state), chain) for state, chain in _official()]


def official_subset(first_n: int) -> list[tuple[dict, tuple[str, ...]]]:
    """The first ``first_n`` of the official 1000 chains (1 <= first_n <= 1000)."""
    if not _is_int(first_n) or not 1 <= first_n <= NUM_OFFICIAL_CHAINS:
        raise ValueError(
            f"first_n must be an integer in [1, {NUM_OFFICIAL_CHAINS}] (the first N of the official chains), "
            f"got {first_n!r}"
        )
    return load_official_chains()[: int(first_n)]
