"""CALVIN's symbolic initial states and their realisation as ``robot_obs`` / ``scene_obs``.

Reproduces ``calvin_agent.evaluation.utils.get_env_state_for_initial_condition`` bit for bit: the neutral robot pose,
and a scene whose block slots and yaws come from numpy's legacy RNG seeded with CALVIN's (non-textbook) FNV-1 hash of
``str(state.values())``. It also enumerates the 192 symbolic states of ``multistep_sequences.get_sequences``.

Usage::

    from sim_eval.protocol.initial_states import enumerate_symbolic_states, state_to_obs
    states = enumerate_symbolic_states()       # 192 dicts, in CALVIN's product order
    robot_obs, scene_obs = state_to_obs(states[0])
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from sim_eval.world import layout

# The symbolic variables and their values, in CALVIN's key order. The order matters twice: it fixes the
# itertools.product enumeration order of the states and the string that is hashed into the placement seed.
SYMBOLIC_DOMAINS: dict[str, tuple] = {
    "led": (0, 1),
    "lightbulb": (0, 1),
    "slider": ("right", "left"),
    "drawer": ("closed", "open"),
    "red_block": ("table", "slider_right", "slider_left"),
    "blue_block": ("table", "slider_right", "slider_left"),
    "pink_block": ("table", "slider_right", "slider_left"),
    "grasped": (0,),
}
SYMBOLIC_STATE_KEYS: tuple[str, ...] = tuple(SYMBOLIC_DOMAINS)
BLOCK_KEYS: tuple[str, ...] = ("red_block", "blue_block", "pink_block")

_FNV_32_PRIME = 0x01000193
_UINT32_MASK = 0xFFFFFFFF


def fnv1_32_bytes(data: bytes) -> int:
    """pyhash 0.9.3's ``fnv1_32`` core loop: offset basis 0 (not 0x811C9DC5), multiply then xor, mod 2**32."""
    h = 0
    for byte in data:
        h = (h * _FNV_32_PRIME) & _UINT32_MASK
        h ^= byte
    return h


def calvin_fnv1_32(s: str) -> int:
    """The seed hash CALVIN uses: pyhash hashes a Python-3 ``str`` over its UTF-16-LE bytes (no BOM)."""
    return fnv1_32_bytes(s.encode("utf-16-le"))


def is_valid_block_layout(blocks: tuple[str, ...]) -> bool:
    """CALVIN's filter on initial states: 1 or 2 blocks on the table, at most one block in each slider half."""
    return blocks.count("table") in (1, 2) and blocks.count("slider_right") < 2 and blocks.count("slider_left") < 2


def enumerate_symbolic_states() -> list[dict]:
    """The 192 valid symbolic initial states, in ``itertools.product`` order over ``SYMBOLIC_STATE_KEYS``."""
    block_pos = [SYMBOLIC_STATE_KEYS.index(k) for k in BLOCK_KEYS]
    return [
        dict(zip(SYMBOLIC_STATE_KEYS, values))
        for values in itertools.product(*SYMBOLIC_DOMAINS.values())
        if is_valid_block_layout(tuple(values[i] for i in block_pos))
    ]


def _plain(value):
    """Map numpy scalars and bools to the plain ``int``/``str`` that CALVIN's hashed string was printed from."""
    if isinstance(value, (bool, int, np.integer)):
        return int(value)
    if isinstance(value, str):
        return str(value)
    return value


