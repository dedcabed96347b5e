"""The task oracle on hand-made get_info() dicts: every predicate family, positive and negative."""

import copy

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from sim_eval.world import layout
from sim_eval.protocol.oracle import MalformedInfoError, TaskOracle, push_object
from sim_eval.protocol.tasks import TASK_NAMES

ROBOT, TABLE = 1, 5
UIDS = {"block_red": 2, "block_blue": 3, "block_pink": 4}
START_YAW_DEG = 80.0


@pytest.fixture(scope="module")
def oracle():
    return TaskOracle()


# ---- info builders ----------------------------------------------------------------------------------------------


def table(link="base_link"):
    """A contact point touching a link of the table (PyBullet layout: index 2 bodyB, index 4 linkIndexB)."""
    return (0, 99, TABLE, -1, layout.TABLE_LINK_IDS[link], (0.0, 0.0, 0.0))


def robot():
    return (0, 99, ROBOT, -1, 10, (0.0, 0.0, 0.0))


def block(name):
    return (0, 99, UIDS[name], -1, -1, (0.0, 0.0, 0.0))


def make_info(slider=0.0, drawer=0.0, led=0, lightbulb=0):
    """A resting scene: every block on the table top, nothing touching the robot."""
    movable = {}
    for i, (name, uid) in enumerate(UIDS.items()):
        movable[name] = {
            "current_pos": (0.05 + 0.1 * i, -0.12, 0.46),
            "current_orn": tuple(Rotation.from_euler("z", START_YAW_DEG, degrees=True).as_quat()),
            "current_lin_vel": (0.0, 0.0, 0.0),
            "current_ang_vel": (0.0, 0.0, 0.0),
            "contacts": [table()],
            "uid": uid,
        }
    return {
        "robot_info": {"uid": ROBOT, "contacts": [], "tcp_pos": (0.0, -0.2, 0.6)},
        "scene_info": {
            "movable_objects": movable,
            "fixed_objects": {"table": {"uid": TABLE, "links": dict(layout.TABLE_LINK_IDS), "contacts": []}},
            "doors": {"base__slide": {"current_state": slider}, "base__drawer": {"current_state": drawer}},
            "lights": {"led": {"logical_state": led}, "lightbulb": {"logical_state": lightbulb}},
            "buttons": {}, "switches": {},
        },
    }


def obj(info, name):
    return info["scene_info"]["movable_objects"][name]


def moved(info, name, dx=0.0, dy=0.0, dz=0.0):
    x, y, z = obj(info, name)["current_pos"]
    obj(info, name)["current_pos"] = (x + dx, y + dy, z + dz)


def rotated(info, name, x_deg=0.0, y_deg=0.0, z_deg=0.0):
    """Apply a relative rotation whose xyz-Euler decomposition is exactly (x_deg, y_deg, z_deg)."""
    rel = Rotation.from_euler("xyz", [x_deg, y_deg, z_deg], degrees=True)
    obj(info, name)["current_orn"] = tuple((rel * Rotation.from_quat(obj(info, name)["current_orn"])).as_quat())


def check(oracle, start, end, task):
    return bool(oracle.get_task_info_for_set(start, end, {task}))


@pytest.fixture
def start():
    return make_info()


@pytest.fixture
def end(start):
    return copy.deepcopy(start)


# ---- construction -------------------------------------------------------------------------------------------------


def test_default_oracle_has_the_34_tasks_in_official_order(oracle):
    assert oracle.task_names == TASK_NAMES
    assert oracle.num_tasks == 34
    assert oracle.task_to_id["rotate_red_block_right"] == 0 and oracle.id_to_task[33] == "push_into_drawer"


def test_from_yaml_default_equals_default(oracle):
    assert TaskOracle.from_yaml().task_names == oracle.task_names


def test_nothing_happens_nothing_achieved(oracle, start, end):
    assert oracle.get_task_info(start, end) == set()


# ---- rotate -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("z_deg, expected", [(70, "rotate_red_block_left"), (-70, "rotate_red_block_right")])
def test_rotate_sign_picks_left_or_right(oracle, start, end, z_deg, expected):
    rotated(end, "block_red", z_deg=z_deg)
    assert oracle.get_task_info(start, end) == {expected}


@pytest.mark.parametrize("z_deg", [59, -59, 30, 0])
def test_rotate_needs_more_than_60_degrees(oracle, start, end, z_deg):
    rotated(end, "block_red", z_deg=z_deg)
    assert oracle.get_task_info(start, end) == set()


