"""`CaptureSet`: street-level captures on disk, one format for real photos and for the digital twin.

A capture set is a directory with `captures.parquet` (a GeoParquet index, one row per image) and the
images it names (paths relative to the directory, e.g. `images/000123.jpg`).

Columns (`SCHEMA`): `image` (path), `run_id`, `time` (UTC), `camera_model` ("pinhole" | "fisheye"),
intrinsics `width`, `height`, `fx`, `fy`, `cx`, `cy`, `k1`, `k2` (pixels; pixel centres are
half-integers), the camera position `x`, `y` in the set's CRS (metres) and `z` (metres above the
ground), the rotation `qw`, `qx`, `qy`, `qz` (unit quaternion of R_world_cam: OpenCV camera axes,
x right, y down, z forward, into the world frame x east, y north, z up) and the same rotation as
`heading_deg` (optical axis, degrees clockwise from north), `pitch_deg` (up positive), `roll_deg`
(clockwise as seen from behind the camera). The geometry is the camera position (a Point).
Optional: `camera_name`, `vehicle`.

`T_world_cam` built from these is camera-to-world in the CRS (world frame of the docs).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from ..storage import atomic_path

__all__ = ["CaptureSet", "SCHEMA", "rotation_from_hpr", "hpr_from_rotation"]

INDEX_NAME = "captures.parquet"
QUERIES_NAME = "queries.parquet"
CAMERA_MODELS = ("pinhole", "fisheye")
SCHEMA = (
    "image", "run_id", "time", "camera_model", "width", "height", "fx", "fy", "cx", "cy", "k1", "k2",
    "x", "y", "z", "qw", "qx", "qy", "qz", "heading_deg", "pitch_deg", "roll_deg",
)
# Column aliases a mapping team's table may use -> our names.
_ALIASES = {
    "latitude": "lat", "longitude": "lon", "lng": "lon", "altitude": "z", "alt": "z", "height_m": "z",
    "heading": "heading_deg", "yaw_deg": "heading_deg", "pitch": "pitch_deg", "roll": "roll_deg",
    "path": "image", "filename": "image", "image_path": "image", "name": "image", "run": "run_id",
    "timestamp": "time", "model": "camera_model", "w": "width", "h": "height",
}


# -- rotations ----------------------------------------------------------------------------------
def rotation_from_hpr(heading_deg, pitch_deg, roll_deg) -> np.ndarray:
    """R_world_cam (..., 3, 3) of an OpenCV camera whose optical axis has compass `heading_deg`
    (clockwise from north), tilted up by `pitch_deg`, rolled clockwise by `roll_deg` (seen from
    behind). Heading 0, pitch 0, roll 0 looks north with image-down = world-down."""
    h, p, r = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (heading_deg, pitch_deg, roll_deg))
    h, p, r = np.broadcast_arrays(h, p, r)
    fwd = np.stack([np.sin(h) * np.cos(p), np.cos(h) * np.cos(p), np.sin(p)], -1)  # camera z
    right0 = np.stack([np.cos(h), -np.sin(h), np.zeros_like(h)], -1)  # level right
    down0 = np.cross(fwd, right0)  # camera y = z x x
    # Roll: rotate the image axes about the optical axis (clockwise as seen from behind).
    c, s = np.cos(r)[..., None], np.sin(r)[..., None]
    right = c * right0 + s * down0
    down = -s * right0 + c * down0
    return np.stack([right, down, fwd], -1)


def hpr_from_rotation(R: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `rotation_from_hpr`: (heading, pitch, roll) degrees of R_world_cam (..., 3, 3)."""
    R = np.asarray(R, dtype=np.float64)
    fwd = R[..., :, 2]
    heading = np.rad2deg(np.arctan2(fwd[..., 0], fwd[..., 1])) % 360.0
    pitch = np.rad2deg(np.arcsin(np.clip(fwd[..., 2], -1.0, 1.0)))
    h = np.deg2rad(heading)
    right0 = np.stack([np.cos(h), -np.sin(h), np.zeros_like(h)], -1)
    down0 = np.cross(fwd, right0)
    right = R[..., :, 0]
    roll = np.rad2deg(np.arctan2((right * down0).sum(-1), (right * right0).sum(-1)))
    return heading, pitch, roll


