"""``fast3r view SCENE_DIR [--port P] [--host H] [--max-points N]`` and ``fast3r reconstruct ... --view``.

Start-up order is chosen for the first frame: the folder is checked (its npz mapped, not
read), the server starts and the URL is printed, so the browser loads the page while the
point budget is read; then the points are sent, then the cameras.

Ports: viser takes the next free port when one is taken. Without ``--port`` that is what
happens (8080, else 8081, ...), and the printed URL says which. A port the user asked for
is one an SSH tunnel or a bookmark points at, so a taken one is an error instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import sys
import threading
import time
from pathlib import Path

from .scene import DEFAULT_MAX_POINTS, NotAReconstructionError, open_scene

EXTRA = "view"
INSTALL_EXTRA = f'pip install -e ".[{EXTRA}]"'
DEFAULT_PORT = 8080  # viser's own default
DEFAULT_HOST = "localhost"
ANY_HOST = ("0.0.0.0", "::", "")


class ViewerError(Exception):
    """A problem ``fast3r view`` reports as ``error: ...`` with exit status 2."""


class ViewerNotInstalledError(ViewerError, ImportError):
    pass


class PortInUseError(ViewerError, OSError):
    pass


class BadHostError(ViewerError, OSError):
    pass


# ------------------------------------------------------------------------------ arguments
def add_view_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    view = commands.add_parser(
        "view", help="look at a reconstruction in the browser",
        description="Serve a local web viewer (viser) of a folder `fast3r reconstruct` wrote: coloured points, "
                    "a confidence-percentile slider, global or local pointmaps, the cameras with their images.")
    view.add_argument("scene", type=Path, metavar="SCENE_DIR", help="the --out folder of `fast3r reconstruct`")
    add_server_arguments(view)
    return view


def add_view_flags(reconstruct: argparse.ArgumentParser) -> None:
    """``--view`` (and the server's options) for ``fast3r reconstruct``."""
    reconstruct.add_argument("--view", action="store_true",
                             help="when done, serve the viewer of --out (as `fast3r view`; needs npz in --export)")
    add_server_arguments(reconstruct, prefix="with --view: ")


def add_server_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument("--port", type=_port, metavar="P",
                        help=f"{prefix}port to serve on (default {DEFAULT_PORT}, or the next free one; a port "
                             "given here must be free; 0: any free port)")
    parser.add_argument("--host", default=DEFAULT_HOST, metavar="H",
                        help=f"{prefix}address to listen on (default {DEFAULT_HOST}: this machine only; "
                             "0.0.0.0: every network interface)")
    parser.add_argument("--max-points", type=_budget, default=DEFAULT_MAX_POINTS, metavar="N",
                        help=f"{prefix}points sent to the browser (default {DEFAULT_MAX_POINTS:,}, a laptop "
                             "GPU's share; a uniform draw over all views)")


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port in [0, 65535]")
    return port


def _budget(text: str) -> int:
    value = int(float(text))  # accepts 2e6
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a point budget >= 1")
    return value


# ------------------------------------------------------------------------------ running
def run(args: argparse.Namespace) -> int:
    """``fast3r view``: serve until Ctrl-C; 0, or 2 after printing a named error."""
    try:
        serve(args.scene, host=args.host, port=args.port, max_points=args.max_points)
    except (ViewerError, NotAReconstructionError) as err:
        print(f"fast3r view: error: {err}", file=sys.stderr)
        return 2
    return 0


def check_before_reconstruct(args: argparse.Namespace) -> int:
    """For ``reconstruct --view``: refuse before the long run what would stop the viewer after it; 0 or 2."""
    try:
        require_viser()
        if "npz" not in args.export:
            raise ViewerError("--view reads reconstruction.npz: add npz to --export (e.g. --export ply,npz)")
        check_host(args.host)
    except ViewerError as err:
        print(f"fast3r reconstruct: error: {err}", file=sys.stderr)
        return 2
    return 0


def serve(directory: str | Path, *, host: str = DEFAULT_HOST, port: int | None = None,
          max_points: int = DEFAULT_MAX_POINTS, stop: threading.Event | None = None, out=None,
          first_frame_wait_s: float | None = None) -> None:
    """Serve the viewer of ``directory`` until ``stop`` is set or Ctrl-C; prints the URL as soon as it answers.

    first_frame_wait_s: how long the cameras wait for a browser's first frame (default
    ``app.FIRST_FRAME_WAIT_S``; see ``SceneViewer.load``).
    """
    out = sys.stdout if out is None else out
    start = time.perf_counter()
    require_viser()
    scene = open_scene(directory)
    server = start_server(host, port)
    try:
        from .app import FIRST_FRAME_WAIT_S, SceneViewer

        viewer = SceneViewer(server, scene, max_points=max_points)
        moved = f" (port {DEFAULT_PORT} is taken)" if port is None and server.get_port() != DEFAULT_PORT else ""
        print(f"fast3r view: {url(host, server.get_port())}{moved}  {scene.n_views} views of {scene.directory}",
              file=out, flush=True)
        if host in ANY_HOST:
            print("fast3r view: listening on every network interface: anyone who can reach this machine can "
                  "open the viewer", file=out, flush=True)
        viewer.load(FIRST_FRAME_WAIT_S if first_frame_wait_s is None else first_frame_wait_s)
        print(f"fast3r view: ready in {time.perf_counter() - start:.1f} s: {len(viewer._points['global']):,} points "
              f"of {scene.n_pixels:,}, {scene.n_views} cameras. Ctrl-C to stop", file=out, flush=True)
        stop = threading.Event() if stop is None else stop
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        server.stop()


def require_viser():
    try:
        import viser
    except ImportError as err:
        raise ViewerNotInstalledError(
            f"the viewer needs viser, from the [{EXTRA}] extra: {INSTALL_EXTRA} in a checkout "
            f"(or pip install \"fast3r-kernels[{EXTRA}]\")") from err
    return viser


def start_server(host: str, port: int | None):
    """A ViserServer on ``host``; ``port`` None: DEFAULT_PORT or the next free one, else exactly ``port``."""
    viser = require_viser()
    check_host(host)
    with contextlib.redirect_stdout(io.StringIO()):  # viser's own banner: we print one URL line instead
        server = viser.ViserServer(host=host, port=DEFAULT_PORT if port is None else port, verbose=False)
    if port not in (None, 0) and server.get_port() != port:
        server.stop()
        raise PortInUseError(f"port {port} on {host} is in use (another `fast3r view`, or another program); "
                             "pass another --port, --port 0 for any free one, or leave --port out "
                             f"to take {DEFAULT_PORT} or the next free port")
    server.gui.configure_theme(show_share_button=False, show_logo=False, control_width="medium")
    return server


def check_host(host: str) -> None:
    """The host must name an address of this machine: viser would otherwise try 1000 ports and hang."""
    try:
        infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise BadHostError(f"--host {host}: not a known address ({err.strerror}); use localhost, 0.0.0.0 "
                           "or an address of this machine") from err
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(address)
                return
            except OSError:
                continue
    raise BadHostError(f"--host {host}: no address of this machine; use localhost, 0.0.0.0 or one of its own")


def url(host: str, port: int) -> str:
    if host in ANY_HOST:
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
