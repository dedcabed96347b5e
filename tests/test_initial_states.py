"""Symbolic initial states: the seed hash, the 192-state enumeration and the realisation as robot/scene obs."""

import contextlib

import numpy as np
import pytest

from sim_eval.world import layout
from sim_eval.protocol.initial_states import (
    SYMBOLIC_STATE_KEYS,
    calvin_fnv1_32,
    canonical_state,
    enumerate_symbolic_states,
    fnv1_32_bytes,
    state_seed,
    state_to_obs,
)

CHAIN0_STATE = {
    "led": 1, "lightbulb": 1, "slider": "left", "drawer": "open",
    "red_block": "slider_left", "blue_block": "table", "pink_block": "slider_right", "grasped": 0,
}
CHAIN0_SCENE_OBS = [0.28, 0.22, 0, 0.088, 1, 1, -0.2409, 0.0924, 0.461, 0, 0, 1.8859, 0.23, -0.12, 0.46, 0, 0, 1.4881,
                    0.0703, 0.0924, 0.461, 0, 0, 1.4684]


# ---- fnv1_32 ------------------------------------------------------------------------------------------------------


def test_fnv_byte_loop_vector():
    assert fnv1_32_bytes(b"test") == 3698262380


def test_fnv_str_vector_hashes_utf16le():
    assert calvin_fnv1_32("test") == 3910690890


def test_fnv_chain0_string():
    text = "dict_values([1, 1, 'left', 'open', 'slider_left', 'table', 'slider_right', 0])"
    assert str(CHAIN0_STATE.values()) == text
    assert calvin_fnv1_32(text) == 2138410836
    assert state_seed(CHAIN0_STATE) == 2138410836


def test_fnv_is_not_the_textbook_variant():
    # Textbook FNV-1 starts from 0x811C9DC5 and the official seed would differ.
    assert fnv1_32_bytes(b"") == 0
    assert calvin_fnv1_32("test") != fnv1_32_bytes(b"test")


# ---- enumeration --------------------------------------------------------------------------------------------------


def test_there_are_192_distinct_states_in_product_order():
    states = enumerate_symbolic_states()
    assert len(states) == 192
    assert all(tuple(s) == SYMBOLIC_STATE_KEYS for s in states)
    assert len({tuple(s.values()) for s in states}) == 192
    assert states[0] == {"led": 0, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "table",
                         "blue_block": "table", "pink_block": "slider_right", "grasped": 0}
    assert states[-1]["led"] == 1 and states[-1]["pink_block"] == "table"
    # product order: led is the slowest-varying key, so the first 96 have led = 0.
    assert [s["led"] for s in states] == [0] * 96 + [1] * 96


def test_every_state_satisfies_the_validity_rule():
    for state in enumerate_symbolic_states():
        blocks = [state[k] for k in ("red_block", "blue_block", "pink_block")]
        assert blocks.count("table") in (1, 2)
        assert blocks.count("slider_left") <= 1 and blocks.count("slider_right") <= 1
    # 12 of the 27 block layouts are valid; each appears once per led/lightbulb/slider/drawer combination (16).
    layouts = [tuple(s[k] for k in ("red_block", "blue_block", "pink_block")) for s in enumerate_symbolic_states()]
    assert len(set(layouts)) == 12 and all(layouts.count(lay) == 16 for lay in set(layouts))


# ---- state_to_obs -------------------------------------------------------------------------------------------------


def test_chain0_scene_obs_matches_protocol():
    robot_obs, scene_obs = state_to_obs(CHAIN0_STATE)
    assert scene_obs.shape == (24,) and robot_obs.shape == (15,)
    np.testing.assert_allclose(scene_obs, CHAIN0_SCENE_OBS, atol=1e-4)
    np.testing.assert_array_equal(robot_obs, layout.NEUTRAL_ROBOT_OBS)


@contextlib.contextmanager
def _global_seed(seed):
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def _reference_scene_obs(state):
    """The protocol §4 recipe, written out step by step with the legacy *global* RNG as CALVIN runs it."""
    table = [np.array(layout.SLOTS["table_0"]), np.array(layout.SLOTS["table_1"])]
    scene = np.zeros(24)
    with _global_seed(calvin_fnv1_32(str(state.values()))):
        np.random.shuffle(table)
        scene[0] = 0.28 if state["slider"] == "left" else 0
        scene[1] = 0.22 if state["drawer"] == "open" else 0
        scene[3] = 0.088 if state["lightbulb"] == 1 else 0
        scene[4], scene[5] = state["lightbulb"], state["led"]
        slot = {"slider_left": layout.SLOTS["slider_left"], "slider_right": layout.SLOTS["slider_right"]}
        scene[6:9] = slot.get(state["red_block"], table[0])
        scene[11] = np.random.uniform(np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)
        scene[12:15] = slot.get(state["blue_block"], table[1] if state["red_block"] == "table" else table[0])
        scene[17] = np.random.uniform(np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)
        scene[18:21] = slot.get(state["pink_block"], table[1])
        scene[23] = np.random.uniform(np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)
    return scene