def _quat_from_matrix(R: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotation matrices -> (N, 4) unit quaternions (w, x, y, z), w >= 0."""
    from scipy.spatial.transform import Rotation

    q = Rotation.from_matrix(R.reshape(-1, 3, 3)).as_quat()  # x, y, z, w
    q = np.concatenate([q[:, 3:], q[:, :3]], 1)
    return q * np.where(q[:, :1] < 0, -1.0, 1.0)


def _matrix_from_quat(q: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    q = np.asarray(q, dtype=np.float64).reshape(-1, 4)
    n = np.linalg.norm(q, axis=1)
    if not np.all(np.isfinite(n)) or np.any(np.abs(n - 1.0) > 1e-3):
        raise ValueError("rotation quaternions (qw, qx, qy, qz) must be finite unit quaternions")
    return Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- the set ------------------------------------------------------------------------------------
class CaptureSet:
    """Images with camera models and poses, indexed by a GeoDataFrame (one row per image).

    `frame`: a geopandas GeoDataFrame with the `SCHEMA` columns, Point geometry at the camera
    position, a projected CRS in metres. `root`: the directory relative to which `image` paths are
    resolved. Build one with `CaptureSet.open(dir)`, `CaptureSet.from_table(table, image_root)` or
    `CaptureSet.from_runs(...)` (the digital twin).
    """

    def __init__(self, frame: Any, root: str | os.PathLike):
        import geopandas as gpd

        if not isinstance(frame, gpd.GeoDataFrame):
            raise ValueError(f"CaptureSet needs a GeoDataFrame, got {type(frame).__name__}")
        missing = [c for c in SCHEMA if c not in frame.columns]
        if missing:
            raise ValueError(f"capture index lacks columns {missing}")
        if frame.crs is None or frame.crs.is_geographic:
            raise ValueError(f"capture index needs a projected CRS in metres, got {frame.crs}")
        self.frame = frame.reset_index(drop=True)
        self.root = Path(root)

    # -- io --------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, name: str = INDEX_NAME) -> "CaptureSet":
        """Read `path/captures.parquet` (or a .parquet file; images relative to its directory)."""
        import geopandas as gpd

        path = Path(path)
        file = path / name if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"capture index not found: {file} (expected a directory with {name})")
        try:
            frame = gpd.read_parquet(file)
        except Exception as e:
            raise ValueError(f"{file}: not a readable GeoParquet capture index ({type(e).__name__}: {e})") from None
        try:
            return cls(frame, file.parent)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    def write(self, path: str | os.PathLike, name: str = INDEX_NAME) -> Path:
        """Write the index as GeoParquet to `path/name` (atomic: temp file + rename)."""
        path = Path(path)
        file = path / name if path.suffix != ".parquet" else path
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp:
            self.frame.to_parquet(tmp, index=False)
        return file

    @classmethod
    def from_table(
        cls,
        table: str | os.PathLike | pd.DataFrame,
        image_root: str | os.PathLike,
        crs: Any = None,
        *,
        check_images: bool = True,
    ) -> "CaptureSet":
        """Captures from a mapping team's table (CSV or Parquet path, or a DataFrame).

        Positions: `lat`, `lon` (WGS84 degrees; reprojected to the UTM zone of their centre), or
        `x`, `y` in `crs` (or a `crs` column). Height: `z` / `altitude` / `height_m`, metres above
        the ground. Rotation: `heading_deg`, `pitch_deg`, `roll_deg` (see the module doc), or a
        COLMAP-style world-to-camera pose `qw, qx, qy, qz, tx, ty, tz` (then the position is the
        camera centre -R^T t, in `crs`). Intrinsics: `width`, `height`, `fx` (or `hfov_deg`),
        optional `fy` (= fx), `cx`, `cy` (= centre), `k1`, `k2` (= 0), `camera_model` (pinhole).
        Optional: `run_id` (default "run0"), `time`, `camera_name`, `vehicle`.
        Raises ValueError naming the problem (missing columns, unknown CRS, missing image files,
        images whose size disagrees with their camera).
        """
        import geopandas as gpd
        import pyproj

        from ..geo import utm_crs_for
        from ..geo.crs import lonlat_to_crs

        name = "<DataFrame>"
        if not isinstance(table, pd.DataFrame):
            p = Path(table)
            name = str(p)
            if not p.is_file():
                raise FileNotFoundError(f"capture table not found: {p}")
            try:
                df = pd.read_parquet(p) if p.suffix.lower() in (".parquet", ".pq") else pd.read_csv(p)
            except Exception as e:
                raise ValueError(f"{p}: not a readable CSV/Parquet table ({type(e).__name__}: {e})") from None
        else:
            df = table
        df = pd.DataFrame(df).rename(columns=lambda c: _ALIASES.get(str(c).strip().lower(), str(c).strip().lower()))
        n = len(df)
        if n == 0:
            raise ValueError(f"{name}: the capture table has no rows")

        def need(*cols: str, why: str) -> None:
            miss = [c for c in cols if c not in df.columns]
            if miss:
                raise ValueError(f"{name}: missing column(s) {miss} ({why}); columns are {sorted(df.columns)}")

        need("image", why="image path per row")
        need("width", "height", why="image size of the camera")
        colmap = all(c in df.columns for c in ("qw", "qx", "qy", "qz", "tx", "ty", "tz"))
        # CRS and positions.
        if crs is None and "crs" in df.columns:
            crs = str(df["crs"].iloc[0])
        if colmap:
            if crs is None:
                raise ValueError(f"{name}: a COLMAP-style pose table needs the CRS of its frame (crs=...)")
            R_cw = _matrix_from_quat(df[["qw", "qx", "qy", "qz"]].to_numpy(float))
            t = df[["tx", "ty", "tz"]].to_numpy(float)
            R = R_cw.transpose(0, 2, 1)
            pos = -np.einsum("nij,nj->ni", R, t)
            x, y, z = pos.T
        elif "lat" in df.columns and "lon" in df.columns:
            lon, lat = df["lon"].to_numpy(float), df["lat"].to_numpy(float)
            if not (np.all(np.abs(lat) <= 90) and np.all(np.abs(lon) <= 180)):
                raise ValueError(f"{name}: lat/lon out of range (expected WGS84 degrees)")
            crs = utm_crs_for(float(np.mean(lon)), float(np.mean(lat)))
            x, y = lonlat_to_crs(lon, lat, crs)
            need("z", why="camera height above ground (altitude / height_m)")
            z = df["z"].to_numpy(float)
            R = None
        else:
            need("x", "y", why="camera position: lat/lon, x/y with a CRS, or a COLMAP pose")
            if crs is None:
                raise ValueError(f"{name}: x/y positions need a CRS (crs=... or a 'crs' column)")
            x, y = df["x"].to_numpy(float), df["y"].to_numpy(float)
            need("z", why="camera height above ground (altitude / height_m)")
            z = df["z"].to_numpy(float)
            R = None
        try:
            crs = pyproj.CRS.from_user_input(crs)
        except Exception as e:
            raise ValueError(f"{name}: unknown CRS {crs!r} ({e})") from None
        if crs.is_geographic:
            raise ValueError(f"{name}: x/y need a projected CRS in metres, got geographic {crs.name}; use lat/lon columns")
        if R is None:
            if all(c in df.columns for c in ("qw", "qx", "qy", "qz")):
                R = _matrix_from_quat(df[["qw", "qx", "qy", "qz"]].to_numpy(float))
            else:
                need("heading_deg", why="camera orientation (heading/pitch/roll or a quaternion)")
                pitch = df["pitch_deg"].to_numpy(float) if "pitch_deg" in df.columns else np.zeros(n)
                roll = df["roll_deg"].to_numpy(float) if "roll_deg" in df.columns else np.zeros(n)
                R = rotation_from_hpr(df["heading_deg"].to_numpy(float), pitch, roll)
        # Intrinsics.
        w, h = df["width"].to_numpy(float), df["height"].to_numpy(float)
        if "fx" in df.columns:
            fx = df["fx"].to_numpy(float)
        elif "hfov_deg" in df.columns:
            fx = 0.5 * w / np.tan(np.deg2rad(df["hfov_deg"].to_numpy(float)) / 2)
        else:
            raise ValueError(f"{name}: missing column 'fx' or 'hfov_deg' (focal length)")
        cols = {
            "fy": df["fy"].to_numpy(float) if "fy" in df.columns else fx,
            "cx": df["cx"].to_numpy(float) if "cx" in df.columns else w / 2,
            "cy": df["cy"].to_numpy(float) if "cy" in df.columns else h / 2,
            "k1": df["k1"].to_numpy(float) if "k1" in df.columns else np.zeros(n),
            "k2": df["k2"].to_numpy(float) if "k2" in df.columns else np.zeros(n),
        }
        models = df["camera_model"].astype(str).str.lower() if "camera_model" in df.columns else pd.Series(["pinhole"] * n)
        bad = sorted(set(models) - set(CAMERA_MODELS))
        if bad:
            raise ValueError(f"{name}: unknown camera model(s) {bad}; expected one of {CAMERA_MODELS}")
        times = pd.to_datetime(df["time"], utc=True) if "time" in df.columns else pd.Series([pd.NaT] * n, dtype="datetime64[ns, UTC]")
        frame = _frame(
            image=df["image"].astype(str).to_numpy(), run_id=df["run_id"].astype(str).to_numpy() if "run_id" in df.columns else np.full(n, "run0"),
            time=times.to_numpy(), camera_model=models.to_numpy(), width=w, height=h, fx=fx, **cols,
            x=np.asarray(x, float), y=np.asarray(y, float), z=np.asarray(z, float), R=R, crs=crs,
            extra={c: df[c].astype(str).to_numpy() for c in ("camera_name", "vehicle") if c in df.columns},
        )
        bad_rows = ~np.isfinite(frame[["x", "y", "z", "fx", "fy", "cx", "cy", "width", "height"]].to_numpy(float)).all(1)
        if bad_rows.any():
            raise ValueError(f"{name}: rows {np.flatnonzero(bad_rows)[:10].tolist()} have non-finite poses or intrinsics")
        out = cls(frame, image_root)
        if check_images:
            out.check_images(name)
        return out

    @classmethod
    def from_poses(
        cls, image: Sequence[str], run_id: Sequence[str], time: Any, cameras: np.ndarray, camera_model: Sequence[str],
        T_world_cam: np.ndarray, crs: Any, root: str | os.PathLike, extra: dict[str, Any] | None = None,
    ) -> "CaptureSet":
        """From arrays: cameras (N, 8) `[w, h, fx, fy, cx, cy, k1, k2]`, T_world_cam (N, 4, 4) in `crs`
        (z = height above ground)."""
        import pyproj

        cam = np.asarray(cameras, np.float64).reshape(-1, 8)
        T = np.asarray(T_world_cam, np.float64).reshape(-1, 4, 4)
        frame = _frame(image=np.asarray(image, str), run_id=np.asarray(run_id, str), time=np.asarray(time),
                       camera_model=np.asarray(camera_model, str), width=cam[:, 0], height=cam[:, 1], fx=cam[:, 2],
                       fy=cam[:, 3], cx=cam[:, 4], cy=cam[:, 5], k1=cam[:, 6], k2=cam[:, 7], x=T[:, 0, 3],
                       y=T[:, 1, 3], z=T[:, 2, 3], R=T[:, :3, :3], crs=pyproj.CRS.from_user_input(crs), extra=extra or {})
        return cls(frame, root)

    # -- checks ----------------------------------------------------------------------------------
    def paths(self) -> list[Path]:
        """Absolute image paths."""
        return [p if p.is_absolute() else self.root / p for p in map(Path, self.frame["image"])]

    def check_images(self, what: str = "capture set", read_sizes: bool = True) -> None:
        """Every image exists, and its pixel size equals its camera's (reads headers only)."""
        from PIL import Image

        paths = self.paths()
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{what}: {len(missing)} image file(s) missing under {self.root}, e.g. {missing[:3]}")
        if not read_sizes:
            return
        bad = []
        for p, w, h in zip(paths, self.frame["width"], self.frame["height"]):
            try:
                with Image.open(p) as im:
                    size = im.size
            except Exception as e:
                raise ValueError(f"{what}: {p} is not a readable image ({type(e).__name__}: {e})") from None
            if size != (int(w), int(h)):
                bad.append(f"{p.name}: {size[0]}x{size[1]} px, camera {int(w)}x{int(h)}")
        if bad:
            raise ValueError(f"{what}: {len(bad)} image(s) whose size disagrees with their camera, e.g. {bad[:3]}")

    # -- access ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        return (f"CaptureSet({len(self)} images, {self.frame['run_id'].nunique()} runs, {self.crs.name}, "
                f"root={str(self.root)!r})")

    @property
    def crs(self):
        return self.frame.crs

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the camera positions in the CRS."""
        return tuple(float(v) for v in self.frame.total_bounds)

    def to_crs(self, crs: Any) -> "CaptureSet":
        """The same captures in another projected CRS (positions and rotations; grid convergence
        between the two CRSs is neglected for rotations, fine within one UTM zone)."""
        import pyproj

        crs = pyproj.CRS.from_user_input(crs)
        if crs == self.crs:
            return self
        from ..geo.crs import transformer

        x, y = transformer(self.crs, crs).transform(self.frame["x"].to_numpy(), self.frame["y"].to_numpy())
        f = self.frame.copy()
        f["x"], f["y"] = x, y
        import geopandas as gpd

        f = gpd.GeoDataFrame(f.drop(columns="geometry"), geometry=gpd.points_from_xy(x, y), crs=crs)
        return CaptureSet(f, self.root)

    def select(self, rows: np.ndarray) -> "CaptureSet":
        return CaptureSet(self.frame.iloc[np.asarray(rows)].reset_index(drop=True), self.root)

    def within(self, bounds: Sequence[float]) -> np.ndarray:
        """Row indices (sorted) of cameras inside (xmin, ymin, xmax, ymax), via the spatial index."""
        from shapely.geometry import box

        return np.sort(self.frame.sindex.query(box(*bounds), predicate="intersects"))

    def T_world_cam(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(N, 4, 4) float64 camera-to-world poses in the CRS (z = height above ground)."""
        f = self.frame if rows is None else self.frame.iloc[rows]
        T = np.tile(np.eye(4), (len(f), 1, 1))
        T[:, :3, :3] = _matrix_from_quat(f[["qw", "qx", "qy", "qz"]].to_numpy(float)) if len(f) else np.zeros((0, 3, 3))
        T[:, 0, 3], T[:, 1, 3], T[:, 2, 3] = f["x"], f["y"], f["z"]
        return T

    def cameras(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(N, 8) float64 intrinsics `[w, h, fx, fy, cx, cy, k1, k2]`."""
        f = self.frame if rows is None else self.frame.iloc[rows]
        return f[["width", "height", "fx", "fy", "cx", "cy", "k1", "k2"]].to_numpy(np.float64)

    def row_keys(self, rows: np.ndarray | None = None) -> list[str]:
        """A stable text key per row (image, pose, camera): what a tile's result depends on."""
        f = self.frame if rows is None else self.frame.iloc[rows]
        cols = ["image", "camera_model", "width", "height", "fx", "fy", "cx", "cy", "k1", "k2", "x", "y", "z",
                "qw", "qx", "qy", "qz"]
        return ["|".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in r) for r in f[cols].itertuples(index=False)]

    def fingerprint(self) -> str:
        """sha256 of all rows' keys (order-independent)."""
        h = hashlib.sha256()
        for k in sorted(self.row_keys()):
            h.update(k.encode())
            h.update(b"\n")
        return h.hexdigest()


def _frame(*, image, run_id, time, camera_model, width, height, fx, fy, cx, cy, k1, k2, x, y, z, R, crs, extra):
    import geopandas as gpd

    q = _quat_from_matrix(np.asarray(R)) if len(image) else np.zeros((0, 4))
    heading, pitch, roll = hpr_from_rotation(np.asarray(R)) if len(image) else (np.zeros(0),) * 3
    df = pd.DataFrame({
        "image": image, "run_id": run_id, "time": pd.to_datetime(time, utc=True), "camera_model": camera_model,
        "width": np.asarray(width, np.int32), "height": np.asarray(height, np.int32),
        "fx": fx, "fy": fy, "cx": cx, "cy": cy, "k1": k1, "k2": k2, "x": x, "y": y, "z": z,
        "qw": q[:, 0], "qx": q[:, 1], "qy": q[:, 2], "qz": q[:, 3],
        "heading_deg": heading, "pitch_deg": pitch, "roll_deg": roll, **extra,
    })
    return gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(df["x"], df["y"]), crs=crs)


def sha256_of(path: str | os.PathLike | None) -> str | None:
    """sha256 of a file, or None."""
    return None if path is None else _sha256_file(Path(path))

