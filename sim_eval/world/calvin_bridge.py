"""A bridge to the REAL calvin_env simulator, with the same API as our embedded playtable.

:class:`CalvinEnv` builds calvin_env's own ``PlayTableSimEnv`` from the Hydra configs that ship inside the
calvin_env checkout (``<calvin_env>/conf``), composed exactly like the ``validation/.hydra/merged_config.yaml`` that
the official ``get_env(dataset_path)`` reads: ``config_data_collection`` with ``cameras=static_and_gripper``,
``robot=panda_longer_finger``, ``scene=calvin_scene_D``, ``use_vr=false``, instantiated with ``show_gui=False,
use_vr=False, use_scene_info=True``. So no CALVIN dataset is needed.

Everything observable is calvin_env's own: ``reset``/``step``/``get_obs``/``get_info`` call straight through. The
bridge adds only input checks (``sim_eval.world.action_validation``), done *before* calvin_env is touched, so a bad
action or reset state raises a clear error and leaves the simulation unchanged (calvin_env itself fails on bare
asserts, sometimes halfway through an update).

calvin_env is not on PyPI and is imported lazily: this module imports without it, and constructing
:class:`CalvinEnv` raises :class:`CalvinEnvNotInstalled` with install instructions when it is missing.

Usage::

    from sim_eval.world.calvin_bridge import CalvinEnv
    from sim_eval.protocol.initial_states import state_to_obs

    with CalvinEnv(cameras=["static", "gripper"]) as env:     # 200x200 static, 84x84 gripper, TinyRenderer
        obs = env.reset(*state_to_obs(state))
        obs, reward, done, info = env.step([0, 0, -1, 0, 0, 0, 1])   # 7-vector: relative, gripper +-1
        rgb = obs["rgb_obs"]["rgb_static"]                   # (200, 200, 3) uint8

or, from Hydra, ``hydra.utils.instantiate(OmegaConf.load(ghil.paths.CONFIG_DIR / "env" / "calvin.yaml"))``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sim_eval.world.action_validation import validate_action, validate_state_obs

log = logging.getLogger(__name__)

CAMERA_NAMES = ("static", "gripper")
# The calvin_env commit the CALVIN numbers are reproduced with (see docs: three fixes after the calvin submodule).
PINNED_CALVIN_ENV_COMMIT = "797142c"
# The robot config CALVIN's dataset and evaluation use (panda URDF with longer fingers, TCP link 15).
ROBOT_CONFIG = "panda_longer_finger"

INSTALL_HINT = (
    "The real CALVIN simulator (calvin_env) is not importable{reason}. It is not on PyPI. To use it: clone "
    "https://github.com/mees/calvin_env somewhere outside this repository and check out commit 797142c "
    "(keep it a git work tree: calvin_env reads its own commit with GitPython and fails in a plain copy); the "
    "tacto submodule is not needed. Then, in the Python environment you run ghil from, install calvin_env's "
    "dependencies pybullet, scipy, gym==0.26.2, hydra-core, omegaconf, gitpython, numpy-quaternion, "
    "opencv-python-headless, pillow and hydra-colorlog, and finally install the checkout itself without its "
    "pinned dependencies (pip install --no-deps -e <checkout>). The CALVIN dataset is not needed. The embedded "
    "playtable (configs/env/playtable.yaml) needs none of this."
)


class CalvinEnvNotInstalled(ImportError):
    """calvin_env (the real CALVIN simulator) is missing or broken; the message says how to install it."""


def import_calvin_env():
    """Import and return the ``calvin_env`` package, or raise :class:`CalvinEnvNotInstalled` with install help.

    The import is quietened: gym 0.26 prints an "unmaintained" notice to stderr and calvin_env's module-level
    ``@hydra.main`` warns about ``version_base``; both are harmless for us and only clutter evaluation logs.
    """
    stderr = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
            warnings.simplefilter("ignore")
            import calvin_env
            import calvin_env.envs.play_table_env  # noqa: F401  (the env class; pulls in gym, hydra, pybullet)
    except ImportError as exc:
        raise CalvinEnvNotInstalled(INSTALL_HINT.format(reason=f" ({exc})")) from exc
    return calvin_env


def calvin_conf_dir(calvin_env_module=None) -> Path:
    """calvin_env's own Hydra config directory, located through the installed package (``<checkout>/conf``)."""
    module = calvin_env_module or import_calvin_env()
    conf = Path(module.__file__).resolve().parents[1] / "conf"
    if not (conf / "config_data_collection.yaml").is_file():
        raise CalvinEnvNotInstalled(
            f"calvin_env is importable from {Path(module.__file__).parent}, but its Hydra configs are not at {conf}. "
            "Install calvin_env editable from a full checkout (pip install --no-deps -e <checkout>), so that the "
            "conf/ and data/ folders beside the package are found."
        )
    return conf


