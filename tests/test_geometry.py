"""Tests of neuralmaps.geometry: SE(2)/SE(3) algebra, camera <-> BEV poses, pinhole and fisheye."""

import math

import pytest
import torch

from neuralmaps.geometry import (
    Camera,
    FisheyeCamera,
    PinholeCamera,
    Transform2D,
    Transform3D,
    axis_angle_to_matrix,
    bev_pose_to_camera,
    camera_from_tensor,
    camera_pose_to_bev,
)

torch.set_num_threads(1)



def random_transform2d(shape, gen, dtype=torch.float64, device="cpu"):
    angle = (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * math.pi * 3
    t = torch.randn((*shape, 2), generator=gen, dtype=dtype) * 10
    return Transform2D(angle, t).to(device)


def random_transform3d(shape, gen, dtype=torch.float64, device="cpu"):
    aa = torch.randn((*shape, 3), generator=gen, dtype=dtype)
    t = torch.randn((*shape, 3), generator=gen, dtype=dtype) * 10
    return Transform3D.from_axis_angle(aa, t).to(device)


# ------------------------------------------------------------------------------------------------
# Transform2D
# ------------------------------------------------------------------------------------------------
def test_rotate_x_by_90_ccw_gives_y(device):
    T = Transform2D.from_degrees(90.0, torch.zeros(2, device=device))
    p = T(torch.tensor([[1.0, 0.0]], device=device))
    torch.testing.assert_close(p, torch.tensor([[0.0, 1.0]], device=device), atol=1e-6, rtol=0)
    torch.testing.assert_close(T.R, torch.tensor([[0.0, -1.0], [1.0, 0.0]], device=device), atol=1e-6, rtol=0)


def test_transform2d_compose_inverse_round_trips(device):
    gen = torch.Generator().manual_seed(0)
    a = random_transform2d((4, 5), gen, device=device)
    b = random_transform2d((4, 5), gen, device=device)
    p = torch.randn(4, 5, 7, 2, generator=gen, dtype=torch.float64).to(device)

    torch.testing.assert_close((a @ b)(p), a(b(p)), atol=1e-9, rtol=0)
    torch.testing.assert_close(a.inv()(a(p)), p, atol=1e-9, rtol=0)
    ident = a @ a.inv()
    dr, dt = ident.magnitude()
    assert dr.abs().max() < 1e-9 and dt.abs().max() < 1e-9
    # Matrices agree with the composition, and survive a round trip.
    torch.testing.assert_close((a @ b).matrix(), a.matrix() @ b.matrix(), atol=1e-9, rtol=0)
    torch.testing.assert_close(Transform2D.from_matrix(a.matrix()).matrix(), a.matrix(), atol=1e-9, rtol=0)
    torch.testing.assert_close(Transform2D.from_Rt(a.R, a.t)(p), a(p), atol=1e-9, rtol=0)
    assert (a @ p).shape == p.shape


def test_transform2d_magnitude_known():
    T = Transform2D.from_degrees(torch.tensor([270.0, -190.0, 45.0, 720.0]), torch.tensor([[3.0, 4.0]]))
    dr, dt = T.magnitude()
    torch.testing.assert_close(dr, torch.tensor([90.0, 170.0, 45.0, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(dt, torch.full((4,), 5.0))
    assert T.shape == (4,)


def test_transform2d_batching_indexing_dtype():
    gen = torch.Generator().manual_seed(1)
    T = random_transform2d((3, 4), gen)
    assert T.shape == (3, 4) and T.t.shape == (3, 4, 2) and T.R.shape == (3, 4, 2, 2)
    assert T[1].shape == (4,)
    assert T[..., 2].shape == (3,)
    torch.testing.assert_close(T[..., 2].t, T.t[:, 2])
    assert T[:, 1:3].shape == (3, 2)
    S = Transform2D.stack([T[0], T[1], T[2]])
    torch.testing.assert_close(S.matrix(), T.matrix())
    assert Transform2D.stack([T, T], dim=-1).shape == (3, 4, 2)
    assert T.float().dtype == torch.float32 and T.float().double().dtype == torch.float64
    assert T.to(torch.float32).angle.dtype == torch.float32
    # A single transform broadcasts against batched points.
    p = torch.randn(2, 6, 2, dtype=torch.float64)
    assert T[0, 0](p).shape == (2, 6, 2)


def test_mixed_dtypes_promote():
    T = Transform2D(torch.tensor(0.3), torch.zeros(2, dtype=torch.float64))
    assert T.angle.dtype == T.t.dtype == torch.float64
    cam = bev_pose_to_camera(T, torch.tensor(1.6), torch.tensor(0.1))
    assert cam.dtype == torch.float64 and cam.shape == ()
    assert Transform2D(0, [1, 2]).dtype == torch.get_default_dtype()


def test_transform2d_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        Transform2D(0.0, torch.zeros(3))
    with pytest.raises(ValueError, match="broadcast"):
        Transform2D(torch.zeros(3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="points"):
        Transform2D(0.0, [0.0, 0.0]).transform(torch.zeros(5, 3))


def test_transform2d_gradients_flow():
    angle = torch.tensor(0.3, requires_grad=True)
    t = torch.tensor([1.0, 2.0], requires_grad=True)
    T = Transform2D(angle, t)
    T.inv().compose(T).transform(torch.ones(1, 2)).sum().backward()
    assert angle.grad is not None and t.grad is not None


# ------------------------------------------------------------------------------------------------
# Transform3D
# ------------------------------------------------------------------------------------------------
def test_transform3d_compose_inverse_round_trips(device):
    gen = torch.Generator().manual_seed(2)
    a = random_transform3d((6,), gen, device=device)
    b = random_transform3d((6,), gen, device=device)
    p = torch.randn(6, 9, 3, generator=gen, dtype=torch.float64).to(device)
    # Rotations are orthonormal with determinant +1.
    eye = torch.eye(3, dtype=torch.float64, device=device).expand(6, 3, 3)
    torch.testing.assert_close(a.R @ a.R.transpose(-1, -2), eye, atol=1e-9, rtol=0)
    torch.testing.assert_close(torch.linalg.det(a.R), torch.ones(6, dtype=torch.float64, device=device))

    torch.testing.assert_close((a @ b)(p), a(b(p)), atol=1e-9, rtol=0)
    torch.testing.assert_close(a.inv()(a(p)), p, atol=1e-9, rtol=0)
    dr, dt = (a.inv() @ a).magnitude()
    assert dr.abs().max() < 1e-6 and dt.abs().max() < 1e-9
    torch.testing.assert_close((a @ b).matrix(), a.matrix() @ b.matrix(), atol=1e-9, rtol=0)
    torch.testing.assert_close(Transform3D.from_matrix(a.matrix()).matrix(), a.matrix(), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.inv(a.matrix()), a.inv().matrix(), atol=1e-9, rtol=0)


def test_transform3d_magnitude_known():
    aa = torch.tensor([[0, 0, math.pi / 2], [math.radians(179.9), 0, 0], [0, 0, 0], [0.0, 1e-4, 0]],
                      dtype=torch.float64)
    T = Transform3D.from_axis_angle(aa, torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64))
    dr, dt = T.magnitude()
    torch.testing.assert_close(dr, torch.tensor([90.0, 179.9, 0.0, math.degrees(1e-4)], dtype=torch.float64),
                               atol=1e-9, rtol=0)
    torch.testing.assert_close(dt, torch.full((4,), 3.0, dtype=torch.float64))
    # Rodrigues about z matches the 2D rotation.
    R = axis_angle_to_matrix(torch.tensor([0, 0, 0.7], dtype=torch.float64))
    torch.testing.assert_close(R[:2, :2], Transform2D(torch.tensor(0.7, dtype=torch.float64), [0.0, 0.0]).R)


def test_transform3d_batching_and_errors():
    gen = torch.Generator().manual_seed(3)
    T = random_transform3d((2, 3), gen)
    assert T.shape == (2, 3) and T[1].shape == (3,) and T[..., 0].shape == (2,)
    torch.testing.assert_close(T[..., 0].R, T.R[:, 0])
    torch.testing.assert_close(Transform3D.stack([T[0], T[1]]).matrix(), T.matrix())
    assert T.float().R.dtype == torch.float32
    ident = Transform3D.identity((3,), dtype=torch.float64)
    torch.testing.assert_close((ident @ T[0]).matrix(), T[0].matrix())
    torch.testing.assert_close((Transform3D.identity(dtype=torch.float64) @ T).matrix(), T.matrix())
    with pytest.raises(ValueError, match="do not broadcast"):
        Transform3D.identity((2,), dtype=torch.float64) @ T[0]
    with pytest.raises(ValueError, match="4, 4"):
        Transform3D.from_matrix(torch.eye(3))
    with pytest.raises(ValueError, match=r"t must have shape"):
        Transform3D(torch.eye(3), torch.zeros(2))


# ------------------------------------------------------------------------------------------------
# Camera pose <-> BEV pose
# ------------------------------------------------------------------------------------------------
def _camera_looking_north() -> torch.Tensor:
    # Columns are the camera axes in the scene: x right = east, y down = -up, z forward = north.
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def test_camera_looking_north_gives_bev_angle_90(device):
    T = Transform3D(_camera_looking_north(), [10.0, 20.0, 1.6]).to(device)
    bev = camera_pose_to_bev(T)
    assert math.isclose(math.degrees(float(bev.angle)), 90.0, abs_tol=1e-5)
    torch.testing.assert_close(bev.t, torch.tensor([10.0, 20.0], device=device))
    # BEV y (left of a north-facing camera) is west.
    torch.testing.assert_close(bev(torch.tensor([[0.0, 1.0]], device=device)),
                               torch.tensor([[9.0, 20.0]], device=device), atol=1e-5, rtol=0)


def test_bev_frame_axes_match_the_image():
    """A ground point ahead lands on the image's vertical centre line; one to the left lands left."""
    gen = torch.Generator().manual_seed(4)
    T_scene_bev = random_transform2d((5,), gen)
    T_scene_cam = bev_pose_to_camera(T_scene_bev, 1.6)
    cam = PinholeCamera.from_fov(640, 480, 90.0, dtype=torch.float64)
    p_bev = torch.tensor([[5.0, 0.0], [5.0, 2.0]], dtype=torch.float64)
    p_scene = torch.cat([T_scene_bev(p_bev), torch.zeros(5, 2, 1, dtype=torch.float64)], -1)
    p2d, valid = cam.project(T_scene_cam.inv()(p_scene))
    assert valid.all()
    torch.testing.assert_close(p2d[:, 0, 0], torch.full((5,), 320.0, dtype=torch.float64))
    assert (p2d[:, 1, 0] < 320).all()  # left of the centre
    assert (p2d[:, :, 1] > 240).all()  # ground points are below the horizon
    # The horizon: a far point at camera height projects to the principal point row.
    far = torch.cat([T_scene_bev(torch.tensor([[1e4, 0.0]], dtype=torch.float64)),
                     torch.full((5, 1, 1), 1.6, dtype=torch.float64)], -1)
    p2d, _ = cam.project(T_scene_cam.inv()(far))
    torch.testing.assert_close(p2d[:, 0], torch.tensor([320.0, 240.0], dtype=torch.float64).expand(5, 2))


def test_bev_pose_round_trip_with_pitch():
    gen = torch.Generator().manual_seed(5)
    T_scene_bev = random_transform2d((16,), gen)
    pitch = (torch.rand(16, generator=gen, dtype=torch.float64) - 0.5) * math.radians(160)
    T_scene_cam = bev_pose_to_camera(T_scene_bev, torch.full((16,), 2.0, dtype=torch.float64), pitch)
    # Optical axis elevation equals the pitch.
    torch.testing.assert_close(torch.asin(T_scene_cam.R[:, 2, 2]), pitch, atol=1e-9, rtol=0)
    torch.testing.assert_close(T_scene_cam.t[:, 2], torch.full((16,), 2.0, dtype=torch.float64))
    back = camera_pose_to_bev(T_scene_cam)
    dr, dt = (back.inv() @ T_scene_bev).magnitude()
    assert dr.max() < 1e-7 and dt.max() < 1e-9


def test_transform2d_to_3d_rotates_about_up():
    gen = torch.Generator().manual_seed(9)
    T = random_transform2d((3,), gen)
    p = torch.randn(3, 4, 3, generator=gen, dtype=torch.float64)
    q = T.to_3d(1.5)(p)
    torch.testing.assert_close(q[..., :2], T(p[..., :2]))
    torch.testing.assert_close(q[..., 2], p[..., 2] + 1.5)
    # A camera moved by a 2D pose has its BEV pose composed with it.
    cam = bev_pose_to_camera(T[0], 1.6, 0.2)
    torch.testing.assert_close(camera_pose_to_bev(T[1].to_3d() @ cam).matrix(), (T[1] @ T[0]).matrix())


def test_camera_looking_down_uses_image_up_as_forward():
    # Straight down, image up (-y) points north.
    R = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
    bev = camera_pose_to_bev(Transform3D(R, [0.0, 0.0, 10.0]))
    assert math.isclose(math.degrees(float(bev.angle)), 90.0, abs_tol=1e-5)


# ------------------------------------------------------------------------------------------------
# Cameras
# ------------------------------------------------------------------------------------------------
def _fisheye(dtype=torch.float64, device="cpu") -> FisheyeCamera:
    data = torch.tensor([800, 600, 300, 310, 405.0, 297.0, -0.02, 0.003], dtype=dtype, device=device)
    return FisheyeCamera(data, max_fov_deg=170.0)


def _pinhole(dtype=torch.float64, device="cpu") -> PinholeCamera:
    return PinholeCamera(torch.tensor([640, 480, 500, 520, 330.0, 235.0, 0, 0], dtype=dtype, device=device))


@pytest.mark.parametrize("make", [_pinhole, _fisheye])
def test_optical_axis_projects_to_principal_point(make, device):
    cam = make(device=device)
    p2d, valid = cam.project(torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, -3.0]], dtype=torch.float64, device=device))
    torch.testing.assert_close(p2d[0], cam.c)
    assert valid.tolist() == [True, False]  # behind the camera is invalid
    ray = cam.unproject(cam.c[None])
    torch.testing.assert_close(ray, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64, device=device))


