"""The viser scene and controls of ``fast3r view``: points by confidence percentile, camera frusta, per-view visibility.

The point budget is drawn once (``scene.draw_pixels``). Its points are split into one
point cloud per confidence percentile (0 ... 99, each point's rank within its view), so
the percentile slider only switches clouds on and off: a message per cloud and a frame,
whatever the budget, instead of sending the points again. Hiding views or switching to
the local pointmaps re-sends the budget once (the local ones are read on first use).
Every camera is a frustum with the view's image on it, all of them in two scene nodes
(``frusta``); a click on an image looks through that camera and selects the view.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import viser
import viser.transforms as vtf
from matplotlib import colormaps

from ..export import DEFAULT_CONF_PERCENTILE, FRUSTUM_FRACTION
from . import frusta
from .scene import (
    DEFAULT_MAX_POINTS,
    PERCENTILES,
    Points,
    Scene,
    draw_pixels,
    global_points,
    local_points,
    scene_extent,
)

MAPS = ("global", "local")
THUMBNAIL_PX = 48  # long side of a camera's image in the atlas (less beyond 85 x 85 views: frusta.ATLAS_PX)
SELECTED_COLOUR = (255, 40, 40)
FIRST_FRAME_WAIT_S = 30.0  # the cameras wait at most this long for a browser's answer
POINT_SHAPE = "rounded"
FRUSTUM_LINE_PX = 1.5


class SceneViewer:
    """Builds the GUI at once (the page has controls while points load), then ``load()`` draws points and cameras."""

    def __init__(self, server: viser.ViserServer, scene: Scene, *, max_points: int = DEFAULT_MAX_POINTS,
                 seed: int = 0, on_status: Callable[[str], object] | None = None):
        self.server, self.scene, self.max_points, self.seed = server, scene, max_points, seed
        self._on_status = on_status
        self._lock = threading.RLock()  # GUI callbacks run on viser's thread pool
        self._points: dict[str, Points] = {}
        self._order: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # map -> (indices by percentile, bin bounds)
        self._clouds: dict[str, list] = {}  # map -> one point cloud handle per percentile
        self._stale: set[str] = set()  # maps whose clouds predate the last visibility change
        self.frusta: list = []
        self.pixels = None
        self.point_size = 0.0
        self.shown_views = np.ones(scene.n_views, dtype=bool)
        self.hidden_views: set[int] = set()
        self.selected: int | None = None
        self._set_initial_camera()
        self._build_gui()

    # -------------------------------------------------------------------------- loading
    def load(self, first_frame_wait_s: float = FIRST_FRAME_WAIT_S) -> None:
        """Draw the budget's global points, then add the cameras once a browser has taken the points.

        A browser that connects gets every message sent so far in one go; in a slow one
        (software WebGL) the cameras' image mesh then held back the first frame by seconds.
        So the cameras wait until a connected browser has answered a render request, which
        it receives after the points (or ``first_frame_wait_s`` with no browser). That
        answer does not prove the points were on screen: the browser applies scene messages
        asynchronously (measured: it answered 3-4 s after the start, the screenshot showed
        the points 7-9 s later), so it only orders the cameras after the points.
        """
        with self._lock:
            self.pixels = draw_pixels(self.scene, self.max_points, self.seed)
            points = self._points_of("global")
            self.extent = scene_extent(points.xyz, self.scene.cam2world)
            self.point_size = self.extent / math.sqrt(max(len(points), 1))
            self._draw("global")
            self._status(note="adding the cameras ...")
        drawn = threading.Event()
        self.server.on_client_connect(lambda client: _wait_for_a_frame(client, drawn))
        drawn.wait(first_frame_wait_s)
        self._add_cameras()
        self._status()

    def _points_of(self, kind: str) -> Points:
        if kind not in self._points:
            load = global_points if kind == "global" else local_points
            points = self._points[kind] = load(self.scene, self.pixels)
            order = np.argsort(points.percentile, kind="stable")
            bounds = np.searchsorted(points.percentile[order], np.arange(PERCENTILES + 1))
            self._order[kind] = (order, bounds)
        return self._points[kind]

    def _draw(self, kind: str) -> None:
        """Send ``kind``'s points of the shown views, one cloud per percentile; add the clouds the first time."""
        points, (order, bounds) = self._points_of(kind), self._order[kind]
        shown = self.shown_views[points.view]
        clouds = self._clouds.get(kind)
        with self.server.atomic():
            new = []
            for p in range(PERCENTILES):
                index = order[bounds[p] : bounds[p + 1]]
                index = index[shown[index]]
                if clouds is None:
                    new.append(self.server.scene.add_point_cloud(
                        f"/points/{kind}/{p:02d}", points.xyz[index], points.rgb[index],
                        point_size=self.point_size * self.gui_point_size.value, point_shape=POINT_SHAPE,
                        point_shading="flat", precision="float32", visible=self._cloud_visible(kind, p)))
                else:
                    clouds[p].points, clouds[p].colors = points.xyz[index], points.rgb[index]
            if clouds is None:
                self._clouds[kind] = new
        self._stale.discard(kind)

    def _add_cameras(self) -> None:
        """All frusta as one line-segment node and their images as one textured mesh (see ``frusta``)."""
        with self._lock:
            self._atlas = frusta.atlas(self.scene, THUMBNAIL_PX)
            self._draw_cameras()

    def _draw_cameras(self) -> None:
        scene = self.scene
        depth = FRUSTUM_FRACTION * self.extent * self.gui_camera_size.value
        self.corners = frusta.frustum_corners(scene, depth)
        colours = (colormaps["viridis"](np.linspace(0, 1, scene.n_views))[:, :3] * 255).astype(np.uint8)
        with self.server.atomic():
            self.frusta = [
                self.server.scene.add_line_segments(
                    "/cameras/frusta", frusta.wireframes(self.corners),
                    np.repeat(colours, len(frusta.EDGES), axis=0)[:, None].repeat(2, axis=1),
                    thickness=FRUSTUM_LINE_PX, thickness_units="screen", visible=self.gui_cameras.value),
                self.server.scene.add_glb(
                    "/cameras/images", frusta.unlit_glb(frusta.image_mesh(self.corners, *self._atlas)),
                    visible=self.gui_cameras.value, cast_shadow=False, receive_shadow=False),
            ]
        self.frusta[1].on_click(self._clicked)  # the images take clicks (viser's line segments do not)
        if self.selected is not None:
            self._highlight(self.selected)

    def _clicked(self, event) -> None:
        view = frusta.pick(self.corners, np.asarray(event.ray_origin), np.asarray(event.ray_direction))
        if view is not None:
            self.select(view, event.client)

    def _highlight(self, view: int) -> None:
        h, w = (int(s) for s in self.scene.sizes[view])
        c2w = self.scene.cam2world[view]
        self.server.scene.add_camera_frustum(
            "/cameras/selected", fov=vertical_fov(self.scene.intrinsics[view], h), aspect=w / h,
            scale=FRUSTUM_FRACTION * self.extent * self.gui_camera_size.value, thickness=3 * FRUSTUM_LINE_PX,
            thickness_units="screen", color=SELECTED_COLOUR, wxyz=vtf.SO3.from_matrix(c2w[:3, :3]).wxyz,
            position=c2w[:3, 3], visible=self.gui_cameras.value, cast_shadow=False, receive_shadow=False)

    # -------------------------------------------------------------------------- controls
    def _build_gui(self) -> None:
        gui, n = self.server.gui, self.scene.n_views
        self.gui_status = gui.add_markdown(f"Loading {n} views from `{self.scene.directory}` ...")
        self.gui_map = gui.add_dropdown("pointmap", MAPS if self.scene.has_local else MAPS[:1], initial_value="global",
                                        hint="global: the global head's points; local: each view's own pointmap, "
                                             "fitted onto the global one")
        self.gui_percentile = gui.add_slider(
            "confidence percentile", min=0, max=PERCENTILES - 1, step=1, initial_value=int(DEFAULT_CONF_PERCENTILE),
            hint="per view: keep the points at or above this percentile of the view's confidences")
        self.gui_point_size = gui.add_slider("point size", min=0.1, max=5.0, step=0.1, initial_value=1.0,
                                             hint="times the average spacing of the points")
        self.gui_views = gui.add_multi_slider("views", min=0, max=max(n - 1, 1), step=1, initial_value=(0, n - 1),
                                              hint="show the points of views first ... last", disabled=n < 2)
        self.gui_cameras = gui.add_checkbox("cameras", initial_value=True)
        self.gui_camera_size = gui.add_slider("camera size", min=0.1, max=5.0, step=0.1, initial_value=1.0)
        with gui.add_folder("selected view (click a camera)"):
            self.gui_selected = gui.add_markdown("none")
            self.gui_show_selected = gui.add_checkbox("show its points", initial_value=True, disabled=True)
            self.gui_only_selected = gui.add_button("only this view", disabled=True)
            self.gui_all_views = gui.add_button("all views")
        self.gui_map.on_update(lambda _: self.set_map(self.gui_map.value))
        self.gui_percentile.on_update(lambda _: self.set_percentile(self.gui_percentile.value))
        self.gui_point_size.on_update(lambda _: self._set_point_size())
        self.gui_views.on_update(lambda _: self._update_views())
        self.gui_cameras.on_update(lambda _: self._set_cameras())
        self.gui_camera_size.on_update(lambda _: self._set_cameras())
        self.gui_show_selected.on_update(lambda _: self._show_selected(self.gui_show_selected.value))
        self.gui_only_selected.on_click(lambda _: self.only_selected())
        self.gui_all_views.on_click(lambda _: self.all_views())

    def set_percentile(self, percentile: int) -> None:
        """Show the clouds at or above ``percentile``: one visibility flag per cloud, no points sent."""
        with self._lock:
            if self.gui_percentile.value != percentile:
                self.gui_percentile.value = percentile  # its callback comes back here
                return
            with self.server.atomic():
                for kind, clouds in self._clouds.items():
                    for p, cloud in enumerate(clouds):
                        cloud.visible = self._cloud_visible(kind, p)
            self._status()

    def set_map(self, kind: str) -> None:
        with self._lock:
            if kind not in MAPS[: 1 + self.scene.has_local]:
                raise ValueError(f"pointmap {kind!r}; choose from {MAPS[: 1 + self.scene.has_local]}")
            if self.gui_map.value != kind:
                self.gui_map.value = kind
                return
            if self.pixels is None:
                return
            if kind not in self._clouds or kind in self._stale:
                self._status(note=f"reading the {kind} pointmaps ...")
                self._draw(kind)
            self.set_percentile(self.gui_percentile.value)

    def set_views(self, first: int, last: int, hidden: set[int] | None = None) -> None:
        """Show the points of views ``first`` ... ``last`` but ``hidden``; re-sends the shown map's points."""
        with self._lock:
            if hidden is not None:
                self.hidden_views = set(hidden)
            if tuple(self.gui_views.value) != (first, last):
                self.gui_views.value = (first, last)  # its callback comes back through _update_views
                return
            self._update_views()

    def _update_views(self) -> None:
        with self._lock:
            first, last = (int(v) for v in self.gui_views.value)
            shown = np.zeros(self.scene.n_views, dtype=bool)
            shown[first : last + 1] = True
            shown[list(self.hidden_views)] = False
            if (shown == self.shown_views).all():
                return
            self.shown_views = shown
            if self.pixels is None:
                return
            self._stale.update(self._clouds)
            self._draw(self.gui_map.value)
            self._status()

    def select(self, view: int, client: viser.ClientHandle | None = None) -> None:
        """Select a view (its GUI folder) and, for ``client``, look through its camera."""
        with self._lock:
            self.selected = view
            h, w = self.scene.sizes[view]
            focal = self.scene.intrinsics[view, 0, 0]
            self.gui_selected.content = (f"**view {view}** `{self.scene.names[view]}`  \n{h} x {w} px, "
                                         f"focal {focal:.1f} px")
            self.gui_show_selected.disabled = self.gui_only_selected.disabled = False
            self.gui_show_selected.value = view not in self.hidden_views
            if self.frusta:
                self._highlight(view)
        if client is not None:
            look_through(client.camera, self.scene, view)

    def _show_selected(self, show: bool) -> None:
        if self.selected is None:
            return
        hidden = (self.hidden_views - {self.selected}) if show else (self.hidden_views | {self.selected})
        self.set_views(*self.gui_views.value, hidden=hidden)

    def only_selected(self) -> None:
        if self.selected is not None:
            self.set_views(self.selected, self.selected, hidden=set())

    def all_views(self) -> None:
        self.set_views(0, self.scene.n_views - 1, hidden=set())
        if self.selected is not None:
            self.gui_show_selected.value = True

    def _set_point_size(self) -> None:
        with self._lock, self.server.atomic():
            for clouds in self._clouds.values():
                for cloud in clouds:
                    cloud.point_size = self.point_size * self.gui_point_size.value

    def _set_cameras(self) -> None:
        with self._lock:
            if self.frusta:
                self._draw_cameras()  # two nodes again: the frusta's geometry is in world units

    # -------------------------------------------------------------------------- state shown
    def _cloud_visible(self, kind: str, percentile: int) -> bool:
        return kind == self.gui_map.value and percentile >= self.gui_percentile.value

    def shown_points(self) -> int:
        """Points of the shown map at or above the percentile, in the shown views."""
        kind = self.gui_map.value
        if kind not in self._points:
            return 0
        points, (order, bounds) = self._points[kind], self._order[kind]
        index = order[bounds[self.gui_percentile.value] :]
        return int(self.shown_views[points.view[index]].sum())

    def _status(self, *, note: str = "") -> None:
        scene = self.scene
        cams = f"{scene.n_views} cameras" if self.frusta else "no cameras yet"
        text = (f"**{self.shown_points():,}** points shown · {len(self._points.get('global', ())):,} sent of "
                f"{scene.n_pixels:,} predicted (budget {self.max_points:,}) · {int(self.shown_views.sum())} of "
                f"{scene.n_views} views · {cams}" + (f"  \n{note}" if note else ""))
        self.gui_status.content = text
        if self._on_status is not None:
            self._on_status(text)

    def _set_initial_camera(self) -> None:
        """Look at view 0's points from behind and above its camera, with its up; orbit around the scene's up."""
        c2w = self.scene.cam2world[0]
        up = -c2w[:3, 1]
        centre = view_centre(self.scene, 0)
        back = c2w[:3, 3] - centre
        distance = float(np.linalg.norm(back)) or 1.0
        self.server.scene.set_up_direction(tuple(up))
        camera = self.server.initial_camera
        camera.position = tuple(centre + 1.5 * back + 0.5 * distance * up)
        camera.look_at = tuple(centre)
        camera.up = tuple(up)