@contextlib.contextmanager
def _private_hydra(config_dir: Path):
    """Initialise Hydra on ``config_dir`` without disturbing a Hydra app that may already be running.

    ``hydra.initialize_config_dir`` refuses to run while GlobalHydra is initialised, which it is inside any
    ``@hydra.main`` program (e.g. ``ghil eval`` instantiating ``ghil/configs/env/calvin.yaml``). So we park the running
    app's GlobalHydra and VersionBase singletons, compose on a fresh one, and put the originals back.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton
    from hydra.version import VersionBase

    parked = {cls: Singleton._instances.pop(cls) for cls in (GlobalHydra, VersionBase) if cls in Singleton._instances}
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            yield
    finally:
        for cls in (GlobalHydra, VersionBase):
            Singleton._instances.pop(cls, None)
        Singleton._instances.update(parked)


def _add_base_cylinder_in_own_client(robot) -> None:
    """calvin_env's ``Robot.add_base_cylinder`` (797142c), with the robot's ``physicsClientId`` passed through.

    The original omits it, so the pedestal's visual body is created in pybullet client 0: with two envs in one
    process, the second one renders without its pedestal (and shifts every later body uid by one), and the first
    (or any other client 0, e.g. our playtable) gets a stray cylinder. For the first env (client 0) this is the
    original, body for body.
    """
    import pybullet as p

    pos = robot.base_position.copy()
    pos[2] /= 2
    angle = p.getEulerFromQuaternion(robot.base_orientation)[2]
    pos[0] -= np.cos(angle) * 0.05
    pos[1] -= np.sin(angle) * 0.05
    cylinder = p.createVisualShape(
        shapeType=p.GEOM_CYLINDER,
        rgbaColor=[1, 1, 1, 1],
        radius=0.13,
        length=robot.base_position[2],
        visualFramePosition=pos,
        physicsClientId=robot.cid,
    )
    p.createMultiBody(baseVisualShapeIndex=cylinder, physicsClientId=robot.cid)


@contextlib.contextmanager
def _pedestal_in_own_client():
    """Swap in :func:`_add_base_cylinder_in_own_client` while an env is being built (construction only)."""
    from calvin_env.robot.robot import Robot

    original = Robot.add_base_cylinder
    Robot.add_base_cylinder = _add_base_cylinder_in_own_client
    try:
        yield
    finally:
        Robot.add_base_cylinder = original


def _normalise_cameras(cameras: str | Iterable[str] | None) -> list[str]:
    """``["static", "gripper"]``, ``"static,gripper"``, ``"none"``/``[]``/``None`` -> a checked list, calvin's order."""
    if cameras is None:
        return []
    if isinstance(cameras, str):
        cameras = [] if cameras.strip().lower() in ("", "none") else cameras.split(",")
    names = [str(c).strip() for c in cameras]
    unknown = sorted(set(names) - set(CAMERA_NAMES))
    if unknown:
        raise ValueError(f"unknown camera(s) {unknown}; choose from {list(CAMERA_NAMES)} (or none)")
    # calvin_env renders (and names) cameras in its config order, static before gripper, whatever order we get.
    return [c for c in CAMERA_NAMES if c in names]