def test_pinhole_project_unproject_round_trip(device):
    cam = _pinhole(device=device)
    gen = torch.Generator().manual_seed(6)
    p2d = (torch.rand(200, 2, generator=gen, dtype=torch.float64) * torch.tensor([640.0, 480.0])).to(device)
    rays = cam.unproject(p2d)
    torch.testing.assert_close(rays.norm(dim=-1), torch.ones(200, dtype=torch.float64, device=device))
    depth = (torch.rand(200, 1, generator=gen, dtype=torch.float64) * 50 + 0.1).to(device)
    back, valid = cam.project(rays * depth)
    assert valid.all()
    torch.testing.assert_close(back, p2d, atol=1e-9, rtol=0)


def test_fisheye_round_trip_up_to_max_fov(device):
    cam = _fisheye(device=device)
    half = math.radians(85.0)
    gen = torch.Generator().manual_seed(7)
    # Directions with angle to the axis up to just below max_fov / 2, incl. 0.999 of it.
    theta = torch.cat([torch.rand(300, generator=gen, dtype=torch.float64) * half,
                       torch.tensor([0.0, 0.999 * half], dtype=torch.float64)])
    phi = torch.rand(302, generator=gen, dtype=torch.float64) * 2 * math.pi
    rays = torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()], -1).to(device)
    big = FisheyeCamera(torch.tensor([1e4, 1e4, 300, 310, 5e3, 5e3, -0.02, 0.003], dtype=torch.float64, device=device),
                        max_fov_deg=170.0)  # an image large enough to hold the whole FOV
    p2d, valid = big.project(rays * 7.0)
    assert valid.all()
    torch.testing.assert_close(big.unproject(p2d), rays, atol=1e-9, rtol=0)
    # Project(unproject(pixels)) inside the real image; its corners lie beyond the 170 deg FOV.
    pix = (torch.rand(400, 2, generator=gen, dtype=torch.float64) * torch.tensor([800.0, 600.0])).to(device)
    rays = cam.unproject(pix)
    inside_fov = torch.rad2deg(torch.acos(rays[:, 2])) < 85.0
    assert 100 < inside_fov.sum() < 400
    back, valid = cam.project(rays * 3.0)
    assert torch.equal(valid, inside_fov)
    torch.testing.assert_close(back[valid], pix[valid], atol=1e-8, rtol=0)


