"""Layered rendering of the fixed static camera (``visuals="layered"`` and ``"fast"``): what has not moved is not
drawn again.

TinyRenderer spends ~150 ns on every pixel a triangle covers, so a 200x200 view filled by the desk costs ~12 ms
however few triangles it has. The static camera never moves, and most of what it sees moves only when the robot
pushes a door, presses the button or carries a block. Its frame is therefore put together from three layers, each
rendered with the others' shapes made transparent (TinyRenderer skips those) and merged per pixel by depth:

* ``fixed``: the desk body, the shelf plank and the robot's pedestal; rendered once per reset (again if the view,
  the lighting or their colours change);
* ``movable``: button, switch, sliding door, drawer, LED, bulb and the blocks; rendered once, then again only inside
  the screen rectangle of a part that moved or changed colour (old and new place);
* ``dynamic``: the robot arm; rendered every frame, inside its screen rectangle only (an off-centre projection of
  the same camera, so its pixels fall on the same grid).

The first frame after a reset is one full pass (a goal renderer that resets for every frame gains nothing from
layers); the layers are built on the second. Frames with shadows (``variation.lighting`` draws them for half the
resets) are always one pass: a layer drawn alone would miss the shadows the others cast on it. Where surfaces of
two layers touch at the same depth (to the depth buffer's precision) the merge may keep the other one than a
single pass would: 0-2 pixels per frame. Nothing here touches physics: only visual colours are switched, and
restored before :meth:`LayeredStaticView.render` returns.

Usage::

    view = LayeredStaticView(client, camera, {"fixed": [...], "movable": [...], "dynamic": [...]}, link_color)
    rgb, depth = view.render()        # as camera.render(client)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pybullet as p

from sim_eval.world.playtable.cameras import StaticCamera, depth_from_zbuffer, rgba_to_rgb

HIDDEN = (0.0, 0.0, 0.0, 0.0)
POSE_TOLERANCE = 1e-4  # m (position) and quaternion units: a free body closer than this to its drawn pose is "still"
PAD_PX = 2  # screen rectangles grow by this much on every side (AABB corners project to sub-pixel positions)
LAYERS = ("fixed", "movable", "dynamic")

_CUBE_CORNERS = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=np.float64)
Link = tuple[int, int]  # (body unique id, link index; -1 = base)
Rect = tuple[int, int, int, int]  # image rows r0:r1, columns c0:c1


class LayeredStaticView:
    """The static camera's frames from cached ``fixed`` / ``movable`` layers and a per-frame ``dynamic`` one.

    ``layers``: ``{"fixed": [...], "movable": [...], "dynamic": [...]}``, disjoint lists of (uid, link) covering
    every visible link of the scene. ``link_color(uid, link)``: the colour a link was given as a whole after
    loading (lamps lit, desk tints), or ``None`` to keep each of its shapes' colours as loaded.
    """

    def __init__(self, client: int, camera: StaticCamera, layers: dict[str, list[Link]],
                 link_color: Callable[[int, int], tuple | None]):
        self.cid, self.camera, self.link_color = client, camera, link_color
        self.layers = {name: list(layers[name]) for name in LAYERS}
        every = [link for name in LAYERS for link in self.layers[name]]
        if len(set(every)) != len(every):
            raise ValueError("a link may be in one layer only")
        self._shapes: dict[Link, list[tuple]] = {}  # per link: its shapes' colours as loaded
        for uid in {u for u, _ in every}:
            for shape in p.getVisualShapeData(uid, physicsClientId=client):
                self._shapes.setdefault((uid, shape[1]), []).append(tuple(shape[7]))
        self._fixed_key = None  # what the fixed layer was drawn for: view, lighting, colours
        self._fixed = None  # (rgb (H, W, 3) uint8, zbuffer (H, W) float32), full frame
        self._movable = None  # the same for the movable layer
        self._background = None  # the two merged
        self._drawn_state: dict[Link, tuple] = {}  # each movable link's state where the movable layer shows it
        self._rects: dict[Link, Rect | None] = {}  # ... and its screen rectangle there
        self._frames = 0  # frames rendered (the env builds a new view for every world it builds: every reset)
        self.stats = {"single_pass": 0, "fixed": 0, "movable": 0, "movable_rect": 0, "dynamic": 0}  # renders done

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        """(rgb (H, W, 3) uint8, metric depth (H, W) float32) of the whole scene, as ``camera.render``."""
        cam = self.camera
        self._frames += 1
        if self._frames == 1 or cam.light.get("shadow"):
            self.stats["single_pass"] += 1
            rgb, zbuf = self._draw(None, None)
            return rgb, depth_from_zbuffer(zbuf, cam.near, cam.far)
        key = (tuple(cam.view_matrix()), tuple(sorted(cam.light.items())),
               tuple(self.link_color(u, l) for u, l in self.layers["fixed"]))
        if key != self._fixed_key:
            self._fixed_key = key
            self._fixed = self._draw("fixed", None)
            self.stats["fixed"] += 1
            self._movable = None
        self._update_movable()
        rgb, zbuf = self._background[0].copy(), self._background[1].copy()
        rect = self._rect(self.layers["dynamic"])
        if rect is not None:
            self.stats["dynamic"] += 1
            d_rgb, d_z = self._draw("dynamic", rect)
            sub = (slice(rect[0], rect[1]), slice(rect[2], rect[3]))
            nearer = d_z < zbuf[sub]  # at an exact tie the desk stays (in one pass the arm is drawn first)
            np.copyto(rgb[sub], d_rgb, where=nearer[..., None])
            np.copyto(zbuf[sub], d_z, where=nearer)
        return rgb, depth_from_zbuffer(zbuf, cam.near, cam.far)

    # ------------------------------------------------------------------------------------------------ layers
    def _update_movable(self) -> None:
        links = self.layers["movable"]
        state = {link: self._link_state(link) for link in links}
        if self._movable is None:
            self._movable = self._draw("movable", None)
            self.stats["movable"] += 1
            self._drawn_state = state
            self._rects = {link: self._rect([link]) for link in links}
            self._background = _merge(self._fixed, self._movable, None)
            return
        changed = [link for link in links if self._moved(link, state[link], self._drawn_state[link])]
        if not changed:
            return
        dirty = []  # per changed link: where it was drawn and where it is now
        for link in changed:
            now = self._rect([link])
            dirty.append(_union([self._rects[link], now]))
            self._rects[link] = now
            self._drawn_state[link] = state[link]  # the others keep the state they were drawn at (see _moved)
        for rect in _disjoint(dirty):
            self.stats["movable_rect"] += 1
            rgb, zbuf = self._draw("movable", rect)
            sub = (slice(rect[0], rect[1]), slice(rect[2], rect[3]))
            self._movable[0][sub], self._movable[1][sub] = rgb, zbuf
            _merge(self._fixed, self._movable, rect, into=self._background)

    def _link_state(self, link: Link) -> tuple:
        """What decides how a movable link looks: its joint value (a base: its pose) and its colour."""
        uid, index = link
        if index >= 0:
            where = (p.getJointState(uid, index, physicsClientId=self.cid)[0],)
        else:
            pos, orn = p.getBasePositionAndOrientation(uid, physicsClientId=self.cid)
            where = (*pos, *orn)
        return where, self.link_color(uid, index)

    @staticmethod
    def _moved(link: Link, new: tuple, old: tuple) -> bool:
        """Joints and colours must match exactly (a door at rest keeps its value to the bit). A free body (a
        block) resting on the desk jitters by ~1e-6 m per step: it counts as moved once its pose is more than
        POSE_TOLERANCE away from the pose it was last drawn at (1e-4 m is 0.03 px in this view)."""
        if new[1] != old[1]:
            return True
        if link[1] >= 0:
            return new[0] != old[0]
        return bool(np.max(np.abs(np.subtract(new[0], old[0]))) > POSE_TOLERANCE)

    # ------------------------------------------------------------------------------------------------ drawing
    def _draw(self, layer: str | None, rect: Rect | None) -> tuple[np.ndarray, np.ndarray]:
        """Render ``layer`` alone (``None``: everything) over the full frame or only ``rect``: (rgb, zbuffer)."""
        cam = self.camera
        hidden = [] if layer is None else [link for name in LAYERS if name != layer for link in self.layers[name]]
        for uid, index in hidden:
            p.changeVisualShape(uid, index, rgbaColor=HIDDEN, physicsClientId=self.cid)
        try:
            if rect is None:
                w, h, proj = cam.width, cam.height, cam.projection_matrix
            else:
                w, h, proj = rect[3] - rect[2], rect[1] - rect[0], self._sub_projection(rect)
            _, _, rgba, zbuf, _ = p.getCameraImage(w, h, cam.view_matrix(), proj, renderer=p.ER_TINY_RENDERER,
                                                   flags=p.ER_NO_SEGMENTATION_MASK, physicsClientId=self.cid,
                                                   **cam.light)
        finally:
            for link in hidden:
                self._restore(link)
        return (rgba_to_rgb(np.asarray(rgba, dtype=np.uint8).reshape(h, w, 4)),
                np.array(zbuf, dtype=np.float32).reshape(h, w))

    def _restore(self, link: Link) -> None:
        uid, index = link
        color = self.link_color(uid, index)
        if color is not None:
            p.changeVisualShape(uid, index, rgbaColor=color, physicsClientId=self.cid)
            return
        for k, rgba in enumerate(self._shapes.get(link, ())):
            p.changeVisualShape(uid, index, shapeIndex=k, rgbaColor=rgba, physicsClientId=self.cid)

    def _sub_projection(self, rect: Rect) -> tuple:
        """The camera's projection narrowed to image rows r0:r1, columns c0:c1 (same pixel grid)."""
        cam = self.camera
        r0, r1, c0, c1 = rect
        w, h = c1 - c0, r1 - r0
        y0 = cam.height - r1  # the rectangle's bottom edge in TinyRenderer's (upward) screen y
        proj = np.array(cam.projection_matrix, dtype=np.float64).reshape(4, 4).T  # row-major
        out = proj.copy()
        out[0] = cam.width / w * proj[0] + ((cam.width - 2 * c0) / w - 1) * proj[3]
        out[1] = cam.height / h * proj[1] + ((cam.height - 2 * y0) / h - 1) * proj[3]
        return tuple(out.T.reshape(-1))

    def _rect(self, links: list[Link]) -> Rect | None:
        """Image rectangle holding the links' AABBs (padded, clipped to the frame); None if none is in view."""
        boxes = [p.getAABB(uid, index, physicsClientId=self.cid) for uid, index in links if (uid, index) in self._shapes]
        if not boxes:
            return None
        cam = self.camera
        lo, hi = np.array(boxes).transpose(1, 0, 2)  # (2, n, 3)
        pts = lo[:, None, :] + (hi - lo)[:, None, :] * _CUBE_CORNERS[None]  # (n, 8, 3)
        view_proj = np.array(cam.projection_matrix).reshape(4, 4).T @ np.array(cam.view_matrix()).reshape(4, 4).T
        clip = pts.reshape(-1, 3) @ view_proj[:, :3].T + view_proj[:, 3]
        if np.any(clip[:, 3] <= 1e-6):  # something at or behind the eye: no rectangle, the whole frame
            return 0, cam.height, 0, cam.width
        u = (clip[:, 0] / clip[:, 3] + 1) / 2 * cam.width
        v = (1 - (clip[:, 1] / clip[:, 3] + 1) / 2) * cam.height
        c0, c1 = int(np.floor(u.min())) - PAD_PX, int(np.ceil(u.max())) + PAD_PX + 1
        r0, r1 = int(np.floor(v.min())) - PAD_PX, int(np.ceil(v.max())) + PAD_PX + 1
        c0, c1, r0, r1 = max(c0, 0), min(c1, cam.width), max(r0, 0), min(r1, cam.height)
        if c1 <= c0 or r1 <= r0:
            return None
        return r0, r1, c0, c1


