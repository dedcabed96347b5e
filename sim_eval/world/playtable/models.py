"""URDF text for the playtable's two articulated bodies, generated in code.

* The desk ("table") is built from box and cylinder primitives laid out like CALVIN's scene D, with the same
  link names, link ids and joint axes as calvin_env's ``calvin_table_D.urdf`` (after its 0.8 global scaling), so
  oracle contacts (``(table, base_link | plank_link | drawer_link)``) mean the same thing in both worlds.
* The robot is the Franka Panda from ``pybullet_data`` with two changes that matter for CALVIN compatibility and
  speed: calvin's longer fingers and its ``tcp`` link (panda_hand + 0.14 m), and the low-poly collision meshes used
  as visuals (TinyRenderer time is spent on triangles: 17.6 ms -> ~1 ms per 84x84 frame).
* ``visuals="fast"`` (opt-in; the default models are unchanged to the byte) keeps every collision shape and draws
  the desk's multi-box links as meshes of their outer surface and the arm's links as coarse convex hulls; the mesh
  files are generated, content-addressed and cached beside the URDFs.

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
import re
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

    def _origin_geom(self) -> tuple[str, str]:
        lo, hi = np.array(self.lo), np.array(self.hi)
        c, s = (lo + hi) / 2, hi - lo
        origin = f'<origin xyz="{c[0]:.5f} {c[1]:.5f} {c[2]:.5f}" rpy="{self.rpy[0]:.6f} {self.rpy[1]:.6f} {self.rpy[2]:.6f}"/>'
        geom = f'<geometry><box size="{s[0]:.5f} {s[1]:.5f} {s[2]:.5f}"/></geometry>'
        return origin, geom

    def xml(self, material: str) -> str:
        return self.visual_xml(material) + self.collision_xml()

    def visual_xml(self, material: str) -> str:
        origin, geom = self._origin_geom()
        return f"<visual>{origin}{geom}<material name=\"{material}\"/></visual>"

    def collision_xml(self) -> str:
        origin, geom = self._origin_geom()
        return f"<collision>{origin}{geom}</collision>"


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


def _switch_track_parts() -> tuple[str, str]:
    # In the switch joint's frame (rotated by 150 deg about x) the track is the slab behind local y = 0.
    o = layout.SWITCH_ORIGIN
    r = _rx(5 * np.pi / 6)
    centre = o + r @ np.array([0.0, -0.05, 0.02])
    c, s = centre, (0.26, 0.10, 0.22)
    rpy = _SWITCH_TRACK_RPY
    origin = f'<origin xyz="{c[0]:.5f} {c[1]:.5f} {c[2]:.5f}" rpy="{rpy[0]:.6f} {rpy[1]:.6f} {rpy[2]:.6f}"/>'
    geom = f'<geometry><box size="{s[0]} {s[1]} {s[2]}"/></geometry>'
    return origin, geom


def _switch_track() -> str:
    origin, geom = _switch_track_parts()
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


# Box parts of the multi-box links, in their link frames (the order is the collision shapes' order).
# Switch: a lever with a grip bar sticking out of the inclined track; link frame = calvin's (rx 150 deg),
# in which the lever protrudes along +y and slides along -z.
_SWITCH_PARTS = [(Box((-0.05, 0.0, -0.02), (0.05, 0.012, 0.01)), "switch"),
                 (Box((-0.05, 0.012, -0.012), (0.05, 0.05, 0.008)), "switch")]
# Sliding door: a panel inclined by 60 deg in front of the shelf, with a U-shaped grip; calvin's frame
# (rx 60 deg), in which the panel spans x 0..0.28, y -0.12..0.12 and the grip protrudes along +z.
_DOOR_PARTS = [(Box((0.0, -0.12, 0.0), (0.28, 0.12, 0.02)), "door"),
               (Box((0.12, -0.07, 0.055), (0.16, 0.07, 0.08)), "handle"),
               (Box((0.12, -0.07, 0.02), (0.16, -0.05, 0.055)), "handle"),
               (Box((0.12, 0.05, 0.02), (0.16, 0.07, 0.055)), "handle")]
# Drawer: calvin's frame (rx 90 deg): x across, +y up, +z towards the robot (front face at z 0.157..0.182).
_DRAWER_PARTS = [(Box((-0.221, -0.021, 0.157), (0.221, 0.081, 0.182)), "drawer"),  # front panel
                 (Box((-0.177, -0.0015, -0.038), (0.177, 0.021, 0.157)), "drawer"),  # bottom
                 (Box((-0.2015, -0.0015, -0.061), (0.2015, 0.081, -0.038)), "drawer"),  # back wall
                 (Box((0.177, -0.0015, -0.038), (0.2015, 0.081, 0.157)), "drawer"),  # side walls
                 (Box((-0.2015, -0.0015, -0.038), (-0.177, 0.081, 0.157)), "drawer"),
                 (Box((0.096, 0.02, 0.182), (0.121, 0.062, 0.261)), "handle"),  # handle posts and bar
                 (Box((-0.121, 0.02, 0.182), (-0.096, 0.062, 0.261)), "handle"),
                 (Box((-0.096, 0.02, 0.238), (0.096, 0.06, 0.261)), "handle")]


def _boxes_body(parts, visuals: str, mesh_prefix: str, meshes: dict, drop_below_z: float | None = None) -> str:
    """A link's visual + collision XML for box ``parts``: per box (``default``), or (``fast``) the same collision
    boxes in the same order with visuals replaced by one mesh per material holding only the union's outer faces."""
    if visuals == "default":
        return "".join(b.xml(m) for b, m in parts)
    collisions = "".join(b.collision_xml() for b, _ in parts)
    files = _surface_mesh_files(parts, mesh_prefix, meshes, drop_below_z)
    visuals_xml = "".join(f'<visual><origin xyz="0 0 0" rpy="0 0 0"/><geometry><mesh filename="{name}"/>'
                          f'</geometry><material name="{material}"/></visual>' for material, name in files)
    return visuals_xml + collisions