def test_fisheye_matches_snap_model_and_max_fov():
    cam = _fisheye()
    k1, k2 = -0.02, 0.003
    theta = math.radians(60.0)
    p3d = torch.tensor([[math.tan(theta), 0.0, 1.0]], dtype=torch.float64)
    p2d, valid = cam.project(p3d)
    r_d = theta * (1 + k1 * theta**2 + k2 * theta**4)
    torch.testing.assert_close(p2d[0], torch.tensor([405.0 + 300 * r_d, 297.0], dtype=torch.float64))
    assert valid.item()
    # Beyond max_fov / 2 = 85 deg: invalid even where the pixel is inside a huge image.
    big = FisheyeCamera(torch.tensor([1e5, 1e5, 300, 310, 5e4, 5e4, k1, k2], dtype=torch.float64), max_fov_deg=170)
    t = math.radians(86.0)
    _, valid = big.project(torch.tensor([[math.sin(t), 0.0, math.cos(t)]], dtype=torch.float64))
    assert not valid.item()
    t = math.radians(84.0)
    _, valid = big.project(torch.tensor([[math.sin(t), 0.0, math.cos(t)]], dtype=torch.float64))
    assert valid.item()
    # Default max FOV is SNAP's 115 deg.
    assert float(FisheyeCamera(cam.to_tensor()).max_fov_deg) == 115.0


