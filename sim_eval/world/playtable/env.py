"""PlayTableEnv: the embedded CALVIN-compatible world, with calvin_env's PlayTableSimEnv API.

Same observation dict (``rgb_obs.rgb_static`` 200x200x3 uint8, ``rgb_obs.rgb_gripper`` 84x84x3, ``depth_obs``,
``robot_obs`` (15), ``scene_obs`` (24)), same actions (7-D relative with calvin's scaling, absolute cartesian,
joint-absolute; gripper exactly +-1), same control loop (30 Hz, 8 physics substeps at 240 Hz), and a
``get_info()`` the task oracle reads. Images render only when read.

Usage::

    env = PlayTableEnv()
    obs = env.reset(robot_obs=layout.NEUTRAL_ROBOT_OBS, scene_obs=scene_obs)
    obs, reward, done, info = env.step(np.array([0, 0, -1, 0, 0, 0, 1.0]))
    image = obs["rgb_obs"]["rgb_static"]    # rendered here, not in step()
"""

from __future__ import annotations

import numpy as np
import pybullet as p

from sim_eval.world import layout
from sim_eval.world.action_validation import validate_action, validate_state_obs
from sim_eval.world.playtable.cameras import CameraFrames, GripperCamera, StaticCamera
from sim_eval.world.playtable.layers import LayeredStaticView
from sim_eval.world.playtable.models import check_visuals, write_urdfs
from sim_eval.world.playtable.robot import PandaRobot
from sim_eval.world.playtable.scene import PlayTableScene, SceneVariation

CAMERA_NAMES = ("static", "gripper")


