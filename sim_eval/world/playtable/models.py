"""URDF text for the playtable's two articulated bodies, generated in code.

* The desk ("table") is built from box and cylinder primitives laid out like CALVIN's scene D, with the same
  link names, link ids and joint axes as calvin_env's ``calvin_table_D.urdf`` (after its 0.8 global scaling), so
  oracle contacts (``(table, base_link | plank_link | drawer_link)``) mean the same thing in both worlds.
* The robot is the Franka Panda from ``pybullet_data`` with two changes that matter for CALVIN compatibility and
  speed: calvin's longer fingers and its ``tcp`` link (panda_hand + 0.14 m), and the low-poly collision meshes used
  as visuals (TinyRenderer time is spent on triangles: 17.6 ms -> ~1 ms per 84x84 frame).

Usage::

    path = write_urdfs(cache_dir)["robot"]
    uid = p.loadURDF(str(path), useFixedBase=True)
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from pathlib import Path

import numpy as np
import pybullet_data

from sim_eval.world import layout

# ---------------------------------------------------------------------------------------------------------------
# Desk


@dataclass(frozen=True)
class Box:
    """An axis-aligned (in the link frame, optionally rotated by rpy) box primitive."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    rpy: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def xml(self, material: str) -> str:
        lo, hi = np.array(self.lo), np.array(self.hi)
        c, s = (lo + hi) / 2, hi - lo
        origin = f'<origin xyz="{c[0]:.5f} {c[1]:.5f} {c[2]:.5f}" rpy="{self.rpy[0]:.6f} {self.rpy[1]:.6f} {self.rpy[2]:.6f}"/>'
        geom = f'<geometry><box size="{s[0]:.5f} {s[1]:.5f} {s[2]:.5f}"/></geometry>'
        return (f"<visual>{origin}{geom}<material name=\"{material}\"/></visual>"
                f"<collision>{origin}{geom}</collision>")


# Materials: names are referenced by the scene to recolour parts (desk colour variation).
DESK_MATERIALS = {
    "desk": (0.72, 0.56, 0.40, 1.0),  # wood
    "cabinet": (0.93, 0.93, 0.90, 1.0),
    "drawer": (0.80, 0.66, 0.50, 1.0),
    "door": (0.62, 0.45, 0.30, 1.0),
    "handle": (0.15, 0.15, 0.15, 1.0),
    "button": (0.05, 0.05, 0.05, 1.0),
    "switch": (0.40, 0.40, 0.40, 1.0),
    "lamp_off": (1.0, 1.0, 1.0, 1.0),
}

# Base link (fixed desk body), world coordinates (the table sits at the origin).
_DESK_PARTS = [
    # desk top slab, front half (y -0.18..0.02) and under the cabinet (y 0.02..0.18)
    Box((-0.44, -0.18, 0.40), (0.44, 0.02, 0.44)),
    Box((-0.44, 0.02, 0.40), (0.44, 0.18, 0.42)),
    # body under the top, leaving the drawer bay (x -0.045..0.405, z 0.30..0.40) open at the front
    Box((-0.44, -0.18, 0.0), (-0.045, 0.18, 0.40)),
    Box((0.405, -0.18, 0.0), (0.44, 0.18, 0.40)),
    Box((-0.045, -0.18, 0.0), (0.405, 0.18, 0.30)),
    Box((-0.045, 0.07, 0.30), (0.405, 0.18, 0.40)),
    # button housing on the desk top
    Box((-0.16, -0.16, 0.44), (-0.08, -0.08, 0.46)),
    # cabinet: left wall, right tower (holds the switch), back wall, top shelf
    Box((-0.44, 0.02, 0.42), (-0.36, 0.18, 0.628)),
    Box((0.16, 0.10, 0.42), (0.44, 0.18, 0.628)),
    Box((0.16, 0.02, 0.42), (0.44, 0.10, 0.445)),
    Box((-0.36, 0.16, 0.42), (0.16, 0.18, 0.628)),
    Box((-0.44, 0.14, 0.628), (0.44, 0.18, 0.648)),
]
_DESK_MATERIAL_OF_PART = ["desk", "desk", "desk", "desk", "desk", "desk", "cabinet",
                          "cabinet", "cabinet", "cabinet", "cabinet", "cabinet"]

