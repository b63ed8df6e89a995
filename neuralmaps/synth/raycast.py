"""A thin Embree (embreex) ray-casting scene over a triangle mesh, in float32 world-local metres.

trimesh's `RayMeshIntersector` wraps the same library but neither exposes occlusion queries with a
maximum distance nor returns hit distances without extra work, so the renderer calls embreex
directly through this one class.
"""

from __future__ import annotations

import numpy as np

NO_HIT = -1


def _require_embree() -> None:
    import trimesh.ray

    if not trimesh.ray.has_embree:
        raise ImportError(
            "neuralmaps.synth needs Embree ray casting: `pip install embreex` (trimesh.ray.has_embree is False)"
        )


class RayScene:
    """Static triangle mesh with Embree acceleration. vertices (V, 3), faces (F, 3), local metres."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        _require_embree()
        from embreex import rtcore_scene
        from embreex.mesh_construction import TriangleMesh

        vertices = np.ascontiguousarray(vertices, dtype=np.float32)
        faces = np.ascontiguousarray(faces, dtype=np.int32)
        if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
            raise ValueError(f"RayScene: need vertices (V, 3) and faces (F, 3), got {vertices.shape}, {faces.shape}")
        self.num_faces = len(faces)
        self._scene = None
        if self.num_faces:
            self._scene = rtcore_scene.EmbreeScene()
            TriangleMesh(scene=self._scene, vertices=vertices, indices=faces)

    def first_hit(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest hit of rays (N, 3) (unit dirs): distance t (N,) float32 (inf: none), face (N,) int32."""
        n = len(origins)
        if self._scene is None or n == 0:
            return np.full(n, np.inf, np.float32), np.full(n, NO_HIT, np.int32)
        out = self._scene.run(
            np.ascontiguousarray(origins, np.float32), np.ascontiguousarray(dirs, np.float32), output=1
        )
        face = out["primID"].astype(np.int32)
        t = np.where(face >= 0, out["tfar"], np.inf).astype(np.float32)
        return t, face

    def occluded(self, origins: np.ndarray, dirs: np.ndarray, tmax: float | np.ndarray = 1e30) -> np.ndarray:
        """Whether each ray (N, 3) hits anything before distance `tmax`: (N,) bool."""
        n = len(origins)
        if self._scene is None or n == 0:
            return np.zeros(n, bool)
        dists = np.broadcast_to(np.asarray(tmax, np.float32), (n,)).copy()
        res = self._scene.run(
            np.ascontiguousarray(origins, np.float32), np.ascontiguousarray(dirs, np.float32),
            dists=dists, query="OCCLUDED",
        )
        return np.asarray(res) >= 0


def unit_face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit normals (F, 3) float32 of triangles `faces` (F, 3) over `vertices` (V, 3), by winding."""
    v = vertices[faces]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    return (n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class MeshRayCasting:
    """Mixin for a dataclass holding a mesh as `vertices` (V, 3) and `faces` (F, 3) with fields
    `_scene` and `_normals` (default None): the Embree scene and the unit face normals are built
    on first use; the scene is not pickled (it is rebuilt in a worker process)."""

    vertices: np.ndarray
    faces: np.ndarray
    _scene: "RayScene | None"
    _normals: "np.ndarray | None"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_scene": None}

    @property
    def scene(self) -> RayScene:
        """Embree scene of the mesh (built on first use)."""
        if self._scene is None:
            self._scene = RayScene(self.vertices, self.faces)
        return self._scene

    @property
    def face_normals(self) -> np.ndarray:
        """Unit face normals (F, 3) float32, by winding (outward for buildings)."""
        if self._normals is None:
            self._normals = unit_face_normals(self.vertices, self.faces)
        return self._normals