class PlayTableEnv:
    """The playtable in one pybullet DIRECT client (many can live in one process)."""

    def __init__(self, static_size: int = 200, gripper_size: int = 84, cameras=CAMERA_NAMES, seed: int = 0,
                 variation: SceneVariation | None = None, urdf_cache_dir: str | None = None,
                 strict_reset: bool = False, visuals: str = "default"):
        """``strict_reset=True`` makes every :meth:`reset` refuse states the world cannot be in (joints beyond the
        Panda's limits, doors beyond their travel, blocks outside the workspace; see
        ``action_validation.validate_state_obs``). Off by default, as calvin_env, which teleports anywhere; a wrong
        length, NaN/inf, a magnitude beyond 1e9 or a light other than 0/1 is refused in both modes.
        ``urdf_cache_dir``: where the generated URDFs go (default: a private per-user folder in the temp dir); their content is checked on every reset.
        ``visuals``: ``"default"`` is the look the shipped policies were trained on (unchanged to the bit);
        ``"layered"`` draws the same models with the static camera put together from cached layers (see
        ``layers.py``; a few pixels per frame differ from ``default``); ``"fast"`` is layered with cheaper models
        (desk as outer-surface meshes, the arm as coarse hulls). Physics, ``robot_obs``, ``scene_obs`` and
        ``get_info()`` are bit-identical in all three."""
        unknown = set(cameras) - set(CAMERA_NAMES)
        if unknown:
            raise ValueError(f"unknown camera(s) {sorted(unknown)}; choose from {list(CAMERA_NAMES)}")
        for name, size in (("static_size", static_size), ("gripper_size", gripper_size)):
            if not 8 <= int(size) <= 1024:
                raise ValueError(f"{name} must be in [8, 1024] pixels, got {size}")
        self.visuals = check_visuals(visuals)
        self.variation = variation or SceneVariation()
        self.rng = np.random.default_rng(seed)
        self.strict_reset = bool(strict_reset)
        self.cid = p.connect(p.DIRECT)
        self._urdf_cache_dir = urdf_cache_dir
        self._urdf_paths: dict = {}  # written (and re-checked) by every _build_world
        self._build_world()
        self.cameras = {}
        if "static" in cameras:
            self.cameras["static"] = StaticCamera(int(static_size), int(static_size))
        if "gripper" in cameras:
            self.cameras["gripper"] = GripperCamera(self.robot.uid, self.robot.camera_link, int(gripper_size),
                                                    int(gripper_size))
        self._state_counter = 0  # bumps on every step/reset; lazily rendered frames check it
        self.reset(layout.NEUTRAL_ROBOT_OBS, self.sample_scene_obs())

    def _build_world(self) -> None:
        """(Re)load everything into a fresh simulation. Every reset does this (about 20 ms): bullet keeps
        collision-pair caches that neither teleporting nor restoreState clears, and they shift trajectories by
        ~1e-4 m depending on what ran before, so only a rebuilt world makes "same reset + same actions = same
        trajectory" hold (exact resume of data collection and evaluation rely on it)."""
        # Re-check the cached URDFs' content (and rewrite any that changed or vanished) before bullet reads them.
        self._urdf_paths = write_urdfs(self._urdf_cache_dir, self.visuals)
        p.resetSimulation(physicsClientId=self.cid)
        p.setPhysicsEngineParameter(deterministicOverlappingPairs=1, physicsClientId=self.cid)
        p.setTimeStep(1.0 / layout.PHYSICS_HZ, physicsClientId=self.cid)
        p.setGravity(0, 0, -9.8, physicsClientId=self.cid)
        self.robot = PandaRobot(self.cid, self._urdf_paths["robot"])
        self.scene = PlayTableScene(self.cid, self._urdf_paths, self.variation)
        self._static_view = None  # fast visuals: the static camera's layers, built on first use in this world

    # ------------------------------------------------------------------------------------------------ API
    def reset(self, robot_obs: np.ndarray | None = None, scene_obs: np.ndarray | None = None, *,
              strict: bool | None = None) -> dict:
        """Teleport robot and scene; ``None`` means the neutral pose / a random scene (calvin's reset()).

        A bad state raises ``InvalidStateError`` (a ``ValueError`` naming the field and index) and changes nothing,
        not even the random stream. ``strict`` overrides the env's ``strict_reset`` for this call."""
        strict = self.strict_reset if strict is None else bool(strict)
        # Validate what was given before drawing a random scene, so a refused reset leaves self.rng untouched.
        robot_obs, scene_obs = validate_state_obs(robot_obs, scene_obs, strict=strict)
        robot_obs = layout.NEUTRAL_ROBOT_OBS.copy() if robot_obs is None else robot_obs
        scene_obs = self.sample_scene_obs() if scene_obs is None else scene_obs
        self._build_world()
        self.scene.reset(scene_obs, self.rng)
        self.robot.reset(robot_obs)
        self._apply_view_variation()
        p.stepSimulation(physicsClientId=self.cid)
        self._state_counter += 1
        return self.get_obs()

    def step(self, action) -> tuple[dict, int, bool, dict]:
        """One 30 Hz control step. Returns calvin's ``(obs, 0, False, info)``; bad actions raise before stepping."""
        action = validate_action(action)
        self.robot.apply_action(action)
        for _ in range(layout.N_SUBSTEPS):
            p.stepSimulation(physicsClientId=self.cid)
        self.scene.step()
        self._state_counter += 1
        return self.get_obs(), 0, False, self.get_info()

    def get_obs(self) -> dict:
        robot_obs, _ = self.robot.get_observation()
        cache: dict = {}
        counter = self._state_counter
        cams = list(self.cameras.values())

        def is_current() -> bool:
            return self._state_counter == counter

        def render(cam):
            if cam.name == "static" and self.visuals in ("layered", "fast"):
                return self._layered_static_view().render()
            return cam.render(self.cid)

        return {"rgb_obs": CameraFrames("rgb", cams, cache, render, is_current),
                "depth_obs": CameraFrames("depth", cams, cache, render, is_current),
                "robot_obs": robot_obs, "scene_obs": self.scene.get_obs()}

    def _layered_static_view(self) -> LayeredStaticView:
        if self._static_view is None:
            table, robot = self.scene.table_uid, self.robot.uid
            n_robot = p.getNumJoints(robot, physicsClientId=self.cid)
            plank = layout.TABLE_LINK_IDS["plank_link"]
            movable = [layout.TABLE_LINK_IDS[n] for n in ("button_link", "switch_link", "slide_link", "drawer_link",
                                                            "led_link", "light_link")]
            layers = {"fixed": [(table, -1), (table, plank), (robot, -1)],  # the arm's pedestal never moves
                      "movable": [(table, link) for link in movable]
                                 + [(uid, -1) for uid in self.scene.block_uids.values()],
                      "dynamic": [(robot, link) for link in range(n_robot)]}

            def link_color(uid: int, link: int):
                return self.scene.link_rgba.get(link) if uid == table else None

            self._static_view = LayeredStaticView(self.cid, self.cameras["static"], layers, link_color)
        return self._static_view

    def get_info(self) -> dict:
        _, robot_info = self.robot.get_observation()
        return {"robot_info": robot_info, "scene_info": self.scene.get_info()}

    def close(self) -> None:
        if self.cid is not None and p.isConnected(self.cid):
            p.disconnect(self.cid)
        self.cid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ extras
    def sample_scene_obs(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """calvin's ``scene.reset()`` without arguments: doors closed, lights off, blocks on random surfaces with
        random yaw, re-drawn until no two blocks overlap."""
        rng = rng or self.rng
        scene_obs = np.zeros(layout.SCENE_OBS_DIM)
        for _ in range(1000):
            centres = []
            for name in layout.BLOCK_NAMES:
                lo, hi = layout.SURFACES[rng.choice(list(layout.SURFACES))]
                pos = rng.uniform(lo, hi)
                yaw = rng.uniform(-np.pi, np.pi)
                scene_obs[layout.BLOCK_OBS_SLICES[name]] = (*pos, 0.0, 0.0, yaw)
                centres.append(pos)
            if blocks_separated(scene_obs):
                return scene_obs
        raise RuntimeError("could not place the blocks without overlap in 1000 draws")

    def save_state(self) -> dict:
        """Snapshot physics and controller state (for rollouts in a saved copy: oracle subgoals, look-ahead)."""
        return {"bullet": p.saveState(physicsClientId=self.cid),
                "robot": (self.robot.target_pos.copy(), self.robot.target_orn.copy(), self.robot.gripper_action),
                "scene": (self.scene.led_on, self.scene.bulb_on, self.scene._button_was_pressed)}

    def restore_state(self, snapshot: dict) -> None:
        p.restoreState(stateId=snapshot["bullet"], physicsClientId=self.cid)
        target_pos, target_orn, self.robot.gripper_action = snapshot["robot"]
        self.robot.target_pos, self.robot.target_orn = target_pos.copy(), target_orn.copy()
        led_on, bulb_on, self.scene._button_was_pressed = snapshot["scene"]
        self.scene._set_lights(led_on, bulb_on)
        self._state_counter += 1

    def forget_state(self, snapshot: dict) -> None:
        p.removeState(snapshot["bullet"], physicsClientId=self.cid)

    @property
    def camera_names(self) -> list[str]:
        return list(self.cameras)

    def _apply_view_variation(self) -> None:
        v = self.variation
        static = self.cameras.get("static")
        if static is not None:
            j = v.camera_jitter_m
            static.set_offset(self.rng.uniform(-j, j, 3) if j else np.zeros(3),
                              self.rng.uniform(-j, j, 3) if j else np.zeros(3))
        light = {}
        if v.lighting:
            direction = self.rng.normal(size=3)
            direction[2] = abs(direction[2]) + 0.5  # keep the light above the desk
            light = {"lightDirection": (direction / np.linalg.norm(direction) * 5).tolist(),
                     "lightAmbientCoeff": float(self.rng.uniform(0.4, 0.8)),
                     "lightDiffuseCoeff": float(self.rng.uniform(0.3, 0.7)),
                     "lightSpecularCoeff": float(self.rng.uniform(0.0, 0.2)),
                     "shadow": int(self.rng.random() < 0.5)}
        for cam in self.cameras.values():
            cam.light = light


def blocks_separated(scene_obs: np.ndarray, margin_m: float = 0.01) -> bool:
    """True when no two blocks' footprints (circumscribed circles) overlap."""
    names = layout.BLOCK_NAMES
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pa, pb = scene_obs[layout.BLOCK_OBS_SLICES[a]][:3], scene_obs[layout.BLOCK_OBS_SLICES[b]][:3]
            ra = np.hypot(*layout.BLOCK_SIZES_M[a][:2]) / 2
            rb = np.hypot(*layout.BLOCK_SIZES_M[b][:2]) / 2
            if np.linalg.norm(pa[:2] - pb[:2]) < ra + rb + margin_m:
                return False
    return True