def _check_size(name: str, size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= int(size) <= 1024:
        raise ValueError(f"{name} must be an integer number of pixels in [8, 1024] (square images), got {size!r}")
    return int(size)


def compose_calvin_config(
    cameras: Sequence[str] = CAMERA_NAMES,
    static_size: int = 200,
    gripper_size: int = 84,
    scene: str = "calvin_scene_D",
    seed: int = 0,
    overrides: Sequence[str] = (),
):
    """Compose calvin_env's ``config_data_collection`` as the CALVIN validation ``merged_config.yaml`` would be.

    Returns the full composed ``DictConfig`` (``cfg.env`` is what :class:`CalvinEnv` instantiates; ``cfg.tasks`` is
    calvin's task oracle). ``overrides`` are extra Hydra overrides for calvin's config tree, applied last.

    Example::

        cfg = compose_calvin_config(cameras=["static"], static_size=128)
        cfg.cameras.static.width    # 128
    """
    from hydra import compose
    from omegaconf import open_dict

    cameras = _normalise_cameras(cameras)
    static_size = _check_size("static_size", static_size)
    gripper_size = _check_size("gripper_size", gripper_size)
    conf_dir = calvin_conf_dir()
    scenes = sorted(p.stem for p in (conf_dir / "scene").glob("*.yaml"))
    if scene not in scenes:
        raise ValueError(f"unknown calvin_env scene {scene!r}; the checkout at {conf_dir.parent} has {scenes}")

    base_overrides = [
        "cameras=static_and_gripper" if cameras else "cameras=no_cameras",
        f"robot={ROBOT_CONFIG}",
        f"scene={scene}",
        "use_vr=false",
        f"env.seed={int(seed)}",  # seeds only calvin's reset() without scene_obs (random block placement)
    ]
    if "static" in cameras:
        base_overrides += [f"cameras.static.width={static_size}", f"cameras.static.height={static_size}"]
    if "gripper" in cameras:
        base_overrides += [f"cameras.gripper.width={gripper_size}", f"cameras.gripper.height={gripper_size}"]
    try:
        with _private_hydra(conf_dir), warnings.catch_warnings():
            # calvin's primary config has no `_self_` in its defaults. Harmless: its own keys (seed, use_vr,
            # data_path, ...) are not set by any default group, so either composition order gives the same config.
            warnings.filterwarnings("ignore", message=".*Defaults list is missing `_self_`", category=UserWarning)
            cfg = compose(config_name="config_data_collection", overrides=base_overrides + list(overrides))
    except Exception as exc:  # Hydra's errors name the override but not what to install
        raise RuntimeError(
            f"composing calvin_env's config from {conf_dir} failed: {exc}. The config needs the hydra-colorlog "
            "package (for its hydra/job_logging override) and a complete calvin_env checkout."
        ) from exc
    with open_dict(cfg):
        for name in list(cfg.cameras):
            if name not in cameras:
                del cfg.cameras[name]
    return cfg


class CalvinEnv:
    """The real calvin_env ``PlayTableSimEnv``, built from calvin_env's own configs, with checked inputs.

    Args:
        cameras: which cameras to render, any of ``"static"`` (``rgb_static``/``depth_static``) and ``"gripper"``
            (``rgb_gripper``/``depth_gripper``); ``[]`` or ``"none"`` renders nothing.
        static_size, gripper_size: square image sizes in pixels (CALVIN: 200 and 84).
        use_egl: render with pybullet's EGL plugin (the dataset's OpenGL look; needs a working EGL, and calvin_env
            exits the process if the plugin fails to load) instead of the CPU TinyRenderer (default; images
            look flatter than the dataset's, which matters for image policies trained on CALVIN data).
        scene: a calvin_env scene config; CALVIN evaluates every setting (ABC->D, ABCD->D, D->D) in scene D.
        seed: calvin_env's env seed; used only by ``reset()`` without ``scene_obs`` (random block placement).
        overrides: extra Hydra overrides for calvin_env's config tree (power users).

    Behaviour is calvin_env's, including its quirks: ``reset(robot_obs=...)`` restores joints and finger width
    but keeps the *previous* gripper action (``robot_obs[14]`` reads the last commanded value until the next
    step), and ``reset()`` without ``scene_obs`` places the blocks randomly.

    Example::

        env = CalvinEnv(cameras=["static"])
        obs = env.reset(robot_obs=layout.NEUTRAL_ROBOT_OBS, scene_obs=scene_obs)
        obs, _, _, info = env.step({"action": [0, 0, -0.5, 0, 0, 0, 1], "type": "cartesian_rel"})
        env.close()
    """

    def __init__(
        self,
        cameras: str | Iterable[str] | None = CAMERA_NAMES,
        static_size: int = 200,
        gripper_size: int = 84,
        use_egl: bool = False,
        scene: str = "calvin_scene_D",
        seed: int = 0,
        overrides: Sequence[str] = (),
    ):
        calvin_env = import_calvin_env()
        import hydra.utils

        self.cameras = _normalise_cameras(cameras)
        self.use_egl = bool(use_egl)
        self.scene_name = scene
        self.config = compose_calvin_config(self.cameras, static_size, gripper_size, scene, seed, overrides)
        if self.use_egl:
            import importlib.util

            # calvin_env calls sys.exit() when the plugin fails to load; catch the common case here instead.
            if importlib.util.find_spec("eglRenderer") is None:
                raise RuntimeError("use_egl=True, but this pybullet build has no eglRenderer plugin; use use_egl=False")
        self._env = None
        try:
            with _pedestal_in_own_client():
                self._env = hydra.utils.instantiate(
                    self.config.env, show_gui=False, use_vr=False, use_scene_info=True, use_egl=self.use_egl
                )
        except Exception as exc:
            if "git" in type(exc).__module__ or "InvalidGitRepository" in type(exc).__name__:
                raise CalvinEnvNotInstalled(
                    f"calvin_env at {Path(calvin_env.__file__).parent} is not inside a git work tree ({exc!r}); "
                    "calvin_env reads its commit with GitPython. " + INSTALL_HINT.format(reason="")
                ) from exc
            raise
        self.calvin_commit = self._read_commit(calvin_env)

    @staticmethod
    def _read_commit(calvin_env) -> str | None:
        """The checkout's commit, and a warning when it is not the pinned one (the CALVIN numbers depend on it)."""
        try:
            import git

            commit = git.Repo(Path(calvin_env.__file__).parent, search_parent_directories=True).head.object.hexsha
        except Exception:  # informational only; calvin_env itself already required a readable repo
            return None
        if not commit.startswith(PINNED_CALVIN_ENV_COMMIT):
            log.warning(
                "calvin_env is at commit %s, not the pinned %s: results may differ from the protocol's "
                "(e.g. 797142c restores the button/LED state on reset(scene_obs=...)).",
                commit[:7], PINNED_CALVIN_ENV_COMMIT,
            )
        return commit

    # ------------------------------------------------------------------------------------------------ API
    @property
    def sim(self):
        """The underlying ``calvin_env.envs.play_table_env.PlayTableSimEnv`` (for things the bridge does not wrap)."""
        if self._env is None:
            raise RuntimeError("this CalvinEnv is closed")
        return self._env

    def reset(self, robot_obs: np.ndarray | None = None, scene_obs: np.ndarray | None = None, *,
              strict: bool = False) -> dict:
        """Teleport to ``robot_obs`` (15) / ``scene_obs`` (24); ``None`` = calvin's default pose / random scene.

        Both are validated first (shape, real numbers, finiteness, lights exactly 0/1; with ``strict=True`` also
        the ranges of ``validate_state_obs``); a bad one raises ``InvalidStateError`` and nothing is changed.
        Returns the observation dict.
        """
        robot_obs, scene_obs = validate_state_obs(robot_obs, scene_obs, strict=strict)
        return self.sim.reset(robot_obs=robot_obs, scene_obs=scene_obs)

    def step(self, action) -> tuple[dict, int, bool, dict]:
        """One 30 Hz control step (8 physics substeps). Returns calvin's ``(obs, 0, False, info)``.

        ``action`` is any form calvin_env accepts (see ``sim_eval.world.action_validation``); it is validated first and
        an invalid one raises ``InvalidActionError`` before anything moves.
        """
        return self.sim.step(validate_action(action))

    def step_physics(self, action) -> dict:
        """calvin_env's ``step`` minus ``get_obs()``: apply the action, 8 substeps, button/switch logic; return info.

        The simulation advances exactly as in :meth:`step`; only the cameras are not rendered and no observation
        is built, which makes state-only rollouts (oracle checks, scripted data, benchmarks) ~30x cheaper. Mirrors
        ``PlayTableSimEnv.step`` at calvin_env 797142c (the non-VR branch).
        """
        action = validate_action(action)
        sim = self.sim
        sim.robot.apply_action(action)
        for _ in range(sim.action_repeat):
            sim.p.stepSimulation(physicsClientId=sim.cid)
        sim.scene.step()
        return sim.get_info()

    def get_obs(self) -> dict:
        """``{"rgb_obs": {...}, "depth_obs": {...}, "robot_obs": (15,), "scene_obs": (24,)}``, rendered now."""
        return self.sim.get_obs()

    def get_state_obs(self) -> dict:
        """``{"robot_obs", "scene_obs"}`` only, without rendering."""
        return self.sim.get_state_obs()

    def get_info(self) -> dict:
        """calvin's info dict (``robot_info``, ``scene_info``) as the task oracle reads it."""
        return self.sim.get_info()

    def close(self) -> None:
        """Disconnect from pybullet. Safe to call twice."""
        env, self._env = self._env, None
        if env is None:
            return
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # calvin prints "disconnecting id N from server"
                env.close()
        finally:
            # calvin's __del__ calls close() again, which raises "Not connected to physics server" when garbage
            # collected; make that second call a no-op.
            env.close = lambda: None

    def __enter__(self) -> CalvinEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------------------------------------ extras
    @property
    def camera_names(self) -> list[str]:
        """The rendered cameras, in calvin's order (``static`` before ``gripper``)."""
        return list(self.cameras)

    @property
    def camera_info(self) -> dict[str, dict]:
        """Per camera: ``width``, ``height``, ``fov`` (deg), ``near``, ``far`` as calvin_env renders it."""
        return {
            cam.name: {"width": cam.width, "height": cam.height, "fov": cam.fov, "near": cam.nearval, "far": cam.farval}
            for cam in self.sim.cameras
        }

    @property
    def observation_keys(self) -> tuple[str, ...]:
        """The observation's keys, nested ones dotted: ``rgb_obs.rgb_static``, ..., ``robot_obs``, ``scene_obs``."""
        return (
            *(f"rgb_obs.rgb_{c}" for c in self.cameras),
            *(f"depth_obs.depth_{c}" for c in self.cameras),
            "robot_obs",
            "scene_obs",
        )

    def make_task_oracle(self):
        """calvin_env's own task oracle (``calvin_env.envs.tasks.Tasks``) from the composed ``new_playtable_tasks``."""
        import hydra.utils

        return hydra.utils.instantiate(self.config.tasks)
