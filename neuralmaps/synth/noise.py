"""Deterministic procedural noise (hash-based value noise), evaluated at arbitrary points.

Pure numpy functions of plain data, so the same point gives the same value whatever the render
resolution or the order in which pixels are shaded.
"""

from __future__ import annotations

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def hash_uniform(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Integer lattice coordinates (...) -> uniform values in [0, 1) (...), float32.

    A splitmix64-style integer hash of (ix, iy, seed): no visible lattice correlations."""
    with np.errstate(over="ignore"):
        h = ix.astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= iy.astype(np.int64).view(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= np.uint64((int(seed) * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(32)
    return ((h & np.uint64(0xFFFFFF)).astype(np.float32)) * np.float32(1.0 / 0x1000000)


def value_noise(x: np.ndarray, y: np.ndarray, cell: float, seed: int, period: int | None = None) -> np.ndarray:
    """Smooth value noise in [-1, 1] at points (x, y) (same shape, metres), lattice spacing `cell` m;
    periodic with `period` lattice cells when given (for tileable textures)."""
    gx = np.asarray(x, dtype=np.float64) / cell
    gy = np.asarray(y, dtype=np.float64) / cell
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = (gx - ix).astype(np.float32), (gy - iy).astype(np.float32)
    fx = fx * fx * (3 - 2 * fx)  # smoothstep: no creases at lattice lines
    fy = fy * fy * (3 - 2 * fy)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    wrap = (lambda a: a % period) if period else (lambda a: a)  # noqa: E731
    h = lambda a, b: hash_uniform(wrap(a), wrap(b), seed)  # noqa: E731
    v = (h(ix, iy) * (1 - fx) + h(ix + 1, iy) * fx) * (1 - fy) + (h(ix, iy + 1) * (1 - fx) + h(ix + 1, iy + 1) * fx) * fy
    return 2 * v - 1


class NoiseTexture:
    """A periodic multi-octave value-noise texture (size x size, `res` metres per texel) for cheap
    per-hit texturing: one gather per lookup instead of hashing. Two lookups at incommensurate
    scales (`sample`) hide the period."""

    def __init__(self, seed: int, size: int = 512, res: float = 0.1, cells_px: tuple[int, ...] = (64, 16, 4),
                 gains: tuple[float, ...] = (0.5, 0.3, 0.2)):
        ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        tex = np.zeros((size, size), np.float32)
        for k, (c, g) in enumerate(zip(cells_px, gains)):
            if size % c:
                raise ValueError(f"NoiseTexture: octave cell {c} px must divide the size {size}")
            tex += np.float32(g) * value_noise(jj, ii, c, seed * 7919 + k, period=size // c)
        self.tex, self.size, self.res = tex, size, float(res)

    def lookup(self, x: np.ndarray, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Texture value at points (metres), nearest texel, float32 (...)."""
        k = 1.0 / (self.res * scale)
        i = np.floor(np.asarray(y) * k).astype(np.int64) % self.size
        j = np.floor(np.asarray(x) * k).astype(np.int64) % self.size
        return self.tex[i, j]

    def sample(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Aperiodic-looking noise in about [-1, 1] at points (metres)."""
        return 0.7 * self.lookup(x, y) + 0.5 * self.lookup(y + 17.3, x - 5.1, scale=2.718)