def _wait_for_a_frame(client: viser.ClientHandle, drawn: threading.Event) -> None:
    """Set ``drawn`` once ``client`` has answered a tiny render request, sent after the points."""
    try:
        client.get_render(height=8, width=8, timeout=FIRST_FRAME_WAIT_S)
    except (TimeoutError, RuntimeError):
        pass  # a browser that cannot render: the cameras go out anyway
    drawn.set()


def look_through(camera, scene: Scene, view: int) -> None:
    """Put a client's camera (a ``viser.CameraHandle``) at view ``view``'s pose, with its vertical field of view."""
    c2w = scene.cam2world[view]
    with camera.client.atomic():
        camera.wxyz = vtf.SO3.from_matrix(c2w[:3, :3]).wxyz
        camera.position = c2w[:3, 3]
        camera.fov = vertical_fov(scene.intrinsics[view], int(scene.sizes[view][0]))


def vertical_fov(intrinsics: np.ndarray, height: int) -> float:
    """Vertical field of view in radians of a pinhole camera (focal fy, image height in pixels)."""
    return 2 * math.atan2(height / 2, float(intrinsics[1, 1]))


def view_centre(scene: Scene, view: int) -> np.ndarray:
    """Median of a view's finite global points (a point in front of its camera if it has none): reads one view."""
    h, w = scene.sizes[view]
    points = np.asarray(scene.pts3d[view, :h, :w]).reshape(-1, 3)
    points = points[np.isfinite(points).all(-1)]
    if len(points):
        return np.median(points, axis=0).astype(np.float64)
    return scene.cam2world[view, :3, 3] + scene.cam2world[view, :3, 2]
