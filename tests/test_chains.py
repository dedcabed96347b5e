"""CALVIN's chain generator and the official 1000 chains."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sim_eval.protocol import chains
from sim_eval.protocol.initial_states import enumerate_symbolic_states
from sim_eval.protocol.tasks import TASK_NAMES

OFFICIAL_JSON = Path(chains.__file__).parent / "data" / "calvin_eval_sequences_1000.json"


@pytest.fixture(scope="module")
def official():
    return chains.load_official_chains()


@pytest.fixture(scope="module")
def generated_1000():
    return chains.get_sequences(1000)


# ---- the generator reproduces the official list ----------------------------------------------------------------


def test_get_sequences_1000_equals_the_official_file_in_content_and_order(generated_1000):
    raw = json.loads(OFFICIAL_JSON.read_text())
    assert len(generated_1000) == len(raw) == 1000
    for i, ((state, tasks), entry) in enumerate(zip(generated_1000, raw)):
        assert state == entry["initial_state"] and list(tasks) == entry["sequence"], f"chain {i} differs"
        assert list(state) == list(entry["initial_state"]), f"chain {i}: key order differs"


def test_get_sequences_100_is_not_the_first_100_official(official):
    first_100 = chains.get_sequences(100)
    assert len(first_100) == 100
    assert first_100 != official[:100]
    # Protocol §3 pitfall: only 5 of them appear among the first 100 official chains at all.
    assert sum(chain in official[:100] for chain in first_100) == 5
    # With N = 100 the first 100 states get one chain each, and 96 of those have led = 0.
    assert sum(state["led"] == 0 for state, _ in first_100) == 96


def test_results_are_fresh_copies(generated_1000):
    mine = chains.get_sequences(1000)  # cached, so cheap
    mine[0][0]["led"] = 99
    assert chains.get_sequences(1000)[0][0]["led"] == generated_1000[0][0]["led"] == 1


def test_num_workers_does_not_change_the_result(generated_1000):
    assert chains.get_sequences(1000, num_workers=7) == generated_1000


@pytest.mark.parametrize("bad", [0, -5, 2.5, "1000", True, None])
def test_get_sequences_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="positive integer"):
        chains.get_sequences(bad)


# ---- generator building blocks ------------------------------------------------------------------------------------


def test_chains_per_state_first_40_states_get_6():
    counts = chains.chains_per_state(1000, 192)
    assert counts == [6] * 40 + [5] * 152
    assert chains.chains_per_state(100, 192) == [1] * 100 + [0] * 92


@pytest.mark.parametrize("seed", [0, 17, 191])
def test_batched_draws_equal_sequential_np_random_choice(seed):
    sequential = np.random.RandomState(seed)
    expected = np.array([sequential.choice(len(TASK_NAMES), size=5, replace=False) for _ in range(300)])
    batched = np.random.RandomState(seed)
    np.testing.assert_array_equal(chains.draw_task_prefixes(batched, 300), expected)
    # ... and the generator is left exactly where the sequential calls leave it.
    assert batched.randint(1 << 30) == sequential.randint(1 << 30)


def test_chains_for_state_uses_the_state_index_as_seed():
    states = enumerate_symbolic_states()
    first = chains.chains_for_state(states[0], 6, 0)
    assert len(first) == 6 and all(chains.is_valid_chain(states[0], c) for c in first)
    assert chains.chains_for_state(states[0], 6, 1) != first


def test_chains_for_state_rejects_non_initial_states():
    with pytest.raises(ValueError, match="invalid block layout"):
        chains.chains_for_state({**enumerate_symbolic_states()[0], "pink_block": "table"}, 1, 0)


# ---- the symbolic task model ------------------------------------------------------------------------------------


STATE = {"led": 0, "lightbulb": 1, "slider": "right", "drawer": "closed",
         "red_block": "table", "blue_block": "table", "pink_block": "slider_left", "grasped": 0}


def test_every_official_chain_is_valid(official):
    assert all(chains.is_valid_chain(state, tasks) for state, tasks in official)


def test_chain_with_repeated_category_is_invalid():
    assert chains.is_valid_chain(STATE, ["rotate_red_block_left", "turn_on_led", "open_drawer", "move_slider_left",
                                         "lift_red_block_table"])
    assert not chains.is_valid_chain(STATE, ["rotate_red_block_left", "push_blue_block_right", "open_drawer",
                                             "move_slider_left", "turn_on_led"])


def test_infeasible_task_makes_the_chain_invalid():
    assert not chains.is_valid_chain(STATE, ["turn_on_lightbulb"])  # already on
    assert not chains.is_valid_chain(STATE, ["lift_red_block_drawer"])  # no block in the drawer
    assert not chains.is_valid_chain(STATE, ["place_in_slider"])  # nothing grasped


def test_ambiguous_stack_is_invalid():
    # After lifting pink from the slider, red and blue are both on the table: two ways to stack.
    after_lift = chains.successor_states(STATE, "lift_pink_block_slider")
    assert len(after_lift) == 1 and after_lift[0]["grasped"] == 1
    assert len(chains.successor_states(after_lift[0], "stack_block")) == 2
    assert not chains.is_valid_chain(STATE, ["lift_pink_block_slider", "stack_block"])


def test_after_a_lift_only_place_or_stack_can_follow():
    lifted = chains.successor_states(STATE, "lift_red_block_table")[0]
    allowed = {t for t in TASK_NAMES if chains.successor_states(lifted, t)}
    assert allowed == {"place_in_slider", "stack_block"}  # place_in_drawer needs the (closed) drawer open


def test_lift_from_drawer_needs_a_block_put_there_first():
    state = {**STATE, "drawer": "open", "blue_block": "slider_right"}  # red alone on the table
    assert not chains.is_valid_chain(state, ["lift_red_block_drawer"])
    assert chains.is_valid_chain(state, ["push_into_drawer", "lift_red_block_drawer"])
    assert chains.is_valid_chain(state, ["lift_red_block_table", "place_in_drawer", "lift_red_block_drawer"])


def test_successor_states_requires_all_keys_and_known_tasks():
    with pytest.raises(ValueError, match="lacks keys"):
        chains.successor_states({"led": 0}, "turn_on_led")
    with pytest.raises(ValueError, match="did you mean 'turn_on_led'"):
        chains.successor_states(STATE, "turn_on_leds")


# ---- the official list ----------------------------------------------------------------------------------------


def test_first_official_chain_matches_protocol(official):
    state, tasks = official[0]
    assert state == {"led": 1, "lightbulb": 1, "slider": "left", "drawer": "open", "red_block": "slider_left",
                     "blue_block": "table", "pink_block": "slider_right", "grasped": 0}
    assert tasks == ("rotate_blue_block_right", "move_slider_right", "lift_red_block_slider", "place_in_slider",
                     "turn_off_lightbulb")


def test_official_task_statistics_match_protocol(official):
    counts = Counter(task for _, tasks in official for task in tasks)
    assert sum(counts.values()) == 5000 and set(counts) == set(TASK_NAMES)
    assert counts.most_common(5) == [("place_in_slider", 398), ("open_drawer", 379), ("move_slider_right", 317),
                                     ("move_slider_left", 284), ("close_drawer", 250)]
    assert (counts["lift_blue_block_drawer"], counts["lift_red_block_drawer"], counts["lift_pink_block_drawer"]) == (
        23, 23, 17)
    first = Counter(tasks[0] for _, tasks in official)
    assert (first["open_drawer"], first["move_slider_right"], first["move_slider_left"]) == (115, 87, 64)
    assert first["push_into_drawer"] == 15


def test_official_subset_is_the_first_n(official):
    assert chains.official_subset(1) == official[:1]
    assert chains.official_subset(100) == official[:100]
    assert chains.official_subset(1000) == official


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, "10", True, None])
def test_official_subset_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match=r"first_n must be an integer in \[1, 1000\]"):
        chains.official_subset(bad)


def test_official_chains_are_fresh_copies(official):
    chains.load_official_chains()[0][0]["led"] = 5
    assert chains.load_official_chains()[0][0]["led"] == 1