def table_urdf(visuals: str = "default") -> str:
    """The desk's URDF text (see :func:`_table_urdf`)."""
    return _table_urdf(visuals)[0]


def _table_urdf(visuals: str) -> tuple[str, dict[str, bytes]]:
    """The desk with calvin's link order: button 0, switch 1, slide 2, drawer 3, led 4, light 5, plank 6.

    ``visuals="fast"`` keeps every link, joint and collision shape (and so all physics) but draws each multi-box
    link as meshes of the boxes' outer surface: no faces hidden inside the desk or between touching boxes, which
    TinyRenderer would otherwise rasterise; same shapes, same colours (``layered`` draws the default models)."""
    visuals = _models(check_visuals(visuals))
    meshes: dict[str, bytes] = {}  # mesh file name -> bytes (fast visuals)
    mats = "".join(f'<material name="{n}"><color rgba="{r} {g} {b} {a}"/></material>'
                   for n, (r, g, b, a) in DESK_MATERIALS.items())
    desk = list(zip(_DESK_PARTS, _DESK_MATERIAL_OF_PART))
    if visuals == "default":
        base = "".join(b.xml(m) for b, m in desk) + _switch_track()
    else:  # the desk never shows its underside (it stands on the floor): faces at z = 0 pointing down go too
        origin, geom = _switch_track_parts()
        base = (_boxes_body(desk, visuals, "table_desk", meshes, drop_below_z=0.0)
                + f'<visual>{origin}{geom}<material name="cabinet"/></visual><collision>{origin}{geom}</collision>')
    parts = [f'<robot name="table">{mats}', _link("base_link", base, 0.0)]

    # Button: a cap on the housing, pressed down along world -z. Frame: world-aligned at its joint origin.
    cap = '<origin xyz="0 0 0.012"/><geometry><cylinder radius="0.03" length="0.024"/></geometry>'
    parts.append(_link("button_link", f'<visual>{cap}<material name="button"/></visual><collision>{cap}</collision>', 0.15))
    parts.append(_joint("base__button", "prismatic", "button_link", layout.BUTTON_ORIGIN, (0, 0, 0),
                        layout.BUTTON_AXIS, layout.BUTTON_RANGE_M))

    parts.append(_link("switch_link", _boxes_body(_SWITCH_PARTS, visuals, "table_switch", meshes), 0.2))
    parts.append(_joint("base__switch", "prismatic", "switch_link", layout.SWITCH_ORIGIN, (5 * np.pi / 6, 0, 0),
                        (0, 0, -1), layout.SWITCH_RANGE_M))

    parts.append(_link("slide_link", _boxes_body(_DOOR_PARTS, visuals, "table_door", meshes), 1.5))
    parts.append(_joint("base__slide", "prismatic", "slide_link", layout.SLIDER_ORIGIN, (np.pi / 3, 0, 0),
                        (-1, 0, 0), layout.SLIDER_RANGE_M))

    parts.append(_link("drawer_link", _boxes_body(_DRAWER_PARTS, visuals, "table_drawer", meshes), 4.0))
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
    return "\n".join(parts), meshes