def canonical_state(state: Mapping) -> dict:
    """Validate a symbolic initial state and return it with CALVIN's key order and plain ``int``/``str`` values.

    Canonicalising matters for the seed: ``str(state.values())`` changes with key order and with value types
    (``True`` or ``np.int64(1)`` print differently from ``1``), and any change gives a non-official scene.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"a symbolic state must be a mapping, got {type(state).__name__}")
    unknown = set(state) - set(SYMBOLIC_STATE_KEYS)
    missing = [k for k in SYMBOLIC_STATE_KEYS if k not in state]
    if unknown or missing:
        raise ValueError(
            f"symbolic state keys must be exactly {list(SYMBOLIC_STATE_KEYS)}; "
            f"unknown: {sorted(map(str, unknown))}, missing: {missing}"
        )
    canonical = {}
    for key, domain in SYMBOLIC_DOMAINS.items():
        value = _plain(state[key])
        if type(value) is not type(domain[0]) or value not in domain:
            raise ValueError(f"symbolic state {key}={value!r} is not one of {list(domain)}")
        canonical[key] = value
    blocks = tuple(canonical[k] for k in BLOCK_KEYS)
    if not is_valid_block_layout(blocks):
        raise ValueError(
            f"invalid block layout {dict(zip(BLOCK_KEYS, blocks))}: CALVIN needs 1 or 2 blocks on the table "
            "and at most one block per slider half"
        )
    return canonical


def state_seed(state: Mapping) -> int:
    """The placement seed of a state: ``fnv1_32(str(state.values()))`` over the canonical state."""
    return calvin_fnv1_32(str(canonical_state(state).values()))


def _block_positions(state: dict, table_slots: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Block centres: slider states go to their slot; table blocks fill the (shuffled) table slots as CALVIN does."""
    slider_slots = {"slider_left": layout.SLOTS["slider_left"], "slider_right": layout.SLOTS["slider_right"]}

    def place(key: str, table_slot: np.ndarray) -> np.ndarray:
        return slider_slots[state[key]] if state[key] in slider_slots else table_slot

    # CALVIN's rule: red takes table slot 0; blue takes slot 1 if red is on the table, else slot 0; pink always
    # takes slot 1. With at most two blocks on the table this never puts two blocks in one slot.
    return {
        "red_block": place("red_block", table_slots[0]),
        "blue_block": place("blue_block", table_slots[1] if state["red_block"] == "table" else table_slots[0]),
        "pink_block": place("pink_block", table_slots[1]),
    }


def state_to_obs(state: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Realise a symbolic initial state as ``(robot_obs (15,), scene_obs (24,))`` exactly as CALVIN does.

    CALVIN seeds the legacy *global* ``np.random`` inside a temporary-seed context and restores it afterwards. A
    private ``np.random.RandomState`` with the same seed draws the identical stream (legacy streams are frozen), and
    leaves the global RNG untouched without the save/restore dance, which also makes this safe across threads.
    """
    state = canonical_state(state)
    rng = np.random.RandomState(calvin_fnv1_32(str(state.values())))

    # The draw order is part of the result: shuffle the two table slots, then one yaw per block, red/blue/pink,
    # always three yaws whether or not the block is on the table.
    table_slots = [layout.SLOTS["table_0"].copy(), layout.SLOTS["table_1"].copy()]
    rng.shuffle(table_slots)
    positions = _block_positions(state, table_slots)
    yaws = {key: rng.uniform(*layout.BLOCK_YAW_RANGE_RAD) for key in BLOCK_KEYS}

    scene_obs = np.zeros(layout.SCENE_OBS_DIM)
    scene_obs[layout.SLIDER_IDX] = layout.SLIDER_LEFT_M if state["slider"] == "left" else 0.0
    scene_obs[layout.DRAWER_IDX] = layout.DRAWER_OPEN_M if state["drawer"] == "open" else 0.0
    scene_obs[layout.SWITCH_IDX] = layout.SWITCH_ON_M if state["lightbulb"] == 1 else 0.0
    scene_obs[layout.LIGHTBULB_IDX] = state["lightbulb"]
    scene_obs[layout.LED_IDX] = state["led"]
    for key, block_name in zip(BLOCK_KEYS, layout.BLOCK_NAMES):
        block = scene_obs[layout.BLOCK_OBS_SLICES[block_name]]  # a view: x, y, z, roll, pitch, yaw
        block[:3] = positions[key]
        block[5] = yaws[key]
    return layout.NEUTRAL_ROBOT_OBS.copy(), scene_obs
