"""Rigid transforms and cameras: batched, device- and dtype-agnostic torch.

Conventions (written here once, used everywhere):
- `T_a_b` maps points of frame b into frame a; `(T_a_b @ T_b_c) == T_a_c`.
- Scene / world frame: x east, y north, z up, metres.
- Camera frame: OpenCV (x right, y down, z forward).
- Query BEV frame: origin at the camera's ground projection, x = camera forward projected on the
  ground, y = left, metres (`camera_pose_to_bev`).
- Pixels: the top-left pixel's centre is (0.5, 0.5); a pinhole with c = (w/2, h/2) is centred.
- Intrinsics tensor (..., 8) = `[w, h, fx, fy, cx, cy, k1, k2]` (pixels).

Every object carries arbitrary leading batch dims `...` (its `.shape`); point tensors carry one
more dim N before the coordinate dim and broadcast against the object's batch dims.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = [
    "Transform2D",
    "Transform3D",
    "Camera",
    "PinholeCamera",
    "FisheyeCamera",
    "camera_from_tensor",
    "camera_pose_to_bev",
    "bev_pose_to_camera",
    "rotation_matrix_2d",
    "axis_angle_to_matrix",
]


def _as_tensor(x: Any, like: Tensor | None = None) -> Tensor:
    """Tensor from x; python numbers/lists take `like`'s dtype and device (or float32)."""
    if isinstance(x, Tensor):
        return x
    if like is not None:
        return torch.as_tensor(x, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(x)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _float_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Cast two tensors to a common floating dtype and device (a CPU scalar follows the other)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    if a.device != b.device:
        if a.dim() == 0 and a.device.type == "cpu":
            a = a.to(b.device)
        elif b.dim() == 0 and b.device.type == "cpu":
            b = b.to(a.device)
        else:
            raise ValueError(f"tensors on different devices: {a.device} and {b.device}")
    return a.to(dtype), b.to(dtype)


def _index_with_tail(idx: Any, tail: int) -> Any:
    """Batch index `idx` extended by `tail` full slices for the trailing data dims."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    return idx + (slice(None),) * tail


def _check_batch(a: Any, b: Any, op: str) -> None:
    """Raise a clear error when two batched objects' shapes do not broadcast."""
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(
            f"{type(a).__name__}.{op}: batch shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast"
        ) from None


def rotation_matrix_2d(angle: Tensor) -> Tensor:
    """Rotation matrices (..., 2, 2) for CCW angles (...,) in radians."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([c, -s, s, c], -1).unflatten(-1, (2, 2))


def axis_angle_to_matrix(axis_angle: Tensor) -> Tensor:
    """Rodrigues: rotation vectors (..., 3) (axis * angle in radians) -> matrices (..., 3, 3).

    Stable at zero angle (first-order expansion there)."""
    theta2 = (axis_angle**2).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta2 < 1e-12
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).unflatten(-1, (3, 3))
    a = torch.where(small, torch.ones_like(theta), torch.sin(theta) / theta)
    b = torch.where(small, 0.5 * torch.ones_like(theta), (1 - torch.cos(theta)) / theta**2)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + a * K + b * (K @ K)


# ------------------------------------------------------------------------------------------------
# Shared plumbing of SE(2) and SE(3)
# ------------------------------------------------------------------------------------------------
class _RigidTransform:
    """What Transform2D and Transform3D share: the action p -> R p + t on points (..., N, dim),
    homogeneous matrices and the tensor plumbing. Subclasses store the tensors named in `_fields`
    (each with `_tails` trailing data dims after the common batch shape) and provide `R`, `t`."""

    dim: int
    _fields: tuple[str, str]
    _tails: tuple[int, int]
    R: Tensor
    t: Tensor

    def _map(self, fn: Any) -> Any:
        return self.__class__(*(fn(getattr(self, f), tail) for f, tail in zip(self._fields, self._tails)))

    @property
    def shape(self) -> torch.Size:
        return self.t.shape[:-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.t.dtype

    @property
    def device(self) -> torch.device:
        return self.t.device

    def matrix(self) -> Tensor:
        """Homogeneous matrices (..., dim+1, dim+1)."""
        d = self.dim
        M = torch.zeros((*self.shape, d + 1, d + 1), dtype=self.dtype, device=self.device)
        M[..., :d, :d] = self.R
        M[..., :d, d] = self.t
        M[..., d, d] = 1
        return M

    def transform(self, p: Tensor) -> Tensor:
        """Points (..., N, dim) -> (..., N, dim)."""
        if p.shape[-1:] != (self.dim,) or p.dim() < 2:
            raise ValueError(
                f"{type(self).__name__}.transform: points must be (..., N, {self.dim}), got {tuple(p.shape)}"
            )
        return p @ self.R.transpose(-1, -2) + self.t[..., None, :]

    def __call__(self, p: Tensor) -> Tensor:
        return self.transform(p)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, type(self)):
            return self.compose(other)
        if isinstance(other, Tensor):
            return self.transform(other)
        return NotImplemented

    def to(self, *args: Any, **kwargs: Any) -> Any:
        return self._map(lambda x, _: x.to(*args, **kwargs))

    def float(self) -> Any:
        return self.to(torch.float32)

    def double(self) -> Any:
        return self.to(torch.float64)

    def detach(self) -> Any:
        return self._map(lambda x, _: x.detach())

    def reshape(self, *shape: int) -> Any:
        return self._map(lambda x, tail: x.reshape(*shape, *x.shape[x.dim() - tail:]))

    def __getitem__(self, idx: Any) -> Any:
        return self._map(lambda x, tail: x[_index_with_tail(idx, tail)])

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError(f"len() of an unbatched {type(self).__name__}")
        return self.shape[0]


# ------------------------------------------------------------------------------------------------
# SE(2)
# ------------------------------------------------------------------------------------------------
class Transform2D(_RigidTransform):
    """Rigid SE(2) transform, stored as `angle` (...,) radians counter-clockwise and `t` (..., 2).

    Applied to a point p: R(angle) p + t. `a @ b` composes so that (a @ b)(p) == a(b(p));
    `a @ points` (a tensor (..., N, 2)) transforms points.
    """

    dim, _fields, _tails = 2, ("angle", "t"), (0, 1)

    def __init__(self, angle: Tensor | float, t: Tensor | Sequence[float]):
        t = _as_tensor(t)
        angle = _as_tensor(angle, like=t)
        if t.shape[-1:] != (2,):
            raise ValueError(f"Transform2D: t must have shape (..., 2), got {tuple(t.shape)}")
        angle, t = _float_pair(angle, t)
        try:
            shape = torch.broadcast_shapes(angle.shape, t.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"Transform2D: angle {tuple(angle.shape)} and t {tuple(t.shape)} do not broadcast"
            ) from None
        self.angle = angle.expand(shape)
        self.t = t.expand(*shape, 2)

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_Rt(cls, R: Tensor, t: Tensor) -> "Transform2D":
        """From rotation matrices (..., 2, 2) and translations (..., 2)."""
        if R.shape[-2:] != (2, 2):
            raise ValueError(f"Transform2D.from_Rt: R must be (..., 2, 2), got {tuple(R.shape)}")
        return cls(torch.atan2(R[..., 1, 0], R[..., 0, 0]), t)

    @classmethod
    def from_degrees(cls, angle_deg: Tensor | float, t: Tensor | Sequence[float]) -> "Transform2D":
        """From a CCW angle in degrees and a translation (..., 2)."""
        t = _as_tensor(t)
        return cls(torch.deg2rad(_as_tensor(angle_deg, like=t)), t)

    @classmethod
    def from_matrix(cls, M: Tensor) -> "Transform2D":
        """From homogeneous matrices (..., 3, 3)."""
        if M.shape[-2:] != (3, 3):
            raise ValueError(f"Transform2D.from_matrix: M must be (..., 3, 3), got {tuple(M.shape)}")
        return cls.from_Rt(M[..., :2, :2], M[..., :2, 2])

    @classmethod
    def identity(
        cls, shape: Sequence[int] = (), dtype: torch.dtype | None = None, device: Any = None
    ) -> "Transform2D":
        return cls(torch.zeros(tuple(shape), dtype=dtype, device=device),
                   torch.zeros((*shape, 2), dtype=dtype, device=device))

    @classmethod
    def stack(cls, transforms: Sequence["Transform2D"], dim: int = 0) -> "Transform2D":
        """Stack transforms of equal batch shape along a new batch dim."""
        if dim < 0:
            dim += len(transforms[0].shape) + 1
        return cls(torch.stack([T.angle for T in transforms], dim),
                   torch.stack([T.t for T in transforms], dim))

    # -- properties --------------------------------------------------------------------------
    @property
    def R(self) -> Tensor:
        """Rotation matrices (..., 2, 2)."""
        return rotation_matrix_2d(self.angle)

    # -- algebra -----------------------------------------------------------------------------
    def inv(self) -> "Transform2D":
        R_inv = self.R.transpose(-1, -2)
        return self.__class__(-self.angle, -(R_inv @ self.t[..., None])[..., 0])

    def compose(self, other: "Transform2D") -> "Transform2D":
        """self @ other: first other, then self."""
        _check_batch(self, other, "compose")
        t = self.t + (self.R @ other.t[..., None])[..., 0]
        return self.__class__(self.angle + other.angle, t)

    def magnitude(self) -> tuple[Tensor, Tensor]:
        """(rotation in degrees wrapped to [0, 180] (...,), translation norm in metres (...,))."""
        dr = torch.rad2deg(self.angle).abs() % 360
        dr = torch.minimum(dr, 360 - dr)
        return dr, torch.linalg.norm(self.t, dim=-1)

    def to_3d(self, z: Tensor | float = 0.0) -> "Transform3D":
        """This pose as SE(3): a rotation about the z axis (up) and translation (t, z) metres."""
        z = _as_tensor(z, like=self.t).to(self.t)
        shape = torch.broadcast_shapes(self.shape, z.shape)
        c, s = torch.cos(self.angle), torch.sin(self.angle)
        one, zero = torch.ones_like(c), torch.zeros_like(c)
        R = torch.stack([c, -s, zero, s, c, zero, zero, zero, one], -1).unflatten(-1, (3, 3))
        t = torch.cat([self.t.expand(*shape, 2), z.expand(shape)[..., None]], -1)
        return Transform3D(R.expand(*shape, 3, 3), t)

    def __repr__(self) -> str:
        if self.angle.numel() == 1:
            deg = math.degrees(float(self.angle.reshape(-1)[0]))
            return f"Transform2D(angle={deg:.3f}°, t={self.t.reshape(-1).tolist()})"
        return f"Transform2D(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


# ------------------------------------------------------------------------------------------------
# SE(3)
# ------------------------------------------------------------------------------------------------
class Transform3D(_RigidTransform):
    """Rigid SE(3) transform, stored as `R` (..., 3, 3) and `t` (..., 3). Applied to p: R p + t.

    `a @ b` composes ((a @ b)(p) == a(b(p))); `a @ points` transforms points (..., N, 3).
    """

    dim, _fields, _tails = 3, ("R", "t"), (2, 1)

    def __init__(self, R: Tensor, t: Tensor | Sequence[float]):
        R = _as_tensor(R)
        t = _as_tensor(t, like=R)
        if R.shape[-2:] != (3, 3):
            raise ValueError(f"Transform3D: R must have shape (..., 3, 3), got {tuple(R.shape)}")
        if t.shape[-1:] != (3,):
            raise ValueError(f"Transform3D: t must have shape (..., 3), got {tuple(t.shape)}")
        R, t = _float_pair(R, t)
        try:
            shape = torch.broadcast_shapes(R.shape[:-2], t.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"Transform3D: R {tuple(R.shape)} and t {tuple(t.shape)} do not broadcast"
            ) from None
        self.R = R.expand(*shape, 3, 3)
        self.t = t.expand(*shape, 3)

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_Rt(cls, R: Tensor, t: Tensor | Sequence[float]) -> "Transform3D":
        return cls(R, t)

    @classmethod
    def from_matrix(cls, M: Tensor) -> "Transform3D":
        """From homogeneous matrices (..., 4, 4)."""
        M = _as_tensor(M)
        if M.shape[-2:] != (4, 4):
            raise ValueError(f"Transform3D.from_matrix: M must be (..., 4, 4), got {tuple(M.shape)}")
        return cls(M[..., :3, :3], M[..., :3, 3])

    @classmethod
    def from_axis_angle(cls, axis_angle: Tensor, t: Tensor | Sequence[float]) -> "Transform3D":
        """From rotation vectors (..., 3) (axis times angle, radians) and translations (..., 3)."""
        axis_angle = _as_tensor(axis_angle)
        return cls(axis_angle_to_matrix(axis_angle), _as_tensor(t, like=axis_angle))

    @classmethod
    def identity(
        cls, shape: Sequence[int] = (), dtype: torch.dtype | None = None, device: Any = None
    ) -> "Transform3D":
        R = torch.eye(3, dtype=dtype, device=device).expand(*shape, 3, 3).clone()
        return cls(R, torch.zeros((*shape, 3), dtype=dtype, device=device))

    @classmethod
    def stack(cls, transforms: Sequence["Transform3D"], dim: int = 0) -> "Transform3D":
        if dim < 0:
            dim += len(transforms[0].shape) + 1
        return cls(torch.stack([T.R for T in transforms], dim),
                   torch.stack([T.t for T in transforms], dim))

    # -- algebra -----------------------------------------------------------------------------
    def inv(self) -> "Transform3D":
        R_inv = self.R.transpose(-1, -2)
        return self.__class__(R_inv, -(R_inv @ self.t[..., None])[..., 0])

    def compose(self, other: "Transform3D") -> "Transform3D":
        """self @ other: first other, then self."""
        _check_batch(self, other, "compose")
        return self.__class__(self.R @ other.R, self.t + (self.R @ other.t[..., None])[..., 0])

    def magnitude(self) -> tuple[Tensor, Tensor]:
        """(rotation angle in degrees in [0, 180] (...,), translation norm in metres (...,))."""
        R = self.R
        # atan2(2 sin, 2 cos) is accurate at 0 and 180 degrees, unlike arccos of the trace.
        sin2 = torch.stack(
            [R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1
        ).norm(dim=-1)
        cos2 = R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1
        return torch.rad2deg(torch.atan2(sin2, cos2)), torch.linalg.norm(self.t, dim=-1)

    def __repr__(self) -> str:
        if self.t.numel() == 3:
            dr, _ = self.magnitude()
            return f"Transform3D(rot={float(dr):.3f}°, t={self.t.reshape(-1).tolist()})"
        return f"Transform3D(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


# ------------------------------------------------------------------------------------------------
# Camera pose <-> query BEV pose
# ------------------------------------------------------------------------------------------------
def camera_pose_to_bev(T_scene_cam: Transform3D) -> Transform2D:
    """Gravity-aligned 2D pose `T_scene_bev` of an OpenCV camera whose pose is `T_scene_cam`.

    The result maps points of the query BEV frame (origin at the camera's ground projection,
    x = optical axis projected on the ground, y = left, metres) to scene x-y (z up).
    For a camera looking straight down, the image's up direction (-y) is used as forward.
    """
    R = T_scene_cam.R
    fwd = R[..., :2, 2]  # camera z axis in the scene, horizontal part
    up_img = -R[..., :2, 1]  # camera -y axis (image up), fallback when z is vertical
    degenerate = torch.linalg.norm(fwd, dim=-1, keepdim=True) < 1e-6
    fwd = torch.where(degenerate, up_img, fwd)
    angle = torch.atan2(fwd[..., 1], fwd[..., 0])
    return Transform2D(angle, T_scene_cam.t[..., :2])


def bev_pose_to_camera(
    T_scene_bev: Transform2D, height_m: Tensor | float, pitch: Tensor | float = 0.0
) -> Transform3D:
    """Inverse of `camera_pose_to_bev`: an OpenCV camera at `height_m` above the BEV origin,
    looking along the BEV +x axis, tilted up by `pitch` radians (positive = looking up), no roll.

    Returns `T_scene_cam` with batch shape of `T_scene_bev` (broadcast with height and pitch).
    """
    ref = T_scene_bev.t
    pitch = _as_tensor(pitch, like=ref).to(ref)
    # Level camera in the BEV frame: cam x -> -y (right), cam y -> -z (down), cam z -> +x (forward).
    R_bev_level = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]],
                               dtype=ref.dtype, device=ref.device)
    c, s = torch.cos(pitch), torch.sin(pitch)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    # Rotation about the camera x axis that tilts the optical axis towards image-up (-y).
    R_level_cam = torch.stack([one, zero, zero, zero, c, -s, zero, s, c], -1).unflatten(-1, (3, 3))
    T_bev_cam = Transform3D(R_bev_level @ R_level_cam, torch.zeros(3, dtype=ref.dtype, device=ref.device))
    return T_scene_bev.to_3d(height_m) @ T_bev_cam


# ------------------------------------------------------------------------------------------------
# Cameras
# ------------------------------------------------------------------------------------------------
class Camera:
    """Base camera: intrinsics `data` (..., 8) = [w, h, fx, fy, cx, cy, k1, k2] in pixels.

    Subclasses define `distort` / `undistort` on normalised image coordinates (z = 1 plane) and
    the rays of the model. Use `Camera.from_tensor(data, model)` to build the right subclass.
    """

    eps = 1e-3  # minimum depth (metres) of a point in front of the camera, as in SNAP
    model = "base"

    def __init__(self, data: Tensor | Sequence[float]):
        data = _as_tensor(data)
        if data.shape[-1:] != (8,):
            raise ValueError(
                f"{type(self).__name__}: intrinsics must be (..., 8) = [w, h, fx, fy, cx, cy, k1, k2], "
                f"got shape {tuple(data.shape)}"
            )
        if not data.is_floating_point():
            data = data.to(torch.get_default_dtype())
        self._data = data

    @staticmethod
    def from_tensor(data: Tensor, model: str = "pinhole", **kwargs: Any) -> "PinholeCamera | FisheyeCamera":
        """Same as `camera_from_tensor`."""
        return camera_from_tensor(data, model, **kwargs)

    # -- accessors ---------------------------------------------------------------------------
    @property
    def size(self) -> Tensor:
        """Image size (..., 2) = (w, h), pixels."""
        return self._data[..., 0:2]

    @property
    def f(self) -> Tensor:
        """Focal lengths (..., 2) = (fx, fy), pixels."""
        return self._data[..., 2:4]

    @property
    def c(self) -> Tensor:
        """Principal point (..., 2) = (cx, cy), pixels (half-integer pixel centres)."""
        return self._data[..., 4:6]

    @property
    def dist(self) -> Tensor:
        """Radial distortion (..., 2) = (k1, k2)."""
        return self._data[..., 6:8]

    @property
    def K(self) -> Tensor:
        """Calibration matrices (..., 3, 3)."""
        fx, fy, cx, cy = self._data[..., 2:6].unbind(-1)
        zero, one = torch.zeros_like(fx), torch.ones_like(fx)
        return torch.stack([fx, zero, cx, zero, fy, cy, zero, zero, one], -1).unflatten(-1, (3, 3))

    @property
    def shape(self) -> torch.Size:
        return self._data.shape[:-1]

    @property
    def dtype(self) -> torch.dtype:
        return self._data.dtype

    @property
    def device(self) -> torch.device:
        return self._data.device

    def to_tensor(self) -> Tensor:
        """Intrinsics (..., 8)."""
        return self._data

    def _replace(self, data: Tensor) -> "Camera":
        return self.__class__(data)

    # -- image operations --------------------------------------------------------------------
    def scale(self, s: Tensor | float | Sequence[float]) -> "Camera":
        """The camera of the image resized by `s` (scalar or (..., 2) = (sx, sy))."""
        s = _as_tensor(s, like=self._data).to(self._data)
        if s.dim() == 0:
            s = s.expand(2)
        if s.shape[-1] != 2:
            raise ValueError(f"{type(self).__name__}.scale: s must be a scalar or (..., 2), got {tuple(s.shape)}")
        wh, f, c = self.size * s, self.f * s, self.c * s
        return self._replace(torch.cat([wh, f, c, self.dist.expand_as(wh)], -1))

    def crop(self, left_top: Tensor | Sequence[float], size: Tensor | Sequence[float]) -> "Camera":
        """The camera of the crop starting at pixel corner `left_top` (..., 2) with `size` (..., 2)."""
        left_top = _as_tensor(left_top, like=self._data).to(self._data)
        size = _as_tensor(size, like=self._data).to(self._data)
        shape = torch.broadcast_shapes(self.shape, left_top.shape[:-1], size.shape[:-1])
        parts = [size, self.f, self.c - left_top, self.dist]
        return self._replace(torch.cat([p.expand(*shape, 2) for p in parts], -1))

    def in_image(self, p2d: Tensor) -> Tensor:
        """Whether pixel points (..., N, 2) lie inside the image [0, w) x [0, h): (..., N) bool."""
        size = self.size[..., None, :]
        return ((p2d >= 0) & (p2d < size)).all(-1)

    # -- model ---------------------------------------------------------------------------------
    def distort(self, xy: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised coordinates (..., N, 2) -> distorted normalised coordinates, valid (..., N)."""
        raise NotImplementedError

    def undistort_to_rays(self, xy_d: Tensor) -> Tensor:
        """Distorted normalised coordinates (..., N, 2) -> unit rays (..., N, 3)."""
        raise NotImplementedError

    def project(self, p3d: Tensor) -> tuple[Tensor, Tensor]:
        """Points in the camera frame (..., N, 3) -> (pixels (..., N, 2), valid (..., N)).

        valid: in front of the camera (z > eps), inside the model's field of view and inside the
        image."""
        if p3d.shape[-1:] != (3,) or p3d.dim() < 2:
            raise ValueError(f"{type(self).__name__}.project: points must be (..., N, 3), got {tuple(p3d.shape)}")
        z = p3d[..., 2]
        visible = z > self.eps
        xy = p3d[..., :2] / z.clamp(min=self.eps)[..., None]
        xy_d, valid = self.distort(xy)
        p2d = xy_d * self.f[..., None, :] + self.c[..., None, :]
        return p2d, visible & valid & self.in_image(p2d)

    def unproject(self, p2d: Tensor) -> Tensor:
        """Pixels (..., N, 2) -> unit-norm ray directions in the camera frame (..., N, 3)."""
        if p2d.shape[-1:] != (2,) or p2d.dim() < 2:
            raise ValueError(f"{type(self).__name__}.unproject: pixels must be (..., N, 2), got {tuple(p2d.shape)}")
        xy_d = (p2d - self.c[..., None, :]) / self.f[..., None, :]
        return self.undistort_to_rays(xy_d)

    # -- tensor plumbing ---------------------------------------------------------------------
    def to(self, *args: Any, **kwargs: Any) -> "Camera":
        return self._replace(self._data.to(*args, **kwargs))

    def float(self) -> "Camera":
        return self.to(torch.float32)

    def double(self) -> "Camera":
        return self.to(torch.float64)

    def __getitem__(self, idx: Any) -> "Camera":
        return self._replace(self._data[_index_with_tail(idx, 1)])

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError(f"len() of an unbatched {type(self).__name__}")
        return self.shape[0]

    @classmethod
    def stack(cls, cameras: Sequence["Camera"], dim: int = 0) -> "Camera":
        if dim < 0:
            dim += len(cameras[0].shape) + 1
        first = cameras[0]
        return first._replace(torch.stack([c.to_tensor() for c in cameras], dim))

    def __repr__(self) -> str:
        if self._data.dim() == 1:
            return f"{type(self).__name__}({[round(v, 4) for v in self._data.tolist()]})"
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class PinholeCamera(Camera):
    """Pinhole camera (k1 = k2 = 0; any distortion in `data` is ignored)."""

    model = "pinhole"

    @classmethod
    def from_fov(
        cls, w: float, h: float, hfov_deg: float, dtype: torch.dtype | None = None, device: Any = None
    ) -> "PinholeCamera":
        """Centred square-pixel pinhole of size w x h with horizontal field of view `hfov_deg`."""
        if not 0 < hfov_deg < 180:
            raise ValueError(f"PinholeCamera.from_fov: hfov_deg must be in (0, 180), got {hfov_deg}")
        f = 0.5 * w / math.tan(math.radians(hfov_deg) / 2)
        return cls(torch.tensor([w, h, f, f, w / 2, h / 2, 0.0, 0.0], dtype=dtype, device=device))

    def distort(self, xy: Tensor) -> tuple[Tensor, Tensor]:
        return xy, torch.ones(xy.shape[:-1], dtype=torch.bool, device=xy.device)

    def undistort_to_rays(self, xy_d: Tensor) -> Tensor:
        rays = torch.cat([xy_d, torch.ones_like(xy_d[..., :1])], -1)
        return torch.nn.functional.normalize(rays, dim=-1)


class FisheyeCamera(Camera):
    """SNAP's fisheye model (snap/utils/geometry.py, `FisheyeCamera.distort_points`).

    For a point with normalised radius r = |(x/z, y/z)|, theta = atan(r) is its angle to the optical
    axis and its distorted radius is r_d = theta * (1 + k1 theta^2 + k2 theta^4) (equidistant
    Kannala-Brandt; SNAP has a third coefficient, always zero here). A point is valid when
    theta < max_fov / 2 and the distortion is positive and monotonic there (so that `unproject`,
    which inverts theta with Newton steps, is unique). Points need z > eps, so max_fov < 180 deg.

    `max_fov_deg`: full field of view in degrees, a float or a tensor of the batch shape
    (SNAP's default, 115 deg, is that of its capture rigs).
    """

    model = "fisheye"
    default_max_fov_deg = 115.0
    newton_steps = 10

    def __init__(self, data: Tensor | Sequence[float], max_fov_deg: Tensor | float | None = None):
        super().__init__(data)
        if max_fov_deg is None:
            max_fov_deg = self.default_max_fov_deg
        mf = _as_tensor(max_fov_deg, like=self._data).to(self._data)
        # Checked for python numbers and CPU tensors only: a check on GPU would force a sync.
        if mf.device.type == "cpu" and ((mf <= 0).any() or (mf >= 180).any()):
            raise ValueError(f"FisheyeCamera: max_fov_deg must be in (0, 180), got {max_fov_deg}")
        self.max_fov_deg = mf.expand(self.shape)

    def _replace(self, data: Tensor) -> "FisheyeCamera":
        shape = data.shape[:-1]
        try:
            mf = self.max_fov_deg.to(dtype=data.dtype, device=data.device).expand(shape)
        except RuntimeError:
            if not (self.max_fov_deg == self.max_fov_deg.reshape(-1)[0]).all():
                raise ValueError(
                    f"FisheyeCamera: cannot map per-camera max_fov_deg {tuple(self.max_fov_deg.shape)} "
                    f"to the new batch shape {tuple(shape)}"
                ) from None
            mf = self.max_fov_deg.reshape(-1)[0].to(dtype=data.dtype, device=data.device)
        return self.__class__(data, mf)

    def __getitem__(self, idx: Any) -> "FisheyeCamera":
        return self.__class__(self._data[_index_with_tail(idx, 1)], self.max_fov_deg[idx])

    def to(self, *args: Any, **kwargs: Any) -> "FisheyeCamera":
        return self.__class__(self._data.to(*args, **kwargs), self.max_fov_deg.to(*args, **kwargs))

    @classmethod
    def stack(cls, cameras: Sequence["FisheyeCamera"], dim: int = 0) -> "FisheyeCamera":
        if dim < 0:
            dim += len(cameras[0].shape) + 1
        return cls(torch.stack([c.to_tensor() for c in cameras], dim),
                   torch.stack([c.max_fov_deg for c in cameras], dim))

    @classmethod
    def from_fov(
        cls,
        w: float,
        h: float,
        hfov_deg: float,
        k1: float = 0.0,
        k2: float = 0.0,
        max_fov_deg: float | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> "FisheyeCamera":
        """Centred square-pixel fisheye whose horizontal FOV spans the image width exactly.

        `max_fov_deg` defaults to the FOV of the image diagonal (so every pixel is valid), at most
        179 degrees."""
        if not 0 < hfov_deg < 180:
            raise ValueError(f"FisheyeCamera.from_fov: hfov_deg must be in (0, 180), got {hfov_deg}")
        theta = math.radians(hfov_deg) / 2
        f = 0.5 * w / (theta * (1 + k1 * theta**2 + k2 * theta**4))
        data = torch.tensor([w, h, f, f, w / 2, h / 2, k1, k2], dtype=dtype, device=device)
        if max_fov_deg is None:
            corner = cls(data.double(), 179.0).unproject(torch.zeros(1, 2, dtype=torch.float64, device=device))
            max_fov_deg = min(2 * math.degrees(math.acos(float(corner[0, 2]))) + 1e-3, 179.0)
        return cls(data, max_fov_deg)

    def _radial(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """r_d(theta) and its derivative, broadcast over (..., N)."""
        k1, k2 = self.dist[..., None, 0], self.dist[..., None, 1]
        t2 = theta * theta
        r_d = theta * (1 + k1 * t2 + k2 * t2 * t2)
        dr_d = 1 + 3 * k1 * t2 + 5 * k2 * t2 * t2
        return r_d, dr_d

    def distort(self, xy: Tensor) -> tuple[Tensor, Tensor]:
        r2 = (xy * xy).sum(-1)
        center = r2 < self.eps**2
        r = torch.sqrt(torch.where(center, torch.full_like(r2, self.eps**2), r2))  # no NaN grad at 0
        theta = torch.atan(r)
        r_d, dr_d = self._radial(theta)
        scale = torch.where(center, torch.ones_like(r), r_d / r)
        half_fov = torch.deg2rad(self.max_fov_deg)[..., None] / 2
        valid = center | ((theta < half_fov) & (scale > 0) & (dr_d > 0))
        return xy * scale[..., None], valid

    def undistort_to_rays(self, xy_d: Tensor) -> Tensor:
        r_d2 = (xy_d * xy_d).sum(-1)
        center = r_d2 < self.eps**2
        r_d = torch.sqrt(torch.where(center, torch.full_like(r_d2, self.eps**2), r_d2))
        theta = r_d
        for _ in range(self.newton_steps):  # solve r_d(theta) = r_d
            f, df = self._radial(theta)
            theta = theta - (f - r_d) / torch.where(df.abs() < 1e-8, torch.full_like(df, 1e-8), df)
            theta = theta.clamp(0, math.pi)
        sin_over_rd = torch.where(center, torch.ones_like(r_d), torch.sin(theta) / r_d)
        cos = torch.where(center, torch.ones_like(r_d), torch.cos(theta))
        rays = torch.cat([xy_d * sin_over_rd[..., None], cos[..., None]], -1)
        return torch.nn.functional.normalize(rays, dim=-1)


def camera_from_tensor(data: Tensor, model: str = "pinhole", **kwargs: Any) -> PinholeCamera | FisheyeCamera:
    """Camera of the given model ("pinhole" or "fisheye") from intrinsics (..., 8).

    kwargs go to the model's constructor (e.g. `max_fov_deg` for fisheye)."""
    if model == "pinhole":
        return PinholeCamera(data, **kwargs)
    if model == "fisheye":
        return FisheyeCamera(data, **kwargs)
    raise ValueError(f"unknown camera model {model!r}; choose 'pinhole' or 'fisheye'")