@pytest.mark.parametrize("tilt_deg, achieved", [(25, True), (-29, True), (31, False), (-35, False)])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_rotate_tilt_limit_is_30_degrees(oracle, start, end, tilt_deg, achieved, axis):
    rotated(end, "block_blue", z_deg=-75, **{f"{axis}_deg": tilt_deg})
    assert check(oracle, start, end, "rotate_blue_block_right") is achieved


@pytest.mark.parametrize("shift, achieved", [(0.09, True), (0.11, False)])
def test_rotate_position_change_limit_is_0_1_m(oracle, start, end, shift, achieved):
    rotated(end, "block_pink", z_deg=90)
    moved(end, "block_pink", dx=shift * 0.6, dy=shift * 0.8)  # |d| = shift, neither axis alone exceeds 0.1
    assert check(oracle, start, end, "rotate_pink_block_left") is achieved


def test_rotate_fails_while_held_only_by_the_robot(oracle, start, end):
    rotated(end, "block_red", z_deg=90)
    obj(end, "block_red")["contacts"] = [robot()]
    assert not check(oracle, start, end, "rotate_red_block_left")
    obj(end, "block_red")["contacts"] = [robot(), table()]
    assert check(oracle, start, end, "rotate_red_block_left")


def test_rotate_is_relative_to_the_start_orientation(oracle, start, end):
    # Both orientations far from identity: only the relative +65 deg counts.
    rotated(start, "block_red", z_deg=100)
    end = copy.deepcopy(start)
    rotated(end, "block_red", z_deg=65)
    assert oracle.get_task_info(start, end) == {"rotate_red_block_left"}


# ---- push ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dx, expected", [(0.12, {"push_red_block_right"}), (-0.12, {"push_red_block_left"}),
                                          (0.09, set()), (-0.09, set())])
def test_push_needs_more_than_0_1_m_along_x(oracle, start, end, dx, expected):
    moved(end, "block_red", dx=dx)
    assert oracle.get_task_info(start, end) == expected


def test_push_along_y_does_not_count(oracle, start, end):
    moved(end, "block_blue", dy=0.2)
    assert oracle.get_task_info(start, end) == set()


def test_push_robot_contacts_are_ignored(oracle, start, end):
    obj(start, "block_red")["contacts"] = [table(), robot()]
    moved(end, "block_red", dx=0.12)
    assert check(oracle, start, end, "push_red_block_right")


def test_push_end_surfaces_may_grow(oracle, start, end):
    moved(end, "block_red", dx=0.12)
    obj(end, "block_red")["contacts"] = [table(), table("drawer_link")]
    assert check(oracle, start, end, "push_red_block_right")


def test_push_fails_when_the_block_changes_surface(oracle, start, end):
    moved(end, "block_red", dx=0.12)
    obj(end, "block_red")["contacts"] = [table("drawer_link")]
    assert not check(oracle, start, end, "push_red_block_right")


@pytest.mark.parametrize("where", ["start", "end"])
def test_push_needs_a_non_robot_surface_at_start_and_end(oracle, start, end, where):
    moved(end, "block_pink", dx=-0.15)
    obj({"start": start, "end": end}[where], "block_pink")["contacts"] = [robot()]
    assert not check(oracle, start, end, "push_pink_block_left")


def test_push_predicate_rejects_ambiguous_directions(start, end):
    with pytest.raises(ValueError, match="exactly one non-zero direction"):
        push_object("block_red", 0.1, 0.1, start_info=start, end_info=end)


# ---- doors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "joint, before, after, expected",
    [
        ("slider", 0.0, 0.16, {"move_slider_left"}),
        ("slider", 0.28, 0.12, {"move_slider_right"}),
        ("slider", 0.0, 0.15, set()),  # strictly more than 0.15
        ("slider", 0.28, 0.14, set()),
        ("drawer", 0.0, 0.13, {"open_drawer"}),
        ("drawer", 0.22, 0.09, {"close_drawer"}),
        ("drawer", 0.0, 0.11, set()),
        ("drawer", 0.22, 0.11, set()),
    ],
)
def test_move_door_rel_thresholds_both_signs(oracle, joint, before, after, expected):
    start, end = make_info(**{joint: before}), make_info(**{joint: after})
    assert oracle.get_task_info(start, end) == expected


# ---- lift ---------------------------------------------------------------------------------------------------------


def lift_setup(start, end, name, link, dz):
    obj(start, name)["contacts"] = [table(link)]
    obj(end, name)["contacts"] = [robot()]
    moved(end, name, dz=dz)


