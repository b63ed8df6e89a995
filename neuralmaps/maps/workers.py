"""Dask workers for map builds and queries: the client, and the model shipped once per worker.

A model travels as its `SNAP.save` bytes in a `ModelPlugin` (one copy per worker, loaded on the
worker's device) and is found again by its key (`model_sha256`) with `worker_model`; `dask_client`
gives the caller's client, one connected to a scheduler, or an embedded LocalCluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["ModelPlugin", "checkpoint_bytes", "dask_client", "keep_freed_memory", "load_model", "model_from_bytes",
           "model_sha256", "torch_threads_default", "worker_addresses", "worker_model"]


def load_model(checkpoint: Any):
    """A SNAP from a path, "pretrained", or a SNAP instance (returned as is)."""
    from ..models import SNAP

    if isinstance(checkpoint, SNAP):
        return checkpoint
    if isinstance(checkpoint, str) and checkpoint == "pretrained":
        if not hasattr(SNAP, "from_pretrained"):
            raise ValueError("checkpoint='pretrained': this installation has no pretrained SNAP weights "
                             "(SNAP.from_pretrained is missing); pass a checkpoint path (SNAP.save)")
        return SNAP.from_pretrained()
    return SNAP.load(checkpoint)


def checkpoint_bytes(model) -> bytes:
    """The model as a `SNAP.save` file, in memory (shipped to workers once, by the plugin)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "model.pt"
        model.save(p)
        return p.read_bytes()


def model_sha256(model) -> str:
    """sha256 of the weights (names, dtypes, shapes, bytes) and the config: stable across files."""
    h = hashlib.sha256(json.dumps(model.config.hash_dict(), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update((t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy().tobytes())
    return h.hexdigest()


_WORKER_MODELS: dict[str, Any] = {}  # per process: model key -> SNAP (tasks outside a plugin)


def keep_freed_memory() -> bool:
    """Let glibc keep freed large buffers in the heap for the next tile instead of unmapping them
    and faulting fresh zeroed pages in (mallopt M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB). Dask's
    nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, and a tile's large temporaries were then
    mapped afresh each time: 2 worker processes, 9 tiles: user 53 s + system 37 s, 77 s wall; with
    this 40 + 4 s, 37 s wall. A worker's memory stays its largest tile's peak (bounded, not growing
    with the region). No-op where there is no glibc; returns whether it applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) & bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


class ModelPlugin(WorkerPlugin):
    """Dask WorkerPlugin: loads the model once per worker, on its device (`cuda` when the worker
    has a GPU and `device="auto"`)."""

    name = "neuralmaps-model"

    def __init__(self, key: str, payload: bytes, device: str = "auto", threads: int | None = None):
        self.key, self.payload, self.device, self.threads = key, payload, device, threads

    def setup(self, worker=None):  # noqa: D401 (distributed API)
        import multiprocessing

        if multiprocessing.parent_process() is not None:  # a spawned worker, not the user's process
            keep_freed_memory()
        model = model_from_bytes(self.payload, self.device, self.threads)
        models = getattr(worker, "_neuralmaps_models", None)
        if models is None:
            models = {}
            if worker is not None:
                worker._neuralmaps_models = models
        models[self.key] = model
        _WORKER_MODELS.setdefault(self.key, model)

    def teardown(self, worker=None):
        getattr(worker, "_neuralmaps_models", {}).pop(self.key, None)


def model_from_bytes(payload: bytes, device: str, threads: int | None):
    """The SNAP saved in `payload` (`checkpoint_bytes`), in eval mode on `device`
    (`neuralmaps.devices.resolve_device`: a bad or absent device raises DeviceError first)."""
    import torch

    from ..devices import resolve_device
    from ..models import SNAP

    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "model.pt"
        p.write_bytes(payload)
        model = SNAP.load(p, map_location=dev)
    return model.eval()


def worker_model(key: str, payload_fallback: bytes | None = None, device: str = "auto"):
    """The model of `key` on this worker: the plugin's, else one loaded from `payload_fallback` and
    kept for the process (tasks run outside a plugin)."""
    try:
        from distributed import get_worker

        models = getattr(get_worker(), "_neuralmaps_models", None) or {}
        if key in models:
            return models[key]
    except (ImportError, ValueError):
        pass
    if key not in _WORKER_MODELS:
        if payload_fallback is None:
            raise RuntimeError(f"model {key[:12]} is not loaded on this worker (was the plugin registered?)")
        _WORKER_MODELS[key] = model_from_bytes(payload_fallback, device, None)
    return _WORKER_MODELS[key]


@contextlib.contextmanager
def dask_client(client: Any, workers: int, scheduler: str | None, threads_per_worker: int, processes: bool | None):
    """The given client, one connected to `scheduler`, or an embedded LocalCluster on loopback
    (dashboard off); only what is created here is closed."""
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if scheduler:
        c = Client(scheduler)
        try:
            yield c
        finally:
            c.close()
        return
    if processes is None:
        processes = workers > 1  # one worker: threads in this process (no spawn, no pickling)
    # In-process workers talk over inproc:// (no socket); process workers over loopback TCP.
    net = {"host": "127.0.0.1"} if processes else {}
    # dashboard_address=None alone still serves the scheduler's HTTP routes on 0.0.0.0:8787: keep them on
    # a free loopback port.
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=processes,
                           dashboard_address=None, silence_logs=40, **net,
                           scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
    c = Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def worker_addresses(client) -> list[str]:
    """The client's worker addresses, sorted (`n_workers=-1`: all of them, where distributed
    lists only some by default)."""
    try:
        return sorted(client.scheduler_info(n_workers=-1)["workers"])
    except TypeError:
        return sorted(client.scheduler_info()["workers"])


def torch_threads_default(client) -> bool:
    """Whether workers may keep torch's default thread count: only when there is one worker
    (several workers on one machine would oversubscribe the cores)."""
    return len(worker_addresses(client)) <= 1