# ---------------------------------------------------------------------------------------------------------------
# Outer-surface meshes (fast visuals)

def surface_quads(parts, drop_below_z: float | None = None) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The outer surface of a union of axis-aligned boxes, as merged rectangles per material.

    The boxes' coordinates cut space into a grid; a cell belongs to the first box (in ``parts`` order) that holds
    it. A cell face is on the surface when the cell across it is empty, and takes its cell's material; coplanar
    faces of one material are merged greedily into rectangles (fewer, larger triangles draw faster than a fine
    tiling in TinyRenderer: measured). Returns ``{material: [(corners (4, 3), normal (3,)), ...]}``, corners
    counter-clockwise seen from outside. ``drop_below_z``: faces pointing down at or below this height are left
    out (a body standing on the floor never shows them).
    """
    for b, _ in parts:
        if any(b.rpy):
            raise ValueError("surface_quads takes axis-aligned boxes only")
    grid = [np.unique(np.concatenate([[b.lo[a] for b, _ in parts], [b.hi[a] for b, _ in parts]])) for a in range(3)]
    centres = [(g[:-1] + g[1:]) / 2 for g in grid]
    shape = tuple(len(c) for c in centres)
    owner = np.full(shape, -1, dtype=int)  # index of the material in `materials`, -1 = empty
    materials = list(dict.fromkeys(m for _, m in parts))
    for b, m in reversed(parts):  # the first box in the list wins a shared cell
        sl = tuple(slice(int(np.searchsorted(centres[a], b.lo[a])), int(np.searchsorted(centres[a], b.hi[a])))
                   for a in range(3))
        owner[sl] = materials.index(m)
    out: dict[str, list] = {m: [] for m in materials}
    for a in range(3):
        b_ax, c_ax = (a + 1) % 3, (a + 2) % 3
        for d in (1, -1):
            padded = np.pad(owner, [(1, 1) if ax == a else (0, 0) for ax in range(3)], constant_values=-1)
            inner = np.take(padded, range(1, shape[a] + 1), axis=a)
            beyond = np.take(padded, range(1 + d, shape[a] + 1 + d), axis=a)
            face = np.where((inner >= 0) & (beyond < 0), inner, -1)  # material of each surface face, -1 = none
            normal = np.zeros(3)
            normal[a] = d
            for i in range(shape[a]):
                plane = grid[a][i + 1] if d > 0 else grid[a][i]
                if d < 0 and a == 2 and drop_below_z is not None and plane <= drop_below_z:
                    continue
                sheet = np.take(face, i, axis=a)  # axes: the other two in increasing order ...
                if b_ax > c_ax:  # ... made (b_ax, c_ax), the order in which corners run counter-clockwise
                    sheet = sheet.T
                for m_idx, (u0, u1, v0, v1) in _greedy_rectangles(sheet):
                    corners = np.zeros((4, 3))
                    uv = [(grid[b_ax][u0], grid[c_ax][v0]), (grid[b_ax][u1], grid[c_ax][v0]),
                          (grid[b_ax][u1], grid[c_ax][v1]), (grid[b_ax][u0], grid[c_ax][v1])]
                    for k, (u, v) in enumerate(uv):
                        corners[k, a], corners[k, b_ax], corners[k, c_ax] = plane, u, v
                    if d < 0:
                        corners = corners[::-1]
                    out[materials[m_idx]].append((corners, normal.copy()))
    return {m: q for m, q in out.items() if q}


def _greedy_rectangles(sheet: np.ndarray) -> list[tuple[int, tuple[int, int, int, int]]]:
    """Cover the cells of a 2-D label array (-1 = none) by rectangles of one label: [(label, (u0, u1, v0, v1))]."""
    todo = sheet.copy()
    rects = []
    nu, nv = todo.shape
    for u in range(nu):
        for v in range(nv):
            m = todo[u, v]
            if m < 0:
                continue
            v1 = v
            while v1 + 1 < nv and todo[u, v1 + 1] == m:
                v1 += 1
            u1 = u
            while u1 + 1 < nu and np.all(todo[u1 + 1, v:v1 + 1] == m):
                u1 += 1
            todo[u:u1 + 1, v:v1 + 1] = -1
            rects.append((int(m), (u, u1 + 1, v, v1 + 1)))
    return rects


def obj_text(quads: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """Wavefront OBJ of flat-shaded quads (two triangles each, counter-clockwise from outside)."""
    lines = ["# generated by sim_eval.world.playtable.models (outer surface of the URDF's collision boxes)"]
    for corners, _ in quads:
        lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in corners]
    for _, n in quads:
        lines.append(f"vn {n[0]:.1f} {n[1]:.1f} {n[2]:.1f}")
    lines.append("vt 0.5 0.5")
    for q in range(len(quads)):
        a, b, c, d = (4 * q + k + 1 for k in range(4))
        n = q + 1
        lines.append(f"f {a}/1/{n} {b}/1/{n} {c}/1/{n}")
        lines.append(f"f {a}/1/{n} {c}/1/{n} {d}/1/{n}")
    return "\n".join(lines) + "\n"


def _surface_mesh_files(parts, prefix: str, meshes: dict, drop_below_z: float | None) -> list[tuple[str, str]]:
    """[(material, mesh file name)] for ``parts``, content-addressed; the files' bytes go into ``meshes``. The URDF
    names them relative to its own folder, where :func:`write_urdfs` puts them."""
    files = []
    for material, quads in surface_quads(list(parts), drop_below_z).items():
        data = obj_text(quads).encode()
        name = f"{prefix}_{material}_{hashlib.sha256(data).hexdigest()[:16]}.obj"
        meshes[name] = data
        files.append((material, name))
    return files


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


ROBOT_FAST_HULL_VERTICES = 24  # fast visuals: each Panda link drawn as the hull of this many of its vertices


def robot_urdf(visuals: str = "default") -> str:
    """pybullet_data's Panda with low-poly visuals, calvin's longer fingers, a ``tcp`` and a ``gripper_cam`` link."""
    return _robot_urdf(visuals)[0]


def _robot_urdf(visuals: str) -> tuple[str, dict[str, bytes]]:
    """``visuals="fast"`` draws every arm link as a coarser convex hull (its collision mesh is a convex hull of
    32-1300 triangles; the coarse one, of ROBOT_FAST_HULL_VERTICES vertices, has ~44), collision meshes unchanged:
    TinyRenderer pays for every triangle's vertices even off screen, most of what the arm costs the gripper view."""
    visuals = _models(check_visuals(visuals))
    data = Path(pybullet_data.getDataPath()) / "franka_panda"
    text = (data / "panda.urdf").read_text()
    head = text.split('<link name="panda_leftfinger">')[0]
    meshes: dict[str, bytes] = {}
    if visuals == "fast":
        def coarse(match: re.Match) -> str:
            stem = match.group(1)
            obj = hull_obj_text(data / "meshes" / "collision" / f"{stem}.obj", ROBOT_FAST_HULL_VERTICES).encode()
            name = f"panda_{stem}_hull{ROBOT_FAST_HULL_VERTICES}_{hashlib.sha256(obj).hexdigest()[:16]}.obj"
            meshes[name] = obj
            return f'filename="{name}"'

        head = re.sub(r"<visual>.*?</visual>", lambda m: re.sub(
            r'filename="package://meshes/(?:visual|collision)/(\w+)\.obj"', coarse, m.group(0)), head, flags=re.S)
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
    return head + tail, meshes


