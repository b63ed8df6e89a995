"""Ray-cast renderer of a `World`: street-level views (pinhole / fisheye) and top-down orthophotos.

Single-threaded numpy + Embree (embreex). One primary ray per pixel through the pixel centre
(half-integer pixel coordinates, from `neuralmaps.geometry` cameras so that the renderer and the
model agree exactly), the ground is the plane z = 0 hit analytically and coloured from the world's
ground raster, and every lit hit casts one shadow ray toward the sun (static world + the run's
occluders). Shading: Lambert sun + ambient sky light; sky: appearance-dependent gradient with
cloud noise, labelled void.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from neuralmaps.geometry import Camera, FisheyeCamera, PinholeCamera, Transform2D, Transform3D, bev_pose_to_camera

from .appearance import Appearance
from .materials import VOID, FaceMat
from .noise import value_noise


class World(Protocol):
    """What the renderer reads of a `neuralmaps.synth.world.World` (which calls the renderer from
    `World.render`; the renderer does not import it, so the two do not import each other)."""

    vertices: np.ndarray
    face_class: np.ndarray
    face_mat: np.ndarray
    face_color: np.ndarray
    face_owner: np.ndarray
    styles: Any

    @property
    def scene(self) -> Any: ...
    @property
    def face_normals(self) -> np.ndarray: ...
    @property
    def face_tangents(self) -> np.ndarray: ...
    @property
    def facade_table(self) -> np.ndarray: ...
    @property
    def texture(self) -> Any: ...
    def ground_lookup(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

__all__ = ["RenderOutput", "render_view", "render_orthophoto", "camera_rays", "trace", "camera_pose"]

SHADOW_BIAS_M = 0.02  # shadow rays start this far off the surface (float32 self-hit margin)
_SUN_COLOR = np.array((1.0, 0.96, 0.90), np.float32)
_CLOUD_COLOR = np.array((0.86, 0.87, 0.90), np.float32)
_HIT_SKY, _HIT_MESH, _HIT_OCC, _HIT_GROUND = 0, 1, 2, 3
DEFAULT_APPEARANCE = Appearance()


@dataclass
class RenderOutput:
    """One rendered view. rgb (H, W, 3) uint8; depth (H, W) float32 z-depth along the camera axis in
    metres (inf for sky / outside a fisheye's field of view); labels (H, W) uint8 class index
    (CLASS_NAMES), 255 for sky, void ground and dynamic occluders."""

    rgb: np.ndarray
    depth: np.ndarray
    labels: np.ndarray


# -- cameras ------------------------------------------------------------------------------------
def camera_rays(camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """Unit rays (H, W, 3) float32 in the OpenCV camera frame through every pixel centre, and the
    valid mask (H, W) bool (False outside a fisheye's field of view). Cached per intrinsics."""
    if not isinstance(camera, Camera):
        raise TypeError(f"render: camera must be a neuralmaps.geometry PinholeCamera / FisheyeCamera, got {type(camera).__name__}")
    data = camera.to_tensor()
    if data.dim() != 1:
        raise ValueError(f"render: one camera at a time, got a batch of shape {tuple(camera.shape)}")
    max_fov = float(camera.max_fov_deg) if isinstance(camera, FisheyeCamera) else 0.0
    rays, valid = _camera_rays_cached(type(camera).__name__, tuple(float(v) for v in data.tolist()), max_fov)
    return rays, valid


@lru_cache(maxsize=32)
def _camera_rays_cached(model: str, data: tuple[float, ...], max_fov_deg: float) -> tuple[np.ndarray, np.ndarray]:
    w, h = int(round(data[0])), int(round(data[1]))
    if w <= 0 or h <= 0:
        raise ValueError(f"render: camera image size must be positive, got {w}x{h}")
    cam = FisheyeCamera(torch.tensor(data, dtype=torch.float64), max_fov_deg) if model == "FisheyeCamera" \
        else PinholeCamera(torch.tensor(data, dtype=torch.float64))
    jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)  # pixel centres are half-integers
    p2d = torch.from_numpy(np.stack([jj, ii], -1).reshape(-1, 2))
    rays = cam.unproject(p2d).numpy().reshape(h, w, 3)
    valid = rays[..., 2] > 1e-6
    if model == "FisheyeCamera":
        valid &= np.arccos(np.clip(rays[..., 2], -1, 1)) < math.radians(max_fov_deg) / 2
    rays = rays.astype(np.float32)
    rays.setflags(write=False)
    valid.setflags(write=False)
    return rays, valid


def _pose_numpy(T: Any) -> tuple[np.ndarray, np.ndarray]:
    """(R (3, 3), t (3,)) float64 of a Transform3D or a (4, 4) matrix."""
    if isinstance(T, Transform3D):
        if T.R.dim() != 2:
            raise ValueError(f"render: one pose at a time, got a batch of shape {tuple(T.shape)}")
        return T.R.detach().cpu().double().numpy(), T.t.detach().cpu().double().numpy()
    M = np.asarray(T, np.float64)
    if M.shape != (4, 4):
        raise ValueError(f"render: T_world_cam must be a Transform3D or a (4, 4) matrix, got shape {M.shape}")
    return M[:3, :3], M[:3, 3]


# -- public renderers -----------------------------------------------------------------------------
def render_view(world: "World", camera: Camera, T_world_cam: Any, appearance: Appearance | None = None) -> RenderOutput:
    """Render one camera at pose `T_world_cam` (camera to world-local, OpenCV camera frame).

    appearance: sun, season, exposure, sky and the run's occluders (None: a default summer day)."""
    app = DEFAULT_APPEARANCE if appearance is None else appearance
    rays_cam, valid = camera_rays(camera)
    h, w = valid.shape
    R, t = _pose_numpy(T_world_cam)
    d_cam = rays_cam.reshape(-1, 3)
    sel = valid.reshape(-1)
    full = bool(sel.all())  # pinhole: every pixel has a ray
    if not full:
        d_cam = d_cam[sel]
    dirs = d_cam @ R.T.astype(np.float32)
    origins = np.broadcast_to(t.astype(np.float32), dirs.shape)
    rgb_lin, dist, lab = trace(world, app, origins, dirs, pixel_rad=1.0 / float(camera.to_tensor()[2]))
    if app.vignetting > 0:
        r2 = _radius2(h, w).reshape(-1)
        rgb_lin *= (1 - app.vignetting * (r2 if full else r2[sel]))[:, None]
    rgb, depth = tonemap(rgb_lin, app), dist * d_cam[:, 2]  # distance along the unit ray -> z-depth
    if app.sensor_noise > 0:
        rgb = _add_noise(rgb, app, R, t)
    if not full:
        rgb, depth, lab = _scatter(sel, rgb, 0), _scatter(sel, depth, np.inf), _scatter(sel, lab, VOID)
    return RenderOutput(rgb.reshape(h, w, 3), depth.reshape(h, w), lab.reshape(h, w))


@lru_cache(maxsize=16)
def _radius2(h: int, w: int) -> np.ndarray:
    """Squared distance of pixel centres from the image centre, 1 at the corners: (h, w) float32."""
    jj, ii = np.meshgrid((np.arange(w) + 0.5) / w - 0.5, (np.arange(h) + 0.5) / h - 0.5)
    return ((jj**2 + ii**2) / 0.5).astype(np.float32)


_NOISE_LEN = 1 << 20


@lru_cache(maxsize=8)
def _noise_tile(seed: int) -> np.ndarray:
    """(2^20,) float16 standard-normal samples of an appearance seed."""
    return np.random.default_rng([int(seed), 0x5E05]).standard_normal(_NOISE_LEN).astype(np.float16)


def _add_noise(rgb: np.ndarray, app: Appearance, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """rgb (N, 3) uint8 plus Gaussian sensor noise: a window of the seed's noise tile at an offset
    hashed from the pose, so that a view always gets the same noise (deterministic renders)."""
    n = rgb.size
    tile = _noise_tile(app.seed)
    reps = -(-n // (_NOISE_LEN // 2))  # large images: several windows
    off = zlib.crc32(np.concatenate([R.ravel(), t.ravel()]).astype(np.float64).tobytes()) % (_NOISE_LEN // 2)
    noise = np.concatenate([tile[off:off + _NOISE_LEN // 2]] * reps)[:n].reshape(rgb.shape)
    return np.clip(rgb + app.sensor_noise * noise.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)  # rounded


def _scatter(mask: np.ndarray, values: np.ndarray, fill) -> np.ndarray:
    """values (M, ...) at the True entries of mask (N,), `fill` elsewhere: (N, ...)."""
    out = np.full((len(mask),) + values.shape[1:], fill, values.dtype)
    out[mask] = values
    return out


def render_orthophoto(
    world: "World", bounds_local: tuple[float, float, float, float], resolution_m: float,
    appearance: Appearance | None = None, progress: bool = False, max_rays: int = 1 << 20,
    supersample: int | None = None,
) -> np.ndarray:
    """Top-down orthographic image (H, W, 3) uint8 of `bounds_local` (xmin, ymin, xmax, ymax, local
    metres), north-up: row 0 is the north edge, pixel (i, j) is centred at
    (xmin + (j + 0.5) res, ymax - (i + 0.5) res). H, W = round(extent / res). Shaded, with shadows.

    supersample: s x s rays per pixel averaged in linear light (area sampling, as a camera does;
    no aliased zebra stripes at coarse resolutions). None: round(res / 0.2 m), between 1 and 4."""
    app = DEFAULT_APPEARANCE if appearance is None else appearance
    xmin, ymin, xmax, ymax = (float(b) for b in bounds_local)
    if not (resolution_m > 0 and xmax > xmin and ymax > ymin):
        raise ValueError(f"render_orthophoto: need resolution > 0 and non-empty bounds, got {bounds_local}, {resolution_m}")
    ss = int(np.clip(round(resolution_m / 0.2), 1, 4)) if supersample is None else int(supersample)
    if ss < 1:
        raise ValueError(f"render_orthophoto: supersample must be >= 1, got {supersample}")
    from neuralmaps.geo.region import RasterGrid

    grid = RasterGrid.from_bounds((xmin, ymin, xmax, ymax), resolution_m)
    h, w = grid.shape
    top = float(world.vertices[:, 2].max()) + 5.0 if len(world.vertices) else 10.0
    if app.occluders is not None and len(app.occluders.vertices):
        top = max(top, float(app.occluders.vertices[:, 2].max()) + 5.0)
    out = np.zeros((h, w, 3), np.uint8)
    sub = (np.arange(ss) + 0.5) / ss  # sample offsets inside a pixel
    x = grid.pixel_to_xy(0, (np.arange(w)[:, None] + sub[None]).ravel())[0].astype(np.float32)  # (w * ss,)
    rows = max(1, max_rays // (w * ss * ss))
    for r0 in tqdm(range(0, h, rows), desc="orthophoto", disable=not progress, leave=False):
        r1 = min(h, r0 + rows)
        y = grid.pixel_to_xy((np.arange(r0, r1)[:, None] + sub[None]).ravel(), 0)[1].astype(np.float32)
        xx, yy = np.meshgrid(x, y)
        origins = np.stack([xx.ravel(), yy.ravel(), np.full(xx.size, top, np.float32)], -1)
        dirs = np.broadcast_to(np.array((0, 0, -1), np.float32), origins.shape)
        rgb_lin, _, _ = trace(world, app, origins, dirs, pixel_m=resolution_m / ss)
        rgb_lin = rgb_lin.reshape(r1 - r0, ss, w, ss, 3).mean(axis=(1, 3))
        out[r0:r1] = tonemap(rgb_lin, app)
    return out


# -- the core: trace and shade rays ------------------------------------------------------------------
def trace(world: "World", app: Appearance, origins: np.ndarray, dirs: np.ndarray, pixel_rad: float = 0.0,
          pixel_m: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shade rays (N, 3) (unit dirs, world-local metres): linear rgb (N, 3) float32, hit distance
    along the ray (N,) float32 (inf: sky) and labels (N,) uint8.

    pixel_rad / pixel_m: a ray's footprint grows by pixel_rad per metre of distance from pixel_m;
    fine wall and roof lines are box-filtered over it (no moire of courses and seams at a distance)."""
    n = len(origins)
    origins = np.ascontiguousarray(origins, np.float32)
    dirs = np.ascontiguousarray(dirs, np.float32)
    t_mesh, f_mesh = world.scene.first_hit(origins, dirs)
    occ = app.occluders if app.occluders is not None and len(app.occluders.faces) else None
    t_occ, f_occ = np.full(n, np.inf, np.float32), np.full(n, -1, np.int32)
    if occ is not None:
        # Occluders stand below z_top: a ray starting above it and going up cannot reach them.
        cand = (origins[:, 2] <= occ.z_top) | (dirs[:, 2] < 0)
        vertical = dirs[:, 2] < -0.999999  # orthophoto rays: only over the occluders' footprint
        if vertical.any():
            cand[vertical] = occ.near(origins[vertical, :2])
        cand = np.flatnonzero(cand)
        t_occ[cand], f_occ[cand] = occ.scene.first_hit(origins[cand], dirs[cand])
    dz = dirs[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_gnd = np.where((dz < -1e-7) & (origins[:, 2] > 0), -origins[:, 2] / dz, np.inf).astype(np.float32)
    t = np.minimum(np.minimum(t_mesh, t_occ), t_gnd)
    kind = np.full(n, _HIT_SKY, np.int8)
    hit = np.isfinite(t)
    kind[hit & (t == t_gnd)] = _HIT_GROUND
    kind[hit & (t == t_occ)] = _HIT_OCC
    kind[hit & (t == t_mesh)] = _HIT_MESH

    albedo = np.zeros((n, 3), np.float32)
    normal = np.zeros((n, 3), np.float32)
    labels = np.full(n, VOID, np.uint8)
    p = origins + dirs * np.where(hit, t, 0)[:, None]

    m = np.flatnonzero(kind == _HIT_MESH)
    if len(m):
        fi = f_mesh[m]
        normal[m] = world.face_normals[fi]
        labels[m] = world.face_class[fi]
        def foot(k: np.ndarray, m=m) -> np.ndarray:  # footprints (metres) of mesh hits k (indices into m)
            mk = m[k]
            return (pixel_m + pixel_rad * t[mk]) / np.maximum(np.abs(np.sum(normal[mk] * dirs[mk], axis=1)), 0.25)

        albedo[m] = _mesh_albedo(world, app, fi, p[m], normal[m], foot)
    o = np.flatnonzero(kind == _HIT_OCC)
    if len(o):
        fi = f_occ[o]
        normal[o] = occ.face_normals[fi]
        albedo[o] = occ.colors[fi]
    g = np.flatnonzero(kind == _HIT_GROUND)
    if len(g):
        mat, lab = world.ground_lookup(p[g, 0], p[g, 1])
        labels[g] = lab
        normal[g] = (0, 0, 1)
        tex = 1 + 0.15 * world.texture.sample(p[g, 0], p[g, 1])
        albedo[g] = app.ground_albedo()[mat] * tex[:, None]

    rgb = np.zeros((n, 3), np.float32)
    s = np.flatnonzero(kind != _HIT_SKY)
    if len(s):
        rgb[s] = _shade(world, app, occ, p[s], normal[s], dirs[s], albedo[s])
    k = np.flatnonzero(kind == _HIT_SKY)
    if len(k):
        rgb[k] = sky_color(app, dirs[k])
    return rgb, np.where(hit, t, np.inf).astype(np.float32), labels


def _shade(world, app: Appearance, occ, p, normal, dirs, albedo) -> np.ndarray:
    """Lambert sun (with one shadow ray per lit point) + ambient; all (M, 3) float32."""
    facing = np.sign(np.sum(normal * dirs, axis=1, keepdims=True))  # face the viewer (fences, back faces)
    normal = normal * -np.where(facing == 0, -1, facing)
    L = app.sun_direction()
    lam = np.clip(normal @ L, 0, 1)
    lit = np.flatnonzero(lam > 0)
    if len(lit):
        so = p[lit] + normal[lit] * SHADOW_BIAS_M
        sd = np.broadcast_to(L, so.shape)
        blocked = world.scene.occluded(so, sd)
        if occ is not None:  # the sun is above the horizon: only low points can be shadowed by occluders
            rest = np.flatnonzero(~blocked & (so[:, 2] <= occ.z_top))
            # Only points within the shadow length of an occluder, toward the sun.
            reach = max(occ.z_top - float(so[rest, 2].min()), 0.0) / max(float(L[2]), 1e-3) if len(rest) else 0.0
            horiz = L[:2] / max(float(np.linalg.norm(L[:2])), 1e-9)
            rest = rest[occ.near(so[rest, :2], horiz, reach * float(np.linalg.norm(L[:2])))]
            blocked[rest] = occ.scene.occluded(so[rest], sd[rest])
        lam[lit[blocked]] = 0
    sky_amb = 0.5 * (np.asarray(app.sky_zenith, np.float32) + np.asarray(app.sky_horizon, np.float32))
    # Up-facing surfaces see more sky than walls.
    amb = app.ambient * (0.75 + 0.25 * normal[:, 2:3]) * (sky_amb / max(float(sky_amb.mean()), 1e-3))[None]
    light = amb + (app.sun_strength * 1.4 * lam)[:, None] * _SUN_COLOR[None]
    return albedo * light


def _line_cover(x: np.ndarray, width: np.ndarray, foot: np.ndarray) -> np.ndarray:
    """Fraction of a footprint `foot` wide centred at `x` (all in periods) covered by lines of
    `width` (fraction of the period) starting at every integer: the box-filtered pulse train
    (exactly 0 or 1 as the footprint shrinks to nothing, the duty `width` as it spans periods)."""
    def integral(y):
        k = np.floor(y)
        return k * width + np.minimum(y - k, width)
    f = np.maximum(foot, 1e-6)
    return (integral(x + f / 2) - integral(x - f / 2)) / f


def _mesh_albedo(world: "World", app: Appearance, fi: np.ndarray, p: np.ndarray, normal: np.ndarray,
                 foot: Any = None) -> np.ndarray:
    """Albedo (M, 3) of mesh hits. foot: hit indices (K,) -> their footprints in metres (K,),
    asked only for the hits with fine lines (None: points, no filtering)."""
    if foot is None:
        foot = lambda k: np.zeros(len(k), np.float32)  # noqa: E731
    mat = world.face_mat[fi]
    out = world.face_color[fi].copy()
    st = world.styles
    f = np.flatnonzero(mat == FaceMat.FACADE)
    if len(f):
        ff = fi[f]
        b = world.face_owner[ff]
        sty = world.facade_table[b]  # (n, 15): World.FACADE_COLUMNS
        tan = world.face_tangents[ff]
        u = p[f, 0] * tan[:, 0] + p[f, 1] * tan[:, 1]  # metres along the wall
        v = p[f, 2]
        gu, gv = u / sty[:, 1], v / sty[:, 0]
        level = np.floor(gv)
        fu, fv = gu - np.floor(gu), gv - level
        du = np.abs(fu - 0.5)
        win = (du < sty[:, 2]) & (fv > sty[:, 3]) & (fv < sty[:, 4]) & (level >= 1) & (v < sty[:, 5])
        win |= (sty[:, 6] > 0) & (level == 0) & (du < 0.42) & (fv > 0.08) & (fv < 0.8)  # shop windows
        # Wall texture: noise at the style's scale, storey lines, and the style's grid lines
        # (courses, boards, panel joints, corrugation); float64 as the shading always was.
        shade = (1 + sty[:, 12] * world.texture.lookup(u, v, scale=sty[:, 13])) \
            * np.where(fv < 0.035, sty[:, 14].astype(np.float64), 1.0)
        for pos, col in ((u, 7), (v, 9)):  # lines along / up the wall, box-filtered: no moire at a distance
            k = np.flatnonzero(sty[:, col + 1] > 0)
            if len(k):
                sk = sty[k]
                cover = _line_cover(pos[k] / sk[:, col], sk[:, col + 1], foot(f[k]) / sk[:, col])
                shade[k] *= 1.0 - (1.0 - sk[:, 11].astype(np.float64)) * cover
        col = st.facade[b] * shade[:, None]
        col[win] = st.window[b[win]]
        out[f] = col
    r = np.flatnonzero(mat == FaceMat.ROOF)
    if len(r):
        b = world.face_owner[fi[r]]
        a = st.roof_dir[b]
        s = p[r, 0] * np.cos(a) + p[r, 1] * np.sin(a)
        seam = (np.mod(s / st.roof_seam_m[b], 1.0) < st.roof_seam_frac[b]).astype(np.float64)
        styled = np.flatnonzero((st.style[b] >= 0) & (st.roof_seam_frac[b] > 0))  # the original palette: unfiltered
        if len(styled):
            bs = b[styled]
            seam[styled] = _line_cover(s[styled] / st.roof_seam_m[bs], st.roof_seam_frac[bs],
                                       foot(r[styled]) / st.roof_seam_m[bs])
        tex = 1 + st.roof_tex[b] * world.texture.sample(p[r, 1], p[r, 0])
        out[r] = st.roof[b] * (tex * (1.0 - (1.0 - st.roof_seam_dark[b].astype(np.float64)) * seam))[:, None]
        if app.snow_cover > 0:  # flat roofs keep snow longer than streets
            k = min(1.0, 1.4 * app.snow_cover)
            out[r] = out[r] * (1 - k) + app.snow_albedo()[None] * k * tex[:, None]
    c = np.flatnonzero(mat == FaceMat.FOLIAGE)
    if len(c):
        tex = 1 + 0.3 * world.texture.lookup(p[c, 0] + p[c, 2], p[c, 1] - p[c, 2], scale=0.4)
        out[c] = app.foliage()[None] * out[c] * tex[:, None]
    return np.clip(out, 0, 1)


def sky_color(app: Appearance, dirs: np.ndarray) -> np.ndarray:
    """Linear sky radiance (N, 3) for unit directions (N, 3): gradient + clouds + sun glow."""
    el = np.clip(dirs[:, 2], 0, 1)
    zen, hor = np.asarray(app.sky_zenith, np.float32), np.asarray(app.sky_horizon, np.float32)
    col = hor[None] + (zen - hor)[None] * np.sqrt(el)[:, None]
    # Clouds on a plane 1 km up, textured by value noise in the run's seed.
    k = 1000.0 / np.maximum(el, 0.03)
    cx, cy = dirs[:, 0] * k, dirs[:, 1] * k
    c = 0.6 * value_noise(cx, cy, 700.0, app.seed + 101) + 0.4 * value_noise(cx, cy, 180.0, app.seed + 103)
    cover = np.clip((c + 1) / 2 - (1 - app.cloud_cover), 0, 1) / max(app.cloud_cover, 1e-3)
    cover = np.clip(cover * 2.0, 0, 1) * np.clip(el * 8, 0, 1)  # fade out at the horizon
    col = col * (1 - cover[:, None]) + _CLOUD_COLOR[None] * cover[:, None] * (0.7 + 0.3 * app.sun_strength)
    glow = np.exp((dirs @ app.sun_direction() - 1) * 60.0) * app.sun_strength
    return col + glow[:, None] * 0.5 * _SUN_COLOR[None]


_GAMMA_LUT_SIZE = 4096
_GAMMA_LUT = ((np.arange(_GAMMA_LUT_SIZE) / (_GAMMA_LUT_SIZE - 1)) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)


def tonemap(rgb_linear: np.ndarray, app: Appearance) -> np.ndarray:
    """Linear radiance (..., 3) -> display uint8 (..., 3): exposure, white balance, gamma 2.2
    (through a 4096-entry table: the power function was a tenth of the render time)."""
    gain = (app.exposure * (_GAMMA_LUT_SIZE - 1)) * np.asarray(app.white_balance, np.float32)
    idx = np.clip(rgb_linear * gain, 0, _GAMMA_LUT_SIZE - 1).astype(np.int32)
    return _GAMMA_LUT[idx]


def camera_pose(x: float, y: float, z: float, yaw: float, pitch: float = 0.0) -> Transform3D:
    """T_world_cam (float64) of a level OpenCV camera at (x, y, z) local metres looking along `yaw`
    (radians counter-clockwise from east), tilted up by `pitch` radians (geometry.bev_pose_to_camera)."""
    T_bev = Transform2D(torch.tensor(float(yaw), dtype=torch.float64), torch.tensor([x, y], dtype=torch.float64))
    return bev_pose_to_camera(T_bev, float(z), float(pitch))
