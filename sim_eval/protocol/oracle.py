"""CALVIN's task oracle: which of the 34 tasks a change from ``start_info`` to ``end_info`` achieves.

A pure re-statement of calvin_env 797142c ``calvin_env/envs/tasks.py``: the same base predicates, thresholds, strict
inequalities and contact-set logic, configured by the same ``new_playtable_tasks.yaml``. The infos have the structure
of calvin_env's ``env.get_info()`` (protocol §2.2), so the oracle judges our playtable and the real calvin_env alike.
Contacts are PyBullet ``getContactPoints`` tuples whose index 2 is the other body's uid and index 4 its link index.

Two behaviours of the original are kept on purpose, because published CALVIN numbers were scored with them:

* ``push_object_into`` tests ``robot_uid not in start_contacts | end_contacts`` on sets of ``(uid, link)`` pairs, so
  that test is always true: the robot may still touch the block at the end. (At the start the "only contact is
  (table, base_link)" rule already excludes the robot.)
* ``stack_objects`` / ``unstack_objects`` compare each velocity *component* with ``max_vel``, not the norm.

Usage::

    from sim_eval.protocol.oracle import TaskOracle
    oracle = TaskOracle()                                   # the official new_playtable_tasks.yaml
    start = env.get_info()
    ...                                                     # step the env
    oracle.get_task_info_for_set(start, env.get_info(), {"open_drawer"})   # {'open_drawer'} once achieved
    oracle.get_task_info(start, env.get_info())             # every task achieved, e.g. for relabelling
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources

import numpy as np
import yaml
from scipy.spatial.transform import Rotation

from sim_eval.protocol.tasks import check_task_name

DEFAULT_TASKS_FILE = "new_playtable_tasks.yaml"

# PyBullet getContactPoints tuple: (contactFlag, bodyUniqueIdA, bodyUniqueIdB, linkIndexA, linkIndexB, ...).
_BODY_B, _LINK_B = 2, 4


class MalformedInfoError(ValueError):
    """An info dict lacks a key (or holds a malformed contact) that a task predicate needs."""


class _Info:
    """Read access to one ``get_info()`` dict that names the missing key when the structure is wrong."""

    def __init__(self, info: Mapping, label: str) -> None:
        if not isinstance(info, Mapping):
            raise MalformedInfoError(f"{label} must be a get_info() dict, got {type(info).__name__}")
        self.info = info
        self.label = label

    def get(self, *path):
        node = self.info
        for depth, key in enumerate(path):
            if not isinstance(node, Mapping) or key not in node:
                where = ".".join(str(k) for k in path[: depth + 1])
                raise MalformedInfoError(f"malformed {self.label}: missing key '{where}'")
            node = node[key]
        return node

    def robot_uid(self) -> int:
        return self.get("robot_info", "uid")

    def obj(self, name: str, field: str):
        return self.get("scene_info", "movable_objects", name, field)

    def movable_names(self) -> list[str]:
        return list(self.get("scene_info", "movable_objects"))

    def fixed_uid(self, body: str) -> int:
        return self.get("scene_info", "fixed_objects", body, "uid")

    def fixed_link(self, body: str, link: str) -> tuple[int, int]:
        """``(body uid, link id)``, the form in which contacts name a link of a fixed body."""
        return self.fixed_uid(body), self.get("scene_info", "fixed_objects", body, "links", link)

    def obj_bodies(self, name: str) -> set[int]:
        """Uids of the bodies touching movable object ``name``."""
        return self.contact_bodies("scene_info", "movable_objects", name, "contacts")

    def obj_links(self, name: str) -> set[tuple[int, int]]:
        """``(uid, link)`` pairs touching movable object ``name``."""
        return self.contact_links("scene_info", "movable_objects", name, "contacts")

    def contact_bodies(self, *path) -> set[int]:
        return {contact[_BODY_B] for contact in self._contacts(path, _BODY_B)}

    def contact_links(self, *path) -> set[tuple[int, int]]:
        return {(contact[_BODY_B], contact[_LINK_B]) for contact in self._contacts(path, _LINK_B)}

    def _contacts(self, path: tuple, needed_index: int) -> list:
        contacts = list(self.get(*path))
        for k, contact in enumerate(contacts):
            if len(contact) <= needed_index:
                raise MalformedInfoError(
                    f"malformed {self.label}: contact {k} of '{'.'.join(path)}' has {len(contact)} entries; "
                    f"a PyBullet contact point has bodyB at index {_BODY_B} and linkIndexB at index {_LINK_B}"
                )
        return contacts


# Keys every get_info() must have, whatever task is checked: validated up front, so that a simulator that leaves
# one out fails on its first oracle call rather than the first time some rare task would have succeeded.
_MOVABLE_OBJECT_KEYS = ("current_pos", "current_orn", "current_lin_vel", "current_ang_vel", "contacts", "uid")
_REQUIRED_PATHS = (
    ("robot_info", "uid"),
    ("robot_info", "contacts"),
    ("scene_info", "movable_objects"),
    ("scene_info", "fixed_objects"),
    ("scene_info", "doors"),
    ("scene_info", "lights"),
)


def validate_info(info: Mapping, label: str = "info") -> None:
    """Raise ``MalformedInfoError`` naming the first missing key of the get_info() structure the oracle reads.

    Task-specific entries (a door, light or fixed body by name) are checked when a task reads them.
    """
    view = _Info(info, label)
    for path in _REQUIRED_PATHS:
        view.get(*path)
    for name in view.movable_names():
        for key in _MOVABLE_OBJECT_KEYS:
            view.obj(name, key)


def _views(start_info: Mapping, end_info: Mapping) -> tuple[_Info, _Info]:
    return _Info(start_info, "start_info"), _Info(end_info, "end_info")


def _position_change(start: _Info, end: _Info, obj_name: str) -> np.ndarray:
    return np.asarray(end.obj(obj_name, "current_pos"), float) - np.asarray(start.obj(obj_name, "current_pos"), float)


def _joint_state(info: _Info, joint_name: str) -> float:
    # calvin_env reports a door's state as a float; a 1-element sequence is accepted too.
    return float(np.ravel(info.get("scene_info", "doors", joint_name, "current_state"))[0])


# --------------------------------------------------------------------------------------------------------------
# Base predicates. Same names, arguments and defaults as calvin_env's Tasks; infos are keyword-only.


def rotate_object(
    obj_name: str,
    z_degrees: float,
    x_y_threshold: float = 30,
    z_threshold: float = 180,
    movement_threshold: float = 0.1,
    *,
    start_info: Mapping,
    end_info: Mapping,
) -> bool:
    """The object turned beyond ``z_degrees`` about z (positive = left/counter-clockwise) without tilting
    ``x_y_threshold`` degrees or more, moved at most ``movement_threshold`` m, and ends resting on something other
    than the robot."""
    start, end = _views(start_info, end_info)
    # The relative rotation end * start^-1 as extrinsic xyz Euler angles, exactly as calvin_env computes it.
    rotation = Rotation.from_quat(end.obj(obj_name, "current_orn")) * Rotation.from_quat(
        start.obj(obj_name, "current_orn")
    ).inv()
    x, y, z = rotation.as_euler("xyz", degrees=True)
    if np.linalg.norm(_position_change(start, end, obj_name)) > movement_threshold:
        return False
    if not end.obj_bodies(obj_name) - {start.robot_uid()}:
        return False  # held in the air by the robot only
    tilt_ok = abs(x) < x_y_threshold and abs(y) < x_y_threshold
    if z_degrees > 0:
        return bool(z_degrees < z < z_threshold and tilt_ok)
    return bool(z_degrees > z > -z_threshold and tilt_ok)


def push_object(
    obj_name: str, x_direction: float, y_direction: float, *, start_info: Mapping, end_info: Mapping
) -> bool:
    """The object moved more than ``x_direction`` (or ``y_direction``) metres in that signed direction while resting
    on a surface at start and end, the start surfaces being a subset of the end ones (it stayed on its surface)."""
    if x_direction * y_direction != 0 or x_direction + y_direction == 0:
        raise ValueError("push_object needs exactly one non-zero direction (x_direction or y_direction)")
    start, end = _views(start_info, end_info)
    pos_diff = _position_change(start, end, obj_name)
    robot_uid = start.robot_uid()
    # Surface contacts, as (body, link) pairs, excluding the pushing robot.
    start_surfaces = {c for c in start.obj_links(obj_name) if c[0] != robot_uid}
    end_surfaces = {c for c in end.obj_links(obj_name) if c[0] != robot_uid}
    if not (start_surfaces and end_surfaces and start_surfaces <= end_surfaces):
        return False
    axis, threshold = (0, x_direction) if x_direction != 0 else (1, y_direction)
    return bool(pos_diff[axis] > threshold if threshold > 0 else pos_diff[axis] < threshold)


def lift_object(
    obj_name: str,
    z_direction: float,
    surface_body: str | None = None,
    surface_link: str | None = None,
    *,
    start_info: Mapping,
    end_info: Mapping,
) -> bool:
    """The object rose more than ``z_direction`` m, its only contact at the end is the robot, and at the start it
    touched ``surface_body`` (its ``surface_link`` if given)."""
    if z_direction <= 0:
        raise ValueError(f"lift_object needs z_direction > 0, got {z_direction}")
    start, end = _views(start_info, end_info)
    z_diff = _position_change(start, end, obj_name)[2]
    end_bodies = end.obj_bodies(obj_name)
    if surface_body and surface_link is None:
        on_surface = start.fixed_uid(surface_body) in start.obj_bodies(obj_name)
    elif surface_body and surface_link:
        on_surface = start.fixed_link(surface_body, surface_link) in start.obj_links(obj_name)
    else:
        on_surface = True
    return bool(z_diff > z_direction and end_bodies == {start.robot_uid()} and on_surface)


def place_object(dest_body: str, dest_link: str | None = None, *, start_info: Mapping, end_info: Mapping) -> bool:
    """At the start the robot touches exactly one body, a movable object held only by the robot; at the end the
    robot has let go and the object touches ``dest_body`` (its ``dest_link`` if given)."""
    start, end = _views(start_info, end_info)
    robot_uid = start.robot_uid()
    robot_start = start.contact_bodies("robot_info", "contacts")
    robot_end = end.contact_bodies("robot_info", "contacts")
    if len(robot_start) != 1:
        return False
    (obj_uid,) = robot_start
    if obj_uid in robot_end:
        return False
    held = [name for name in start.movable_names() if start.obj(name, "uid") == obj_uid]
    if len(held) != 1:
        return False  # the robot touches a fixed body, not a block
    obj_name = held[0]
    obj_start = start.obj_bodies(obj_name)
    held_only_by_robot = robot_uid in obj_start and len(obj_start) == 1
    if dest_link is None:
        on_dest = end.fixed_uid(dest_body) in end.obj_bodies(obj_name)
    else:
        on_dest = end.fixed_link(dest_body, dest_link) in end.obj_links(obj_name)
    return bool(held_only_by_robot and on_dest)


def push_object_into(
    obj_name: str | Sequence[str],
    src_body: str,
    src_link: str,
    dest_body: str,
    dest_link: str,
    *,
    start_info: Mapping,
    end_info: Mapping,
) -> bool:
    """The object (any of a list) went from touching only ``(src_body, src_link)`` to touching
    ``(dest_body, dest_link)``. The robot may touch it at the end (calvin_env's vacuous robot test, module doc)."""
    if not isinstance(obj_name, str):
        return any(
            push_object_into(name, src_body, src_link, dest_body, dest_link, start_info=start_info, end_info=end_info)
            for name in obj_name
        )
    start, end = _views(start_info, end_info)
    start_links = start.obj_links(obj_name)
    end_links = end.obj_links(obj_name)
    return bool(
        start_links == {start.fixed_link(src_body, src_link)} and end.fixed_link(dest_body, dest_link) in end_links
    )


def move_door_abs(
    joint_name: str, start_threshold: float, end_threshold: float, *, start_info: Mapping, end_info: Mapping
) -> bool:
    """The joint went from beyond ``start_threshold`` to beyond ``end_threshold`` (unused by the 34 tasks)."""
    start, end = _views(start_info, end_info)
    before, after = _joint_state(start, joint_name), _joint_state(end, joint_name)
    if start_threshold < end_threshold:
        return bool(before < start_threshold < end_threshold < after)
    if start_threshold > end_threshold:
        return bool(before > start_threshold > end_threshold > after)
    raise ValueError("move_door_abs needs start_threshold != end_threshold")


def move_door_rel(joint_name: str, threshold: float, *, start_info: Mapping, end_info: Mapping) -> bool:
    """The joint moved by more than ``threshold`` in the threshold's direction (strictly)."""
    start, end = _views(start_info, end_info)
    delta = _joint_state(end, joint_name) - _joint_state(start, joint_name)
    return bool(0 < threshold < delta or 0 > threshold > delta)


def toggle_light(light_name: str, start_state: int, end_state: int, *, start_info: Mapping, end_info: Mapping) -> bool:
    """The light's logical state was ``start_state`` at the start and is ``end_state`` at the end."""
    start, end = _views(start_info, end_info)
    return bool(
        start.get("scene_info", "lights", light_name, "logical_state") == start_state
        and end.get("scene_info", "lights", light_name, "logical_state") == end_state
    )


def _slow(info: _Info, name: str, max_vel: float) -> bool:
    return bool(
        np.all(np.abs(info.obj(name, "current_lin_vel")) < max_vel)
        and np.all(np.abs(info.obj(name, "current_ang_vel")) < max_vel)
    )


def stack_objects(max_vel: float = 1, *, start_info: Mapping, end_info: Mapping) -> bool:
    """Some movable object without movable-object contact at the start ends up touching only other movable objects
    (not the robot, not the table), at rest (every end velocity component below ``max_vel``)."""
    start, end = _views(start_info, end_info)
    names = start.movable_names()
    uids = {start.obj(name, "uid") for name in names}
    for name in names:
        start_bodies, end_bodies = start.obj_bodies(name), end.obj_bodies(name)
        if not uids & start_bodies and uids & end_bodies and not end_bodies - uids and _slow(end, name, max_vel):
            return True
    return False


def unstack_objects(max_vel: float = 1, *, start_info: Mapping, end_info: Mapping) -> bool:
    """Some movable object touching only movable objects at the start (it sat on top), at rest then (every start
    velocity component below ``max_vel``), touches no movable object at the end."""
    start, end = _views(start_info, end_info)
    names = start.movable_names()
    uids = {start.obj(name, "uid") for name in names}
    for name in names:
        start_bodies, end_bodies = start.obj_bodies(name), end.obj_bodies(name)
        if uids & start_bodies and not start_bodies - uids and not uids & end_bodies and _slow(start, name, max_vel):
            return True
    return False


PREDICATES: dict[str, Callable[..., bool]] = {
    fn.__name__: fn
    for fn in (
        rotate_object,
        push_object,
        lift_object,
        place_object,
        push_object_into,
        move_door_abs,
        move_door_rel,
        toggle_light,
        stack_objects,
        unstack_objects,
    )
}


# --------------------------------------------------------------------------------------------------------------


def _bind_task(name: str, spec: Sequence) -> Callable[..., bool]:
    """Turn a YAML entry ``[predicate, *args]`` into ``f(start_info=..., end_info=...)``, checking it up front."""
    if not isinstance(spec, Sequence) or isinstance(spec, str) or not spec:
        raise ValueError(f"task {name!r}: expected a list [predicate, *args], got {spec!r}")
    predicate_name, *args = spec
    if predicate_name not in PREDICATES:
        raise ValueError(f"task {name!r}: unknown predicate {predicate_name!r}; known: {sorted(PREDICATES)}")
    predicate = PREDICATES[predicate_name]
    try:
        inspect.signature(predicate).bind(*args, start_info={}, end_info={})
    except TypeError as err:
        raise ValueError(f"task {name!r}: bad arguments {args!r} for {predicate_name}: {err}") from None
    return functools.partial(predicate, *args)


def _read_tasks_yaml(path: str | os.PathLike | None) -> Mapping:
    if path is None:
        text = resources.files("sim_eval.protocol").joinpath("data", DEFAULT_TASKS_FILE).read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    config = yaml.safe_load(text)
    if not isinstance(config, Mapping) or not isinstance(config.get("tasks"), Mapping):
        raise ValueError(f"{path or DEFAULT_TASKS_FILE}: expected a mapping with a 'tasks' mapping")
    return config["tasks"]


class TaskOracle:
    """calvin_env's ``Tasks``: detects achieved tasks by comparing a start info with a later info.

    Build it from the tasks YAML (``TaskOracle()`` for the official one, ``TaskOracle.from_yaml(path)``) or from
    a ``{task_name: [predicate, *args]}`` mapping. Task names must be CALVIN task names.

    Usage::

        oracle = TaskOracle()
        oracle.get_task_info_for_set(start_info, info, {"turn_on_led"})   # set() or {'turn_on_led'}
        oracle.get_task_info(start_info, info)                          # all achieved tasks
    """

    def __init__(self, tasks: Mapping[str, Sequence] | None = None) -> None:
        if tasks is None:
            tasks = _read_tasks_yaml(None)
        self._tasks: dict[str, Callable[..., bool]] = {
            check_task_name(name): _bind_task(name, spec) for name, spec in tasks.items()
        }
        self.task_to_id = {name: i for i, name in enumerate(self._tasks)}
        self.id_to_task = dict(enumerate(self._tasks))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None = None) -> TaskOracle:
        """An oracle from a tasks YAML in calvin_env's format (default: the official one in ``sim_eval/protocol/data``)."""
        return cls(_read_tasks_yaml(path))

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self._tasks)

    @property
    def num_tasks(self) -> int:
        return len(self._tasks)

    def get_task_info(self, start_info: Mapping, end_info: Mapping) -> set[str]:
        """Every configured task achieved between ``start_info`` and ``end_info``."""
        return self._achieved(self._tasks, start_info, end_info)

    def get_task_info_for_set(self, start_info: Mapping, end_info: Mapping, task_names: Iterable[str]) -> set[str]:
        """The tasks of ``task_names`` achieved between the infos (a bare string counts as one task name).

        Unlike calvin_env, which silently skips unknown names, an unknown name raises ``ValueError``: a typo would
        otherwise score as a failure.
        """
        wanted = {task_names} if isinstance(task_names, str) else set(task_names)
        for name in wanted:
            check_task_name(name)
            if name not in self._tasks:
                raise ValueError(f"task {name!r} is not configured in this oracle ({self.num_tasks} tasks)")
        return self._achieved({name: fn for name, fn in self._tasks.items() if name in wanted}, start_info, end_info)

    @staticmethod
    def _achieved(tasks: Mapping[str, Callable[..., bool]], start_info: Mapping, end_info: Mapping) -> set[str]:
        validate_info(start_info, "start_info")
        validate_info(end_info, "end_info")
        return {name for name, fn in tasks.items() if fn(start_info=start_info, end_info=end_info)}


def oracle_for(env):
    """The success oracle of ``env``: calvin_env's own when the env offers one (the real-calvin bridge), else
    ghil's re-implementation (the same predicates)."""
    if hasattr(env, "make_task_oracle"):
        return env.make_task_oracle()
    return TaskOracle()