def hull_obj_text(path: Path, n_vertices: int) -> str:
    """OBJ of the convex hull of ``n_vertices`` of a mesh's vertices (farthest-point sampled: spread evenly over
    its hull), faces counter-clockwise from outside, smooth vertex normals."""
    from scipy.spatial import ConvexHull

    verts = np.array([[float(x) for x in line.split()[1:4]] for line in path.read_text().splitlines()
                      if line.startswith("v ")])
    pts = verts[ConvexHull(verts).vertices]
    chosen = [int(np.argmax(np.linalg.norm(pts - pts.mean(axis=0), axis=1)))]
    dist = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    while len(chosen) < min(n_vertices, len(pts)):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(pts - pts[chosen[-1]], axis=1))
    pts = pts[sorted(chosen)]
    hull = ConvexHull(pts)
    used = np.unique(hull.simplices)
    remap = {int(old): new for new, old in enumerate(used)}
    v = pts[used]
    faces, normals = [], np.zeros_like(v)
    for tri, eq in zip(hull.simplices, hull.equations):
        a, b, c = (remap[int(i)] for i in tri)
        n = np.cross(v[b] - v[a], v[c] - v[a])
        if np.dot(n, eq[:3]) < 0:
            b, c = c, b
            n = -n
        faces.append((a, b, c))
        normals[[a, b, c]] += n  # area-weighted: |n| is twice the triangle's area
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    lines = [f"# convex hull of {len(v)} of the vertices of {path.name} (generated by sim_eval.world.playtable)"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in v]
    lines += [f"vn {x:.6f} {y:.6f} {z:.6f}" for x, y, z in normals]
    lines += [f"f {a + 1}//{a + 1} {b + 1}//{b + 1} {c + 1}//{c + 1}" for a, b, c in faces]
    return "\n".join(lines) + "\n"


