"""``fast3r view``: a reconstruction in the browser, on viser (the ``[view]`` extra).

``scene`` reads a ``fast3r reconstruct`` folder and draws the point budget (numpy only);
``app`` is the viser scene and its controls; ``command`` the command line and the server.
viser is imported by ``app`` and by ``command`` when it serves, never by ``import fast3r``.
"""

from .command import PortInUseError, ViewerError, ViewerNotInstalledError, serve
from .scene import DEFAULT_MAX_POINTS, NotAReconstructionError, Points, Scene, draw_pixels, open_scene

__all__ = ["DEFAULT_MAX_POINTS", "NotAReconstructionError", "Points", "PortInUseError", "Scene", "ViewerError",
           "ViewerNotInstalledError", "draw_pixels", "open_scene", "serve"]
