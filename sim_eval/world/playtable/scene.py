"""The playtable scene: desk articulations (slider, drawer, button, switch), lights and the three blocks.

State follows calvin_env's PlayTableScene exactly where the oracle or ``scene_obs`` can see it: door joints are
held by a weak velocity motor (friction), the button springs back and toggles the LED on each press (rising edge),
the switch's position decides the light bulb, and ``get_info()`` has calvin's structure.

Usage::

    scene = PlayTableScene(client, urdf_paths, SceneVariation())
    scene.reset(scene_obs)            # (24,) calvin layout
    scene.get_obs(), scene.get_info()
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pybullet as p

from sim_eval.world import layout
from sim_eval.world.playtable.models import DESK_MATERIALS

DOOR_FRICTION_FORCE = 4.0  # calvin's MAX_FORCE for doors, button and switch motors
LED_ON_RGBA = (0.0, 1.0, 0.0, 1.0)
BULB_ON_RGBA = (1.0, 1.0, 0.0, 1.0)
LAMP_OFF_RGBA = DESK_MATERIALS["lamp_off"]


@dataclass
class SceneVariation:
    """Visual domain-randomisation knobs, applied at each reset (all off by default: CALVIN's look).

    Usage::

        SceneVariation(lighting=True, camera_jitter_m=0.01, desk_colors=True)
    """

    lighting: bool = False
    camera_jitter_m: float = 0.0
    desk_colors: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.camera_jitter_m <= 0.1:
            raise ValueError(f"camera_jitter_m must be in [0, 0.1] m, got {self.camera_jitter_m}")


class PlayTableScene:
    """Loads and drives the desk, its articulations and the blocks in one pybullet client."""

    def __init__(self, client: int, urdf_paths: dict, variation: SceneVariation | None = None):
        self.cid = client
        self.variation = variation or SceneVariation()
        plane = p.createCollisionShape(p.GEOM_PLANE, physicsClientId=client)
        # The floor is invisible: TinyRenderer's cost is screen area times overdraw, and a full-frame floor
        # cost ~9 ms of a 25 ms static frame while showing nothing a policy needs. (A body without a visual is
        # still drawn from its collision shape; a transparent colour is what makes the renderer skip it.)
        self.plane_uid = p.createMultiBody(0, plane, physicsClientId=client)
        p.changeVisualShape(self.plane_uid, -1, rgbaColor=(0, 0, 0, 0), physicsClientId=client)
        self.table_uid = p.loadURDF(str(urdf_paths["table"]), useFixedBase=True, physicsClientId=client)
        self._check_table_links()
        self.block_uids = {
            name: p.loadURDF(str(urdf_paths[name]), basePosition=layout.SLOTS["table_0"] + [0, 0, 0.1 * i],
                             physicsClientId=client)
            for i, name in enumerate(layout.BLOCK_NAMES)
        }
        self._j = layout.TABLE_JOINT_IDS
        # Doors and the switch stay where they are put (velocity motor = friction); the button springs back.
        for joint in ("base__slide", "base__drawer", "base__switch"):
            p.setJointMotorControl2(self.table_uid, self._j[joint], p.VELOCITY_CONTROL, force=DOOR_FRICTION_FORCE,
                                    physicsClientId=client)
        p.setJointMotorControl2(self.table_uid, self._j["base__button"], p.POSITION_CONTROL, targetPosition=0.0,
                                force=DOOR_FRICTION_FORCE, physicsClientId=client)
        self.led_on = False
        self.bulb_on = False
        self._button_was_pressed = False
        self.link_rgba: dict[int, tuple] = {}  # table links recoloured as a whole since loading (lamps, tints)

    def _check_table_links(self) -> None:
        for name, idx in layout.TABLE_LINK_IDS.items():
            if idx < 0:
                continue
            got = p.getJointInfo(self.table_uid, idx, physicsClientId=self.cid)[12].decode()
            if got != name:  # pragma: no cover - guards the URDF generator against reordering
                raise RuntimeError(f"table link {idx} is {got!r}, expected {name!r}")

    # ------------------------------------------------------------------------------------------------ state
    def joint_value(self, joint: str) -> float:
        return float(p.getJointState(self.table_uid, self._j[joint], physicsClientId=self.cid)[0])

    def _set_joint(self, joint: str, value: float) -> None:
        p.resetJointState(self.table_uid, self._j[joint], float(value), 0.0, physicsClientId=self.cid)

    def reset(self, scene_obs: np.ndarray, rng: np.random.Generator | None = None) -> None:
        """Teleport to ``scene_obs`` (24,): slider, drawer, button, switch, lightbulb, led, 3 x block pose."""
        self._set_joint("base__slide", scene_obs[layout.SLIDER_IDX])
        self._set_joint("base__drawer", scene_obs[layout.DRAWER_IDX])
        self._set_joint("base__button", scene_obs[layout.BUTTON_IDX])
        self._set_joint("base__switch", scene_obs[layout.SWITCH_IDX])
        self._set_lights(led_on=bool(round(scene_obs[layout.LED_IDX])),
                         bulb_on=bool(round(scene_obs[layout.LIGHTBULB_IDX])))
        # Restore the button's edge detector too (calvin 797142c), so a held button does not toggle at once.
        self._button_was_pressed = self._button_pressed()
        for name, uid in self.block_uids.items():
            pose = scene_obs[layout.BLOCK_OBS_SLICES[name]]
            orn = p.getQuaternionFromEuler(pose[3:6])
            p.resetBasePositionAndOrientation(uid, pose[:3], orn, physicsClientId=self.cid)
            p.resetBaseVelocity(uid, (0, 0, 0), (0, 0, 0), physicsClientId=self.cid)
        if rng is not None:
            self._apply_variation(rng)

    def _set_lights(self, led_on: bool, bulb_on: bool) -> None:
        self.led_on, self.bulb_on = led_on, bulb_on
        led_link, bulb_link = layout.TABLE_LINK_IDS["led_link"], layout.TABLE_LINK_IDS["light_link"]
        self._set_link_rgba(led_link, LED_ON_RGBA if led_on else LAMP_OFF_RGBA)
        self._set_link_rgba(bulb_link, BULB_ON_RGBA if bulb_on else LAMP_OFF_RGBA)

    def _set_link_rgba(self, link: int, rgba) -> None:
        """Recolour every visual shape of a table link (remembered: layered rendering restores it)."""
        rgba = tuple(float(c) for c in rgba)
        p.changeVisualShape(self.table_uid, link, rgbaColor=rgba, physicsClientId=self.cid)
        self.link_rgba[link] = rgba

    def _button_pressed(self) -> bool:
        return self.joint_value("base__button") > layout.BUTTON_TRIGGER_M

    def step(self) -> None:
        """Update the lights from the button and switch, once per control step (as calvin's scene.step)."""
        pressed = self._button_pressed()
        led_on = (not self.led_on) if (pressed and not self._button_was_pressed) else self.led_on
        self._button_was_pressed = pressed
        bulb_on = self.joint_value("base__switch") > layout.SWITCH_TRIGGER_M
        if led_on != self.led_on or bulb_on != self.bulb_on:
            self._set_lights(led_on, bulb_on)

    def get_obs(self) -> np.ndarray:
        """(24,) float64 in calvin's scene_obs layout (block orientation as xyz euler)."""
        obs = np.empty(layout.SCENE_OBS_DIM)
        obs[layout.SLIDER_IDX] = self.joint_value("base__slide")
        obs[layout.DRAWER_IDX] = self.joint_value("base__drawer")
        obs[layout.BUTTON_IDX] = self.joint_value("base__button")
        obs[layout.SWITCH_IDX] = self.joint_value("base__switch")
        obs[layout.LIGHTBULB_IDX] = float(self.bulb_on)
        obs[layout.LED_IDX] = float(self.led_on)
        for name, uid in self.block_uids.items():
            pos, orn = p.getBasePositionAndOrientation(uid, physicsClientId=self.cid)
            obs[layout.BLOCK_OBS_SLICES[name]] = (*pos, *p.getEulerFromQuaternion(orn))
        return obs

    def get_info(self) -> dict:
        """calvin_env's ``scene_info`` structure, which the task oracle reads."""
        cid = self.cid
        movable = {}
        for name, uid in self.block_uids.items():
            pos, orn = p.getBasePositionAndOrientation(uid, physicsClientId=cid)
            lin_vel, ang_vel = p.getBaseVelocity(uid, physicsClientId=cid)
            movable[name] = {"current_pos": pos, "current_orn": orn, "current_lin_vel": lin_vel,
                             "current_ang_vel": ang_vel, "contacts": p.getContactPoints(bodyA=uid, physicsClientId=cid),
                             "uid": uid}
        table = {"uid": self.table_uid, "links": dict(layout.TABLE_LINK_IDS),
                 "contacts": p.getContactPoints(bodyA=self.table_uid, physicsClientId=cid)}
        button = self.joint_value("base__button")
        switch = self.joint_value("base__switch")
        return {
            "fixed_objects": {"table": table},
            "movable_objects": movable,
            "doors": {"base__slide": {"current_state": self.joint_value("base__slide")},
                      "base__drawer": {"current_state": self.joint_value("base__drawer")}},
            "buttons": {"base__button": {"joint_state": button, "logical_state": int(self.led_on)}},
            "switches": {"base__switch": {"joint_state": switch, "logical_state": int(self.bulb_on)}},
            "lights": {"lightbulb": {"logical_state": int(self.bulb_on)}, "led": {"logical_state": int(self.led_on)}},
        }

    # ------------------------------------------------------------------------------------------------ looks
    def _apply_variation(self, rng: np.random.Generator) -> None:
        if not self.variation.desk_colors:
            return
        # Tint desk parts by +-20 % per channel; the lamps keep their colours so light states stay readable.
        for link, material in ((-1, "desk"), (layout.TABLE_LINK_IDS["drawer_link"], "drawer"),
                               (layout.TABLE_LINK_IDS["slide_link"], "door"),
                               (layout.TABLE_LINK_IDS["plank_link"], "cabinet")):
            rgb = np.clip(np.array(DESK_MATERIALS[material][:3]) * rng.uniform(0.8, 1.2, 3), 0, 1)
            self._set_link_rgba(link, (*rgb, 1.0))