def test_fisheye_folding_distortion_is_invalid():
    # k1 strongly negative: r_d(theta) peaks and folds back inside the FOV; beyond the fold is invalid.
    cam = FisheyeCamera(torch.tensor([1e4, 1e4, 100, 100, 5e3, 5e3, -0.5, 0.0], dtype=torch.float64),
                        max_fov_deg=179.0)
    t_fold = math.sqrt(1 / 1.5)  # d/dtheta [theta - 0.5 theta^3] = 0
    thetas = torch.tensor([t_fold - 0.05, t_fold + 0.05], dtype=torch.float64)
    p3d = torch.stack([thetas.sin(), torch.zeros(2, dtype=torch.float64), thetas.cos()], -1)
    _, valid = cam.project(p3d)
    assert valid.tolist() == [True, False]


def test_camera_intrinsics_accessors_and_K():
    cam = _pinhole()
    torch.testing.assert_close(cam.K, torch.tensor([[500, 0, 330.0], [0, 520, 235.0], [0, 0, 1]], dtype=torch.float64))
    torch.testing.assert_close(cam.size, torch.tensor([640.0, 480.0], dtype=torch.float64))
    torch.testing.assert_close(cam.f, torch.tensor([500.0, 520.0], dtype=torch.float64))
    torch.testing.assert_close(cam.c, torch.tensor([330.0, 235.0], dtype=torch.float64))
    assert cam.to_tensor().shape == (8,)