def _union(rects: list[Rect | None]) -> Rect | None:
    rects = [r for r in rects if r is not None]
    if not rects:
        return None
    return min(r[0] for r in rects), max(r[1] for r in rects), min(r[2] for r in rects), max(r[3] for r in rects)


def _disjoint(rects: list[Rect | None]) -> list[Rect]:
    """Rectangles covering ``rects``, overlapping ones merged (each drawn once, none drawn twice)."""
    out = [r for r in rects if r is not None]
    merged = True
    while merged:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                a, b = out[i], out[j]
                if a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]:
                    out[i] = _union([a, b])
                    del out[j]
                    merged = True
                    break
            if merged:
                break
    return out


def _merge(fixed, movable, rect: Rect | None, into=None) -> tuple[np.ndarray, np.ndarray]:
    """Fixed and movable layers merged by depth (a movable part wins a tie), everywhere or only in ``rect``."""
    if into is None:
        into = (fixed[0].copy(), fixed[1].copy())
    sub = np.s_[:, :] if rect is None else (slice(rect[0], rect[1]), slice(rect[2], rect[3]))
    nearer = movable[1][sub] <= fixed[1][sub]
    np.copyto(into[0][sub], np.where(nearer[..., None], movable[0][sub], fixed[0][sub]))
    np.copyto(into[1][sub], np.where(nearer, movable[1][sub], fixed[1][sub]))
    return into
