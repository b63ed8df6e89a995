"""SNAP model benchmark: time and peak memory to map one scene and localize one query, per preset.

For each preset (`cpu-tiny`, `paper`) a fresh subprocess (so that its peak RSS is its own) builds
the model with random weights in eval mode and a synthetic scene at the preset's sizes: the
`scene.num_views` views come from a 4-camera rig (front, left, back, right) at two stops along a
road through the scene, plus aerial and semantic rasters and one query. It times
- `map_s`: `SNAP.map` of the scene (B = 1): street-view volume, vertical pooling, aerial and
  semantic encoders, fusion and heads;
- `localize_s`: `SNAP.localize` of one query (query BEV + RANSAC localizer, the preset's samples);
- for cpu-tiny also `train_step_s`: one `SNAP.loss` forward + backward + Adam step at the preset's
  training batch size (what a training run costs per step).
Medians over `--runs` runs after one warm-up. Times are wall-clock with 2 threads; peak RSS is
the subprocess's maximum resident set (model, inputs and activations).

With `--device cuda` the model, batches and random generator live on the GPU, every preset also
times its training step (`train_step_s`, and `train_step_bf16_s` under bfloat16 autocast), each
timing ends with a CUDA synchronize, and `peak_gpu_mb_*` is torch's peak allocated memory.

    python benchmarks/bench_model.py [--presets cpu-tiny paper] [--runs 3] [--device cpu|cuda]

Progress goes to stderr; the LAST stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

THREADS = 2


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def synthetic_batch(cfg, B: int = 1, seed: int = 0) -> dict:
    """A SceneDataset-like batch for `cfg` (random images, realistic camera layout)."""
    import torch

    from neuralmaps import geometry
    from neuralmaps.config import CLASS_NAMES

    g = torch.Generator().manual_seed(seed)
    sc = cfg.scene
    V, (H, W) = sc.num_views, sc.image_hw
    sx, sy, _ = sc.size_m
    X, Y = round(sx / sc.cell_m), round(sy / sc.cell_m)
    f = 0.5 * W / math.tan(math.radians(sc.hfov_deg) / 2)
    cam = torch.tensor([W, H, f, f, W / 2, H / 2, 0.0, 0.0])
    poses = []
    for v in range(V):
        stop, direction = divmod(v, 4)
        xy = torch.tensor([sx * (stop + 1) / (V // 4 + 1), sy / 2])
        yaw = torch.tensor(math.pi / 2 * direction + 0.1)
        poses.append(geometry.bev_pose_to_camera(geometry.Transform2D(yaw, xy), sc.map_camera_height_m).matrix())
    T_views = torch.stack(poses)[None].expand(B, V, 4, 4).clone()
    q_xy = torch.tensor([sx / 2, sy / 2]) + torch.rand(B, 2, generator=g) * 2 - 1
    q_yaw = torch.rand(B, generator=g) * 2 * math.pi
    T_query = geometry.bev_pose_to_camera(geometry.Transform2D(q_yaw, q_xy), sc.query_camera_height_m).matrix()
    return {
        "map_images": torch.rand(B, V, 3, H, W, generator=g),
        "map_T_scene_view": T_views,
        "map_cameras": cam.expand(B, V, 8).clone(),
        "map_view_mask": torch.ones(B, V, dtype=torch.bool),
        "aerial": torch.rand(B, 3, X, Y, generator=g),
        "semantic": (torch.rand(B, len(CLASS_NAMES), X, Y, generator=g) > 0.8).float(),
        "query_image": torch.rand(B, 3, H, W, generator=g),
        "query_T_scene_cam": T_query,
        "query_camera": cam.expand(B, 8).clone(),
    }


def worker(preset_name: str, runs: int, device: str = "cpu", overrides: list[str] | None = None) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from neuralmaps.config import preset
    from neuralmaps.devices import DeviceError, resolve_device, to_device
    from neuralmaps.models import SNAP

    try:
        device = resolve_device(device)
    except DeviceError as e:
        raise SystemExit(f"--{e}") from None
    cuda = device.type == "cuda"

    cfg = preset(preset_name).with_overrides(overrides or [])
    torch.manual_seed(0)
    model = SNAP(cfg).eval().to(device)
    batch = to_device(synthetic_batch(cfg), device)
    out = {
        "preset": preset_name,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "scene_cells": [round(s / cfg.scene.cell_m) for s in cfg.scene.size_m],
        "views": cfg.scene.num_views,
        "image_hw": list(cfg.scene.image_hw),
    }

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        fn()  # warm-up
        ts = []
        for _ in range(runs):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def peak_gpu_mb() -> int:
        return round(torch.cuda.max_memory_allocated(device) / 2**20)

    with torch.no_grad():
        _log(f"[{preset_name}] map ...")
        out["map_s"] = round(timed(lambda: model.map(batch)), 3)
        nm = model.map(batch)
        _log(f"[{preset_name}] localize ...")
        g = torch.Generator(device).manual_seed(0)
        out["localize_s"] = round(timed(lambda: model.localize(batch, nm, generator=g)), 3)
    out["map_valid_fraction"] = round(float(nm.valid.float().mean()), 3)
    out["total_s"] = round(out["map_s"] + out["localize_s"], 3)
    out["peak_rss_mb_inference"] = round(_rss_mb())
    if cuda:
        out["peak_gpu_mb_inference"] = peak_gpu_mb()
    if preset_name == "cpu-tiny" or cuda:  # paper's step on 2 CPU threads would take minutes
        _log(f"[{preset_name}] train step (B={cfg.train.batch_size}) ...")
        model.train()
        tb = to_device(synthetic_batch(cfg, B=cfg.train.batch_size, seed=1), device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        g = torch.Generator(device).manual_seed(1)

        def step(dtype=None):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model.loss(tb, generator=g)["total"]
            opt.zero_grad()
            loss.backward()
            opt.step()

        out["train_batch"] = cfg.train.batch_size
        try:
            out["train_step_s"] = round(timed(step), 3)
            out["peak_rss_mb_train"] = round(_rss_mb())
            if cuda:
                out["peak_gpu_mb_train"] = peak_gpu_mb()
                out["train_step_bf16_s"] = round(timed(lambda: step(torch.bfloat16)), 3)
        except torch.OutOfMemoryError as e:  # a result too: this preset's step does not fit here
            out["train_step_error"] = f"out of memory: {str(e).splitlines()[0]}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["cpu-tiny", "paper"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda[:N]")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every preset, e.g. model.train_query_points=1024")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.runs, args.device, args.set)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), OMP_WAIT_POLICY="PASSIVE")
    results = []
    for name in args.presets:
        _log(f"running {name} in a subprocess ...")
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--runs", str(args.runs), "--device", args.device,
             *(["--set", *args.set] if args.set else [])],
            env=env, stdout=subprocess.PIPE, text=True,
        )
        if proc.returncode != 0:
            _log(f"{name}: worker failed with exit code {proc.returncode}")
            results.append({"preset": name, "error": f"exit code {proc.returncode}"})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        _log(json.dumps(res))
        results.append(res)
    summary = {
        "benchmark": "bench_model",
        "threads": THREADS,
        "device": args.device,
        "overrides": args.set,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "results": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