# The switch lever slides on an inclined face of the right tower: a slab whose front face holds the lever's track.
_SWITCH_TRACK_RPY = (5 * np.pi / 6, 0.0, 0.0)


def _switch_track() -> str:
    # In the switch joint's frame (rotated by 150 deg about x) the track is the slab behind local y = 0.
    o = layout.SWITCH_ORIGIN
    r = _rx(5 * np.pi / 6)
    centre = o + r @ np.array([0.0, -0.05, 0.02])
    c, s = centre, (0.26, 0.10, 0.22)
    rpy = _SWITCH_TRACK_RPY
    origin = f'<origin xyz="{c[0]:.5f} {c[1]:.5f} {c[2]:.5f}" rpy="{rpy[0]:.6f} {rpy[1]:.6f} {rpy[2]:.6f}"/>'
    geom = f'<geometry><box size="{s[0]} {s[1]} {s[2]}"/></geometry>'
    return f'<visual>{origin}{geom}<material name="cabinet"/></visual><collision>{origin}{geom}</collision>'


def _rx(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _link(name: str, body: str, mass: float) -> str:
    inertia = '<inertia ixx="1e-3" ixy="0" ixz="0" iyy="1e-3" iyz="0" izz="1e-3"/>'
    return (f'<link name="{name}"><inertial><origin xyz="0 0 0"/><mass value="{mass}"/>{inertia}</inertial>'
            f"{body}</link>")


def _joint(name: str, kind: str, child: str, xyz, rpy, axis, limits=None) -> str:
    lim = f'<limit lower="{limits[0]}" upper="{limits[1]}" effort="0" velocity="0"/>' if limits else ""
    return (f'<joint name="{name}" type="{kind}"><parent link="base_link"/><child link="{child}"/>'
            f'<origin xyz="{xyz[0]:.6f} {xyz[1]:.6f} {xyz[2]:.6f}" rpy="{rpy[0]:.6f} {rpy[1]:.6f} {rpy[2]:.6f}"/>'
            f'<axis xyz="{axis[0]} {axis[1]} {axis[2]}"/>{lim}</joint>')


def table_urdf() -> str:
    """The desk with calvin's link order: button 0, switch 1, slide 2, drawer 3, led 4, light 5, plank 6."""
    mats = "".join(f'<material name="{n}"><color rgba="{r} {g} {b} {a}"/></material>'
                   for n, (r, g, b, a) in DESK_MATERIALS.items())
    base = "".join(b.xml(m) for b, m in zip(_DESK_PARTS, _DESK_MATERIAL_OF_PART)) + _switch_track()
    parts = [f'<robot name="table">{mats}', _link("base_link", base, 0.0)]

    # Button: a cap on the housing, pressed down along world -z. Frame: world-aligned at its joint origin.
    cap = '<origin xyz="0 0 0.012"/><geometry><cylinder radius="0.03" length="0.024"/></geometry>'
    parts.append(_link("button_link", f'<visual>{cap}<material name="button"/></visual><collision>{cap}</collision>', 0.15))
    parts.append(_joint("base__button", "prismatic", "button_link", layout.BUTTON_ORIGIN, (0, 0, 0),
                        layout.BUTTON_AXIS, layout.BUTTON_RANGE_M))

    # Switch: a lever with a grip bar sticking out of the inclined track; link frame = calvin's (rx 150 deg),
    # in which the lever protrudes along +y and slides along -z.
    lever = (Box((-0.05, 0.0, -0.02), (0.05, 0.012, 0.01)).xml("switch")
             + Box((-0.05, 0.012, -0.012), (0.05, 0.05, 0.008)).xml("switch"))
    parts.append(_link("switch_link", lever, 0.2))
    parts.append(_joint("base__switch", "prismatic", "switch_link", layout.SWITCH_ORIGIN, (5 * np.pi / 6, 0, 0),
                        (0, 0, -1), layout.SWITCH_RANGE_M))

    # Sliding door: a panel inclined by 60 deg in front of the shelf, with a U-shaped grip; calvin's frame
    # (rx 60 deg), in which the panel spans x 0..0.28, y -0.12..0.12 and the grip protrudes along +z.
    door = (Box((0.0, -0.12, 0.0), (0.28, 0.12, 0.02)).xml("door")
            + Box((0.12, -0.07, 0.055), (0.16, 0.07, 0.08)).xml("handle")
            + Box((0.12, -0.07, 0.02), (0.16, -0.05, 0.055)).xml("handle")
            + Box((0.12, 0.05, 0.02), (0.16, 0.07, 0.055)).xml("handle"))
    parts.append(_link("slide_link", door, 1.5))
    parts.append(_joint("base__slide", "prismatic", "slide_link", layout.SLIDER_ORIGIN, (np.pi / 3, 0, 0),
                        (-1, 0, 0), layout.SLIDER_RANGE_M))

    # Drawer: calvin's frame (rx 90 deg): x across, +y up, +z towards the robot (front face at z 0.157..0.182).
    drawer = (Box((-0.221, -0.021, 0.157), (0.221, 0.081, 0.182)).xml("drawer")  # front panel
              + Box((-0.177, -0.0015, -0.038), (0.177, 0.021, 0.157)).xml("drawer")  # bottom
              + Box((-0.2015, -0.0015, -0.061), (0.2015, 0.081, -0.038)).xml("drawer")  # back wall
              + Box((0.177, -0.0015, -0.038), (0.2015, 0.081, 0.157)).xml("drawer")  # side walls
              + Box((-0.2015, -0.0015, -0.038), (-0.177, 0.081, 0.157)).xml("drawer")
              + Box((0.096, 0.02, 0.182), (0.121, 0.062, 0.261)).xml("handle")  # handle posts and bar
              + Box((-0.121, 0.02, 0.182), (-0.096, 0.062, 0.261)).xml("handle")
              + Box((-0.096, 0.02, 0.238), (0.096, 0.06, 0.261)).xml("handle"))
    parts.append(_link("drawer_link", drawer, 4.0))
    parts.append(_joint("base__drawer", "prismatic", "drawer_link", layout.DRAWER_ORIGIN, (np.pi / 2, 0, 0),
                        (0, 0, 1), layout.DRAWER_RANGE_M))

    # LED strip and light bulb on the top shelf (fixed; the scene recolours them when lit).
    led = Box((-0.08, -0.02, 0.0), (0.08, 0.02, 0.016)).xml("lamp_off")
    parts.append(_link("led_link", led, 0.2))
    parts.append(_joint("base__led", "fixed", "led_link", layout.LED_POS, (0, 0, 0), (0, 0, 0)))
    bulb = '<origin xyz="0 0.028 0.025"/><geometry><sphere radius="0.025"/></geometry>'
    parts.append(_link("light_link", f'<visual>{bulb}<material name="lamp_off"/></visual><collision>{bulb}</collision>', 0.17))
    parts.append(_joint("base__light", "fixed", "light_link", layout.LIGHTBULB_POS, (0, 0, 0), (0, 0, 0)))

    # The sliding cabinet's shelf.
    plank = Box((-0.26, -0.07, -0.02), (0.26, 0.07, 0.0)).xml("cabinet")
    parts.append(_link("plank_link", plank, 2.8))
    parts.append(_joint("base__plank", "fixed", "plank_link", (-0.1, 0.09, layout.PLANK_TOP_Z), (0, 0, 0), (0, 0, 0)))
    parts.append("</robot>")
    return "\n".join(parts)


def block_urdf(name: str) -> str:
    size = layout.BLOCK_SIZES_M[name]
    r, g, b, a = layout.BLOCK_COLORS_RGBA[name]
    geom = f'<geometry><box size="{size[0]} {size[1]} {size[2]}"/></geometry>'
    # calvin's block URDFs give inertia 1 for a 1 kg block; a box's true inertia is ~1e-3 and makes pushing
    # and grasping behave like real wood blocks. Friction values are calvin's.
    ixx = layout.BLOCK_MASS_KG * (size[1] ** 2 + size[2] ** 2) / 12
    iyy = layout.BLOCK_MASS_KG * (size[0] ** 2 + size[2] ** 2) / 12
    izz = layout.BLOCK_MASS_KG * (size[0] ** 2 + size[1] ** 2) / 12
    return (f'<robot name="{name}"><link name="base_link">'
            f'<contact><lateral_friction value="{layout.BLOCK_LATERAL_FRICTION}"/>'
            f'<spinning_friction value="{layout.BLOCK_SPINNING_FRICTION}"/></contact>'
            f'<inertial><origin xyz="0 0 0"/><mass value="{layout.BLOCK_MASS_KG}"/>'
            f'<inertia ixx="{ixx:.6g}" ixy="0" ixz="0" iyy="{iyy:.6g}" iyz="0" izz="{izz:.6g}"/></inertial>'
            f'<visual>{geom}<material name="c"><color rgba="{r} {g} {b} {a}"/></material></visual>'
            f"<collision>{geom}</collision></link></robot>")


# ---------------------------------------------------------------------------------------------------------------
# Robot

FINGER_LENGTH_M = 0.095  # from the finger joint (hand + 0.0584) to the tip: tips 1.3 cm beyond the tcp
FINGER_PAD = (0.022, 0.012)  # pad width (across) and thickness, metres


def robot_urdf() -> str:
    """pybullet_data's Panda with low-poly visuals, calvin's longer fingers, a ``tcp`` and a ``gripper_cam`` link."""
    data = Path(pybullet_data.getDataPath()) / "franka_panda"
    text = (data / "panda.urdf").read_text()
    head = text.split('<link name="panda_leftfinger">')[0]
    head = head.replace("package://meshes/visual/", f"{data}/meshes/collision/")
    head = head.replace("package://meshes/collision/", f"{data}/meshes/collision/")
    w, t, length = FINGER_PAD[0], FINGER_PAD[1], FINGER_LENGTH_M

    def finger(name: str, side: float) -> str:
        # The pad's inner face sits on the finger frame's y = 0 plane, so the opening width equals the sum of the
        # two finger joint values, as calvin's gripper_opening_width reports.
        centre_y = side * t / 2
        geom = (f'<origin xyz="0 {centre_y:.4f} {length / 2:.4f}"/>'
                f'<geometry><box size="{w} {t} {length}"/></geometry>')
        return (f'<link name="{name}"><contact><lateral_friction value="1.5"/><spinning_friction value="0.1"/>'
                f'<rolling_friction value="0.0"/></contact>'
                f'<inertial><origin xyz="0 {centre_y:.4f} 0.04"/><mass value="0.1"/>'
                f'<inertia ixx="1e-4" ixy="0" ixz="0" iyy="1e-4" iyz="0" izz="1e-4"/></inertial>'
                f'<visual>{geom}<material name="panda_white"/></visual><collision>{geom}</collision></link>')

    def fixed(name: str, parent: str, xyz, rpy) -> str:
        return (f'<link name="{name}"><inertial><mass value="0"/><inertia ixx="0" ixy="0" ixz="0" iyy="0" iyz="0" '
                f'izz="0"/></inertial></link><joint name="{name}_joint" type="fixed"><parent link="{parent}"/>'
                f'<child link="{name}"/><origin xyz="{xyz[0]} {xyz[1]} {xyz[2]}" rpy="{rpy[0]} {rpy[1]} {rpy[2]}"/>'
                "</joint>")

    tail = (finger("panda_leftfinger", 1.0) + finger("panda_rightfinger", -1.0)
            + '<joint name="panda_finger_joint1" type="prismatic"><parent link="panda_hand"/>'
              '<child link="panda_leftfinger"/><origin xyz="0 0 0.0584"/><axis xyz="0 1 0"/>'
              '<limit effort="200" lower="0.0" upper="0.04" velocity="0.2"/></joint>'
            + '<joint name="panda_finger_joint2" type="prismatic"><parent link="panda_hand"/>'
              '<child link="panda_rightfinger"/><origin xyz="0 0 0.0584"/><axis xyz="0 -1 0"/>'
              '<limit effort="200" lower="0.0" upper="0.04" velocity="0.2"/></joint>'
            + fixed("tcp", "panda_hand", (0, 0, layout.TCP_OFFSET_FROM_HAND_M), (0, 0, 0))
            + fixed("gripper_cam", "panda_hand", layout.GRIPPER_CAMERA_OFFSET_XYZ, layout.GRIPPER_CAMERA_OFFSET_RPY)
            + "</robot>")
    return head + tail


@functools.lru_cache(maxsize=1)
def urdf_texts() -> Mapping[str, bytes]:
    """Every generated URDF by body name, as the bytes written to disk (deterministic; built once per process)."""
    texts = {"table": table_urdf(), "robot": robot_urdf(), **{n: block_urdf(n) for n in layout.BLOCK_NAMES}}
    return MappingProxyType({name: text.encode() for name, text in texts.items()})


@functools.lru_cache(maxsize=None)
def _file_name(name: str) -> str:
    return f"{name}_{hashlib.sha256(urdf_texts()[name]).hexdigest()[:16]}.urdf"


def default_cache_dir() -> Path:
    """A private per-user folder in the temp dir (mode 0700, owned by this user), created when missing.

    The temp dir is shared: a folder there that another user created, that is a symlink, or that others may write
    to, could be swapped under us between our check of a file and bullet's read of it. Such a folder is not used;
    a fresh private one (``tempfile.mkdtemp``) is, for this process.
    """
    user = str(os.getuid()) if hasattr(os, "getuid") else getpass.getuser()
    root = Path(tempfile.gettempdir()) / f"ghil_playtable_urdf-{user}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(root)
        if stat.S_ISDIR(st.st_mode) and (not hasattr(os, "getuid") or st.st_uid == os.getuid()):
            if st.st_mode & 0o077:
                os.chmod(root, 0o700)  # ours but open to others (an old umask): close it
            return root
    except OSError:
        pass
    global _FALLBACK_DIR
    if _FALLBACK_DIR is None:
        _FALLBACK_DIR = Path(tempfile.mkdtemp(prefix="ghil_playtable_urdf-"))
    return _FALLBACK_DIR


_FALLBACK_DIR: Path | None = None


def _matches(path: Path, expected: bytes) -> bool:
    """The file at ``path`` is a regular file (not a symlink) holding exactly ``expected``."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        return path.read_bytes() == expected
    except OSError:
        return False


def write_urdfs(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the generated URDFs and return their paths; a cached file is used only if its content is exactly ours.

    Files are content-addressed (``<body>_<sha256 prefix>.urdf``) and written atomically (temp file + rename), so
    concurrent workers never see half-written files. An existing file with that name is compared byte for byte
    with the generated text, on every call (the env calls this on every reset, just before bullet reads them): a
    planted, edited, truncated or symlinked file is replaced, and if the replacement does not read back as
    written, ``RuntimeError`` is raised rather than loading a world we did not build.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in urdf_texts().items():
        path = root / _file_name(name)
        if not _matches(path, data):
            fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}_", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if not _matches(path, data):
                raise RuntimeError(f"the URDF cache file {path} does not hold what was just written to it: "
                                   f"something else writes to {root}; pass another urdf_cache_dir")
        paths[name] = path
    return paths