@pytest.mark.parametrize(
    "link, dz, expected",
    [
        ("base_link", 0.06, {"lift_red_block_table"}),
        ("base_link", 0.04, set()),
        ("plank_link", 0.04, {"lift_red_block_slider"}),
        ("plank_link", 0.02, set()),
        ("drawer_link", 0.06, {"lift_red_block_drawer"}),
        ("drawer_link", 0.045, set()),
    ],
)
def test_lift_threshold_depends_on_the_start_surface(oracle, start, end, link, dz, expected):
    lift_setup(start, end, "block_red", link, dz)
    assert oracle.get_task_info(start, end) == expected


@pytest.mark.parametrize("end_contacts", [[robot(), block("block_blue")], [robot(), table()], []])
def test_lift_needs_the_robot_as_only_end_contact(oracle, start, end, end_contacts):
    lift_setup(start, end, "block_pink", "base_link", 0.1)
    obj(end, "block_pink")["contacts"] = end_contacts
    assert not check(oracle, start, end, "lift_pink_block_table")


def test_lift_allows_robot_contact_at_start(oracle, start, end):
    # calvin_env comments this condition out: grasping before the subtask starts still counts.
    lift_setup(start, end, "block_blue", "base_link", 0.1)
    obj(start, "block_blue")["contacts"] = [table(), robot()]
    assert check(oracle, start, end, "lift_blue_block_table")


# ---- place --------------------------------------------------------------------------------------------------------


def held_at_start(start, name):
    start["robot_info"]["contacts"] = [block(name)]
    obj(start, name)["contacts"] = [robot()]


@pytest.mark.parametrize("link, expected", [("plank_link", {"place_in_slider"}), ("drawer_link", {"place_in_drawer"}),
                                            ("base_link", set())])
def test_place_on_the_destination_link(oracle, start, end, link, expected):
    held_at_start(start, "block_blue")
    obj(end, "block_blue")["contacts"] = [table(link)]
    assert oracle.get_task_info_for_set(start, end, {"place_in_slider", "place_in_drawer"}) == expected


def test_place_fails_while_the_robot_still_touches_the_block(oracle, start, end):
    held_at_start(start, "block_blue")
    obj(end, "block_blue")["contacts"] = [table("plank_link"), robot()]
    end["robot_info"]["contacts"] = [block("block_blue")]
    assert not check(oracle, start, end, "place_in_slider")


def test_place_needs_the_robot_to_touch_exactly_one_block(oracle, start, end):
    held_at_start(start, "block_blue")
    start["robot_info"]["contacts"] = [block("block_blue"), block("block_red")]
    obj(end, "block_blue")["contacts"] = [table("plank_link")]
    assert not check(oracle, start, end, "place_in_slider")


def test_place_needs_the_block_held_by_the_robot_only(oracle, start, end):
    held_at_start(start, "block_red")
    obj(start, "block_red")["contacts"] = [robot(), table("plank_link")]  # still resting, not lifted
    obj(end, "block_red")["contacts"] = [table("plank_link")]
    assert not check(oracle, start, end, "place_in_slider")


def test_place_ignores_robot_touching_a_fixed_body(oracle, start, end):
    start["robot_info"]["contacts"] = [table("drawer_link")]
    assert not check(oracle, start, end, "place_in_drawer")


# ---- stack / unstack ----------------------------------------------------------------------------------------------


def stacked_end(start, end, top="block_blue", bottom="block_red"):
    obj(start, top)["contacts"] = [robot()]
    obj(end, top)["contacts"] = [block(bottom)]
    obj(end, bottom)["contacts"] = [table(), block(top)]


def test_stack_positive(oracle, start, end):
    stacked_end(start, end)
    assert oracle.get_task_info(start, end) == {"stack_block"}


@pytest.mark.parametrize("extra", [robot(), table()])
def test_stack_top_may_touch_only_blocks(oracle, start, end, extra):
    stacked_end(start, end)
    obj(end, "block_blue")["contacts"].append(extra)
    assert not check(oracle, start, end, "stack_block")


@pytest.mark.parametrize("field", ["current_lin_vel", "current_ang_vel"])
def test_stack_needs_the_top_block_at_rest(oracle, start, end, field):
    stacked_end(start, end)
    obj(end, "block_blue")[field] = (0.0, -1.2, 0.0)  # one component over 1 is enough to fail
    assert not check(oracle, start, end, "stack_block")
    obj(end, "block_blue")[field] = (0.9, -0.9, 0.9)  # norm > 1 but every component < 1: still at rest
    assert check(oracle, start, end, "stack_block")


