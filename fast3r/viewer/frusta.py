"""All the cameras as two scene nodes: one set of line segments (the wire frusta) and one textured mesh (their images).

One viser frustum per camera costs a scene node, a texture and several draw calls each:
at 1500 views that was measured at over 4 s to add on the server and 19 s to the first
frame in the software-rendered browser (6 s a frame), against 6 s and 2 s for the same
wireframes as one node. So every view's image is a cell of one atlas texture on one mesh
of two triangles per camera, and a click on the mesh is turned back into a camera by
casting the click's ray against those triangles (``pick``).
"""

from __future__ import annotations

import io
import json
import math
import struct

import numpy as np

from .scene import Scene, thumbnail

ATLAS_PX = 4096  # the atlas' side at most: WebGL's guaranteed texture size on any laptop GPU
ATLAS_JPEG_QUALITY = 85
# Apex (0) to each image corner (1-4), then the rim: 1-2, 2-3, 3-4, 4-1.
EDGES = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [1, 2], [2, 3], [3, 4], [4, 1]])


def frustum_corners(scene: Scene, depth: float) -> np.ndarray:
    """(N, 5, 3) world points: each camera's centre and its image corners (0,0), (W,0), (W,H), (0,H).

    The image sits at ``depth`` in front of the camera, nearer for a field of view wider
    than 90 degrees, so that no image is wider than 2 x ``depth`` (a wrong focal would
    otherwise draw a huge one).
    """
    wh = scene.sizes[:, ::-1].astype(np.float64)
    pixels = np.stack([np.zeros_like(wh), wh * [1, 0], wh, wh * [0, 1]], axis=1)  # (N, 4, 2)
    k = scene.intrinsics
    rays = (pixels - k[:, None, :2, 2]) / k[:, None, [0, 1], [0, 1]]
    reach = np.maximum(1.0, np.abs(rays).max(axis=(1, 2)))[:, None, None]
    local = np.concatenate([rays, np.ones((*rays.shape[:2], 1))], -1) * depth / reach
    corners = np.einsum("nij,nkj->nki", scene.cam2world[:, :3, :3], local) + scene.cam2world[:, None, :3, 3]
    return np.concatenate([scene.cam2world[:, None, :3, 3], corners], axis=1)


def wireframes(corners: np.ndarray) -> np.ndarray:
    """(N * 8, 2, 3) line segments of all frusta, for ``scene.add_line_segments``."""
    return corners[:, EDGES].reshape(-1, 2, 3)


def atlas(scene: Scene, cell_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Every view's thumbnail in one image: (H, W, 3) uint8 and each view's box (N, 4) as x0, y0, x1, y1 pixels."""
    columns = math.ceil(math.sqrt(scene.n_views))
    cell = max(1, min(cell_px, ATLAS_PX // columns))
    rows = math.ceil(scene.n_views / columns)
    image = np.zeros((rows * cell, columns * cell, 3), dtype=np.uint8)
    boxes = np.empty((scene.n_views, 4), dtype=np.int64)
    for i in range(scene.n_views):
        small = thumbnail(scene, i, cell)
        y, x = (i // columns) * cell, (i % columns) * cell
        image[y : y + small.shape[0], x : x + small.shape[1]] = small
        boxes[i] = x, y, x + small.shape[1], y + small.shape[0]
    return image, boxes


def image_mesh(corners: np.ndarray, image: np.ndarray, boxes: np.ndarray):
    """A trimesh of two triangles per camera over its image corners, textured from the atlas, both faces drawn."""
    import trimesh
    from PIL import Image

    n = len(corners)
    vertices = corners[:, 1:].reshape(-1, 3)
    quads = np.arange(n)[:, None] * 4
    faces = np.concatenate([quads + [0, 1, 2], quads + [0, 2, 3]]).astype(np.int64)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = boxes.T.astype(np.float64)
    # trimesh's UVs start at the bottom-left; corner order (0,0), (W,0), (W,H), (0,H) of each view's box.
    u = np.stack([x0, x1, x1, x0], 1) / w
    v = 1 - np.stack([y0, y0, y1, y1], 1) / h
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=ATLAS_JPEG_QUALITY)
    texture = Image.open(buffer)  # a JPEG-backed image: trimesh embeds it as JPEG, not PNG
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=texture, doubleSided=True)
    visual = trimesh.visual.TextureVisuals(uv=np.stack([u, v], -1).reshape(-1, 2), material=material)
    return trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)


def unlit_glb(mesh) -> bytes:
    """The mesh as GLB with its materials marked KHR_materials_unlit: the images' own colours, no lighting.

    Unlit also spares the browser the environment map three.js prepares for a lit (PBR)
    material: lit, the mesh took 40-60 s to appear in the software-rendered browser, unlit
    8-15 s. trimesh writes no such flag, so it is added to the GLB's JSON chunk.
    """
    data = mesh.export(file_type="glb")
    length = struct.unpack_from("<I", data, 12)[0]
    gltf = json.loads(data[20 : 20 + length])
    for material in gltf.get("materials", []):
        material.setdefault("extensions", {})["KHR_materials_unlit"] = {}
    gltf["extensionsUsed"] = sorted({*gltf.get("extensionsUsed", []), "KHR_materials_unlit"})
    chunk = json.dumps(gltf, separators=(",", ":")).encode()
    chunk += b" " * (-len(chunk) % 4)  # chunks are 4-byte aligned; JSON pads with spaces
    rest = data[20 + length :]
    header = struct.pack("<4sII", b"glTF", 2, 12 + 8 + len(chunk) + len(rest))
    return header + struct.pack("<I4s", len(chunk), b"JSON") + chunk + rest


def pick(corners: np.ndarray, origin: np.ndarray, direction: np.ndarray) -> int | None:
    """The camera whose image the ray hits first (Moller-Trumbore on its two triangles), else None."""
    a = corners[:, [1, 1]]  # (N, 2, 3): triangles (1, 2, 3) and (1, 3, 4)
    b = corners[:, [2, 3]]
    c = corners[:, [3, 4]]
    e1, e2 = b - a, c - a
    p = np.cross(direction, e2)
    det = (e1 * p).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / det
        s = origin - a
        u = (s * p).sum(-1) * inv
        q = np.cross(s, e1)
        v = (q * direction).sum(-1) * inv
        t = (e2 * q).sum(-1) * inv
    edge = 1e-9  # the two triangles share the diagonal through the image centre: keep points on it
    hit = (np.abs(det) > 1e-12) & (u >= -edge) & (v >= -edge) & (u + v <= 1 + edge) & (t > 0)
    if not hit.any():
        return None
    t = np.where(hit, t, np.inf).min(1)
    return int(np.argmin(t))