def test_from_fov_edges():
    cam = PinholeCamera.from_fov(256, 128, 90.0, dtype=torch.float64)
    torch.testing.assert_close(cam.c, torch.tensor([128.0, 64.0], dtype=torch.float64))  # centred
    # A point at hfov/2 lands exactly on the right image border (outside [0, w)).
    p2d, valid = cam.project(torch.tensor([[1.0, 0.0, 1.0], [0.999, 0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(p2d[0, 0], torch.tensor(256.0, dtype=torch.float64))
    assert valid.tolist() == [False, True]
    fe = FisheyeCamera.from_fov(256, 128, 150.0, k1=0.01, dtype=torch.float64)
    t = math.radians(75.0)
    p2d, _ = fe.project(torch.tensor([[-math.sin(t), 0.0, math.cos(t)]], dtype=torch.float64))
    torch.testing.assert_close(p2d[0, 0], torch.tensor(0.0, dtype=torch.float64), atol=1e-9, rtol=0)
    # The default max FOV covers the whole image, corners included.
    corners = torch.tensor([[0.001, 0.001], [255.999, 127.999]], dtype=torch.float64)
    _, valid = fe.project(fe.unproject(corners))
    assert valid.all() and 150.0 < float(fe.max_fov_deg) < 179.0


@pytest.mark.parametrize("make", [_pinhole, _fisheye])
def test_scale_and_crop_change_projections(make):
    cam = make()
    gen = torch.Generator().manual_seed(8)
    p3d = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    p3d[:, 2] = p3d[:, 2].abs() + 1.0
    p2d, _ = cam.project(p3d)

    s = torch.tensor([0.5, 0.25], dtype=torch.float64)
    scaled = cam.scale(s)
    q2d, _ = scaled.project(p3d)
    torch.testing.assert_close(q2d, p2d * s)
    torch.testing.assert_close(scaled.size, cam.size * s)
    torch.testing.assert_close(cam.scale(2.0).project(p3d)[0], p2d * 2)

    left_top = torch.tensor([100.0, 50.0], dtype=torch.float64)
    size = torch.tensor([200.0, 150.0], dtype=torch.float64)
    cropped = cam.crop(left_top, size)
    q2d, qvalid = cropped.project(p3d)
    torch.testing.assert_close(q2d, p2d - left_top)
    inside = ((p2d >= left_top) & (p2d < left_top + size)).all(-1) & (p3d[:, 2] > 0)
    _, pvalid = cam.project(p3d)
    assert torch.equal(qvalid, inside & pvalid)
    torch.testing.assert_close(cropped.size, size)
    assert type(cropped) is type(cam)


def test_in_image_half_open_bounds():
    cam = _pinhole()
    p = torch.tensor([[0.0, 0.0], [639.99, 479.99], [640.0, 10.0], [-0.01, 10.0]], dtype=torch.float64)
    assert cam.in_image(p).tolist() == [True, True, False, False]


def test_batched_cameras_and_points():
    data = torch.stack([_pinhole().to_tensor(), PinholeCamera.from_fov(640, 480, 60.0, dtype=torch.float64).to_tensor()])
    cams = camera_from_tensor(data, "pinhole")
    assert isinstance(cams, PinholeCamera) and cams.shape == (2,) and len(cams) == 2
    p3d = torch.tensor([[[0.1, 0.2, 2.0]], [[0.1, 0.2, 2.0]]], dtype=torch.float64)
    p2d, valid = cams.project(p3d)
    assert p2d.shape == (2, 1, 2) and valid.shape == (2, 1)
    torch.testing.assert_close(p2d[1], cams[1].project(p3d[1])[0])
    assert Camera.stack([cams[0], cams[1]]).to_tensor().equal(data)
    assert cams.float().dtype == torch.float32
    assert isinstance(Camera.from_tensor(data[0], "fisheye"), FisheyeCamera)
    fe = camera_from_tensor(data, "fisheye", max_fov_deg=120.0)
    assert isinstance(fe, FisheyeCamera) and fe[1].max_fov_deg.item() == 120.0
    assert FisheyeCamera.stack([fe[0], fe[1]]).shape == (2,)


def test_camera_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        PinholeCamera(torch.zeros(6))
    with pytest.raises(ValueError, match="unknown camera model"):
        camera_from_tensor(torch.zeros(8), "orthographic")
    with pytest.raises(ValueError, match="max_fov_deg"):
        FisheyeCamera(torch.zeros(8), max_fov_deg=200.0)
    with pytest.raises(ValueError, match="points"):
        _pinhole().project(torch.zeros(4, 2))


@pytest.mark.parametrize("make", [_pinhole, _fisheye])
def test_camera_gradients_finite_on_axis(make):
    cam = make()
    p3d = torch.tensor([[0.0, 0.0, 2.0], [0.3, -0.2, 1.0]], dtype=torch.float64, requires_grad=True)
    p2d, _ = cam.project(p3d)
    p2d.sum().backward()
    assert torch.isfinite(p3d.grad).all() and p3d.grad.abs().sum() > 0
    pix = cam.c[None].clone().requires_grad_(True)
    cam.unproject(pix).sum().backward()
    assert torch.isfinite(pix.grad).all()


def test_no_hidden_cpu_tensors_meta_device():
    """Everything runs on the 'meta' device: no tensor is created on a hard-coded device."""
    d = "meta"
    T = Transform2D(torch.zeros(3, device=d), torch.zeros(3, 2, device=d))
    assert (T @ T.inv()).matrix().device.type == d and T(torch.zeros(3, 5, 2, device=d)).device.type == d
    T3 = Transform3D.from_axis_angle(torch.zeros(3, 3, device=d), torch.zeros(3, 3, device=d))
    assert (T3 @ T3.inv()).magnitude()[0].device.type == d
    assert camera_pose_to_bev(T3).t.device.type == d
    assert bev_pose_to_camera(T, 1.6, 0.1).R.device.type == d
    for cls in (PinholeCamera, FisheyeCamera):
        cam = cls(torch.zeros(3, 8, device=d))
        p2d, valid = cam.project(torch.zeros(3, 4, 3, device=d))
        assert p2d.device.type == valid.device.type == cam.unproject(p2d).device.type == d
        assert cam.scale(0.5).crop(torch.zeros(2, device=d), torch.ones(2, device=d)).K.device.type == d