def test_stack_fails_if_already_touching_a_block_at_start(oracle, start, end):
    stacked_end(start, end)
    obj(start, "block_blue")["contacts"] = [robot(), block("block_red")]
    assert not check(oracle, start, end, "stack_block")


def unstack_setup(start, end, top="block_pink", bottom="block_blue"):
    obj(start, top)["contacts"] = [block(bottom)]
    obj(start, bottom)["contacts"] = [table(), block(top)]
    obj(end, top)["contacts"] = [robot()]


def test_unstack_positive(oracle, start, end):
    unstack_setup(start, end)
    assert oracle.get_task_info(start, end) == {"unstack_block"}


def test_unstack_fails_while_still_on_a_block(oracle, start, end):
    unstack_setup(start, end)
    obj(end, "block_pink")["contacts"] = [robot(), block("block_blue")]
    assert not check(oracle, start, end, "unstack_block")


def test_unstack_needs_the_top_block_at_rest_at_start(oracle, start, end):
    unstack_setup(start, end)
    obj(start, "block_pink")["current_lin_vel"] = (1.5, 0.0, 0.0)
    assert not check(oracle, start, end, "unstack_block")


def test_unstack_needs_the_block_on_top_only(oracle, start, end):
    unstack_setup(start, end)
    obj(start, "block_pink")["contacts"] = [block("block_blue"), table()]  # leaning, not stacked
    assert not check(oracle, start, end, "unstack_block")


# ---- lights -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "before, after, expected",
    [
        (dict(led=0), dict(led=1), {"turn_on_led"}),
        (dict(led=1), dict(led=0), {"turn_off_led"}),
        (dict(lightbulb=0), dict(lightbulb=1), {"turn_on_lightbulb"}),
        (dict(lightbulb=1), dict(lightbulb=0), {"turn_off_lightbulb"}),
        (dict(led=1, lightbulb=1), dict(led=1, lightbulb=1), set()),
    ],
)
def test_toggle_light(oracle, before, after, expected):
    assert oracle.get_task_info(make_info(**before), make_info(**after)) == expected


# ---- push into drawer ---------------------------------------------------------------------------------------------


def test_push_into_drawer_positive_for_any_block(oracle, start, end):
    obj(end, "block_pink")["contacts"] = [table("drawer_link")]
    moved(end, "block_pink", dz=-0.1)
    assert oracle.get_task_info(start, end) == {"push_into_drawer"}


def test_push_into_drawer_needs_table_top_as_only_start_contact(oracle, start, end):
    obj(start, "block_red")["contacts"] = [table(), robot()]
    obj(end, "block_red")["contacts"] = [table("drawer_link")]
    assert not check(oracle, start, end, "push_into_drawer")


def test_push_into_drawer_needs_the_drawer_at_the_end(oracle, start, end):
    obj(end, "block_red")["contacts"] = [table()]
    assert not check(oracle, start, end, "push_into_drawer")


def test_push_into_drawer_keeps_calvins_vacuous_end_robot_test(oracle, start, end):
    # calvin_env checks an int uid against a set of (uid, link) pairs, so a robot touching at the end still counts.
    obj(end, "block_red")["contacts"] = [table("drawer_link"), robot()]
    assert check(oracle, start, end, "push_into_drawer")


# ---- protocol §2.2 checks ------------------------------------------------------------------------------------------


def test_teleport_check_from_protocol(oracle):
    start, end = make_info(), make_info(slider=0.28, drawer=0.22, led=1, lightbulb=1)
    assert oracle.get_task_info(start, end) == {"open_drawer", "move_slider_left", "turn_on_led", "turn_on_lightbulb"}


def test_red_block_moved_12_cm_check_from_protocol(oracle, start, end):
    moved(end, "block_red", dx=0.12)
    assert oracle.get_task_info(start, end) == {"push_red_block_right"}


def test_get_task_info_for_set_filters(oracle):
    start, end = make_info(), make_info(drawer=0.22, led=1)
    assert oracle.get_task_info_for_set(start, end, {"open_drawer"}) == {"open_drawer"}
    assert oracle.get_task_info_for_set(start, end, ["close_drawer", "turn_on_led"]) == {"turn_on_led"}
    assert oracle.get_task_info_for_set(start, end, "open_drawer") == {"open_drawer"}  # a bare name is one task
    assert oracle.get_task_info_for_set(start, end, set()) == set()