VISUALS = ("default", "layered", "fast")


def check_visuals(visuals: str) -> str:
    """``visuals`` if it names a visual mode, else ``ValueError``: ``default``, the look the shipped policies were
    trained on; ``layered``, the same models with the static camera drawn from cached layers (see ``layers.py``);
    ``fast``, layered and cheaper models (desk as outer-surface meshes, the arm as coarse hulls)."""
    if visuals not in VISUALS:
        raise ValueError(f"visuals must be one of {list(VISUALS)}, got {visuals!r}")
    return visuals


def _models(visuals: str) -> str:
    return "fast" if visuals == "fast" else "default"  # "layered" draws the default models


@functools.lru_cache(maxsize=None)
def _assets(visuals: str) -> tuple[Mapping[str, bytes], Mapping[str, bytes]]:
    table, meshes = _table_urdf(visuals)
    robot, robot_meshes = _robot_urdf(visuals)
    meshes = {**meshes, **robot_meshes}
    texts = {"table": table, "robot": robot, **{n: block_urdf(n) for n in layout.BLOCK_NAMES}}
    return (MappingProxyType({name: text.encode() for name, text in texts.items()}), MappingProxyType(meshes))


def urdf_texts(visuals: str = "default") -> Mapping[str, bytes]:
    """Every generated URDF by body name, as the bytes written to disk (deterministic; built once per process)."""
    return _assets(check_visuals(visuals))[0]


def mesh_texts(visuals: str = "default") -> Mapping[str, bytes]:
    """The mesh files the URDFs of ``visuals`` refer to, by (content-addressed) file name; none by default."""
    return _assets(check_visuals(visuals))[1]


@functools.lru_cache(maxsize=None)
def _file_name(name: str, visuals: str = "default") -> str:
    return f"{name}_{hashlib.sha256(urdf_texts(visuals)[name]).hexdigest()[:16]}.urdf"


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


def write_urdfs(cache_dir: str | os.PathLike | None = None, visuals: str = "default") -> dict[str, Path]:
    """Write the generated URDFs (and the meshes they name) and return the URDFs' paths by body name; a cached
    file is used only if its content is exactly ours.

    Files are content-addressed (``<body>_<sha256 prefix>.urdf``) and written atomically (temp file + rename), so
    concurrent workers never see half-written files. An existing file with that name is compared byte for byte
    with the generated text, on every call (the env calls this on every reset, just before bullet reads them): a
    planted, edited, truncated or symlinked file is replaced, and if the replacement does not read back as
    written, ``RuntimeError`` is raised rather than loading a world we did not build.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    files = [(name, _file_name(name, visuals), data) for name, data in urdf_texts(visuals).items()]
    meshes = [(None, file, data) for file, data in mesh_texts(visuals).items()]
    for name, file, data in meshes + files:  # meshes first: a URDF is never there before what it names
        path = root / file
        if not _matches(path, data):
            fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name or 'mesh'}_", suffix=".tmp")
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
        if name is not None:
            paths[name] = path
    return paths