def test_all_192_states_match_the_global_rng_recipe_bit_for_bit():
    for state in enumerate_symbolic_states():
        np.testing.assert_array_equal(state_to_obs(state)[1], _reference_scene_obs(state), err_msg=str(state))


def test_scene_layout_properties_for_all_states():
    lo, hi = layout.BLOCK_YAW_RANGE_RAD
    for state in enumerate_symbolic_states():
        _, scene = state_to_obs(state)
        positions = {}
        for key, name in zip(("red_block", "blue_block", "pink_block"), layout.BLOCK_NAMES):
            block = scene[layout.BLOCK_OBS_SLICES[name]]
            assert lo <= block[5] <= hi and block[3] == block[4] == 0
            if state[key].startswith("slider"):
                np.testing.assert_array_equal(block[:3], layout.SLOTS[state[key]])
            else:
                assert any(np.array_equal(block[:3], layout.SLOTS[t]) for t in ("table_0", "table_1"))
            positions[key] = tuple(block[:3])
        assert len(set(positions.values())) == 3, f"two blocks share a slot in {state}"
        assert scene[3] == (0.088 if state["lightbulb"] else 0.0) and scene[2] == 0


def test_three_yaws_are_drawn_even_for_slider_blocks():
    # If a yaw were skipped for a block off the table, the later yaws would shift in the RNG stream.
    state = dict(CHAIN0_STATE)  # red and pink sit in the slider
    rng = np.random.RandomState(state_seed(state))
    rng.shuffle([0, 1])
    expected = rng.uniform(*layout.BLOCK_YAW_RANGE_RAD, size=3)
    _, scene = state_to_obs(state)
    np.testing.assert_array_equal(scene[[11, 17, 23]], expected)


def test_global_rng_is_untouched():
    np.random.seed(1234)
    before = np.random.get_state()[1].copy()
    state_to_obs(CHAIN0_STATE)
    after = np.random.get_state()
    np.testing.assert_array_equal(before, after[1])
    np.random.seed(1234)
    expected_draw = np.random.rand()
    np.random.seed(1234)
    state_to_obs(CHAIN0_STATE)
    assert np.random.rand() == expected_draw


def test_key_order_and_numpy_ints_do_not_change_the_result():
    shuffled = {k: CHAIN0_STATE[k] for k in reversed(SYMBOLIC_STATE_KEYS)}
    numpy_ints = {k: (np.int64(v) if isinstance(v, int) else v) for k, v in CHAIN0_STATE.items()}
    reference = state_to_obs(CHAIN0_STATE)[1]
    np.testing.assert_array_equal(state_to_obs(shuffled)[1], reference)
    np.testing.assert_array_equal(state_to_obs(numpy_ints)[1], reference)
    assert list(canonical_state(shuffled)) == list(SYMBOLIC_STATE_KEYS)
    assert type(canonical_state(numpy_ints)["led"]) is int


def test_returned_arrays_are_fresh_copies():
    robot_obs, _ = state_to_obs(CHAIN0_STATE)
    robot_obs[:] = 0
    assert layout.NEUTRAL_ROBOT_OBS[0] != 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": "red"}, "unknown: \\['colour'\\]"),
        ({"drawer": "half_open"}, "drawer='half_open' is not one of"),
        ({"led": 2}, "led=2 is not one of"),
        ({"led": "1"}, "led='1' is not one of"),
        ({"grasped": 1}, "grasped=1 is not one of"),
        ({"red_block": "drawer"}, "red_block='drawer' is not one of"),
        ({"red_block": "table", "pink_block": "table"}, "invalid block layout"),  # three on the table
        ({"blue_block": "slider_left"}, "invalid block layout"),  # two in slider_left
    ],
)
def test_invalid_states_raise(change, message):
    with pytest.raises(ValueError, match=message):
        state_to_obs({**CHAIN0_STATE, **change})


def test_missing_key_raises():
    state = dict(CHAIN0_STATE)
    del state["slider"]
    with pytest.raises(ValueError, match="missing: \\['slider'\\]"):
        state_to_obs(state)


def test_non_mapping_raises():
    with pytest.raises(ValueError, match="must be a mapping"):
        state_to_obs(list(CHAIN0_STATE.values()))