# ---- errors -------------------------------------------------------------------------------------------------------


def test_unknown_task_in_filter_raises_with_suggestion(oracle, start, end):
    with pytest.raises(ValueError, match="did you mean 'open_drawer'"):
        oracle.get_task_info_for_set(start, end, {"open_drawr"})


def test_task_missing_from_a_custom_oracle_raises(start, end):
    custom = TaskOracle({"open_drawer": ["move_door_rel", "base__drawer", 0.12]})
    assert custom.get_task_info(start, end) == set()
    with pytest.raises(ValueError, match="not configured"):
        custom.get_task_info_for_set(start, end, {"close_drawer"})


@pytest.mark.parametrize(
    "tasks, message",
    [
        ({"open_drawers": ["move_door_rel", "base__drawer", 0.12]}, "did you mean 'open_drawer'"),
        ({"open_drawer": ["move_door_relative", "base__drawer", 0.12]}, "unknown predicate"),
        ({"open_drawer": ["move_door_rel", "base__drawer"]}, "bad arguments"),
        ({"open_drawer": "move_door_rel"}, "expected a list"),
    ],
)
def test_bad_task_config_raises(tasks, message):
    with pytest.raises(ValueError, match=message):
        TaskOracle(tasks)


def _without(info, *path):
    info = copy.deepcopy(info)
    node = info
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return info


@pytest.mark.parametrize(
    "path",
    [
        ("robot_info",),
        ("scene_info",),
        ("robot_info", "uid"),
        ("robot_info", "contacts"),
        ("scene_info", "movable_objects"),
        ("scene_info", "fixed_objects"),
        ("scene_info", "doors"),
        ("scene_info", "lights"),
        *[("scene_info", "movable_objects", "block_blue", key) for key in
          ("current_pos", "current_orn", "current_lin_vel", "current_ang_vel", "contacts", "uid")],
    ],
)
@pytest.mark.parametrize("which", ["start", "end"])
def test_missing_structural_key_raises_for_any_task(oracle, start, end, path, which):
    # Checked up front: even a lights-only query rejects an info that lacks block velocities.
    bad_start, bad_end = (_without(start, *path), end) if which == "start" else (start, _without(end, *path))
    with pytest.raises(MalformedInfoError, match=rf"malformed {which}_info: missing key '{'.'.join(path)}'"):
        oracle.get_task_info_for_set(bad_start, bad_end, {"turn_on_led"})


@pytest.mark.parametrize(
    "which, path, task",
    [
        ("start", ("scene_info", "doors", "base__drawer", "current_state"), "open_drawer"),
        ("end", ("scene_info", "doors", "base__slide"), "move_slider_left"),
        ("end", ("scene_info", "lights", "led"), "turn_on_led"),
        ("start", ("scene_info", "fixed_objects", "table", "links"), "lift_red_block_table"),
        ("end", ("scene_info", "fixed_objects", "table"), "push_into_drawer"),
        ("start", ("scene_info", "movable_objects", "block_pink"), "rotate_pink_block_left"),
    ],
)
def test_missing_task_specific_key_raises_naming_it(oracle, start, end, which, path, task):
    bad_start, bad_end = (_without(start, *path), end) if which == "start" else (start, _without(end, *path))
    with pytest.raises(MalformedInfoError, match=rf"malformed {which}_info: missing key '{'.'.join(path)}'"):
        oracle.get_task_info_for_set(bad_start, bad_end, {task})


def test_malformed_info_error_is_a_value_error():
    assert issubclass(MalformedInfoError, ValueError)


@pytest.mark.parametrize("bad", [None, [], "info"])
def test_non_dict_info_raises(oracle, start, bad):
    with pytest.raises(ValueError, match="must be a get_info\\(\\) dict"):
        oracle.get_task_info(start, bad)


def test_short_contact_tuple_raises(oracle, start, end):
    obj(end, "block_red")["contacts"] = [(0, 99, TABLE)]  # no linkIndexB
    moved(end, "block_red", dx=0.12)
    with pytest.raises(ValueError, match="linkIndexB at index 4"):
        oracle.get_task_info_for_set(start, end, {"push_red_block_right"})


def test_numpy_values_are_accepted(oracle, start, end):
    moved(end, "block_red", dx=0.12)
    for info in (start, end):
        for o in info["scene_info"]["movable_objects"].values():
            o["current_pos"] = np.array(o["current_pos"])
            o["current_orn"] = np.array(o["current_orn"])
    assert oracle.get_task_info(start, end) == {"push_red_block_right"}
