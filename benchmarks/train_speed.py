"""Fine-tuning speed against the machine's practical fp32 peak (issue 5).

One process: (1) fp32 `torch.mm` 4096² GFLOP/s; (2) seconds per image per epoch of the real
training loop (`train.finetune`: forward, the three losses, backward, fused Adam) on 6 synthetic
images, and the GFLOP/s that implies; (3) peak resident memory (and GPU memory with --device
cuda). Prints a table, then one JSON line. Times are wall clock around `finetune` (the GPU
synchronised). On CUDA, cuDNN may run the fp32 convolutions in TF32, so their share of the fp32
`torch.mm` peak can exceed 100 %.

FLOPs are counted analytically from the 13 conv shapes (2·Cin·Cout·9·H·W per forward conv):
  forward  = every conv;
  backward = weight-gradient (= forward FLOPs) for each trainable conv, plus input-gradient
             (= forward FLOPs) for each conv whose input needs a gradient, i.e. that has a
             trainable conv before it. Frozen layers are a prefix, so they cost no backward at
             all, and the first trainable conv costs 1× (weights only), the rest 2×. Their
             forward runs once per image for the whole fine-tuning (train.frozen_prefix), so
             it counts 1/epochs per image-epoch.
The saliency head, losses, pools and ReLUs are not counted (< 0.1 % of the conv FLOPs).

Usage: python benchmarks/train_speed.py [--epochs 2] [--threads N] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coseg_cli import model as M
from coseg_cli import train as T
from coseg_cli.config import CosegConfig


def physical_cores() -> int:
    """Distinct (package, core) pairs the process may run on; hyper-threads do not add FLOPs."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((base / "physical_package_id").read_text().strip(),
                       (base / "core_id").read_text().strip()))
        except OSError:
            return len(os.sched_getaffinity(0))
    return max(1, len(cores))


def matmul_peak(n: int = 4096, reps: int = 3, device: str = "cpu") -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _sync(device: str) -> None:
    """Wait for the GPU's queued work, so that wall-clock time covers it (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def train_flops_per_image(size: int, freeze_until: str, epochs: int = 1
                          ) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of one image through the 13 convs, per epoch of
    `epochs`: the frozen prefix's forward runs once per image per fine-tuning
    (`train.frozen_prefix`), so it is spread over the epochs."""
    last_frozen = -1
    if freeze_until != "none":
        last_frozen = list(M.CONV_LAYERS).index(freeze_until)
    fwd = bwd = 0.0
    for i, conv in enumerate(M.VGG16_CONVS):
        f = 2.0 * conv.in_channels * conv.out_channels * 9 * (size // conv.stride) ** 2
        if i <= last_frozen:
            fwd += f / epochs
            continue
        fwd += f
        bwd += f  # weight gradient
        if i > last_frozen + 1:
            bwd += f  # input gradient (a trainable conv lies upstream)
    return fwd, fwd + bwd


def run_setting(size: int, freeze_until: str, epochs: int, batch: int, device: str = "cpu"
                ) -> dict[str, float]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
    priors = [rng.random((size, size), dtype=np.float32) for _ in range(batch)]
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in M.vgg16_features().state_dict().items()}
    cfg = CosegConfig(image_size=size, epochs=1, batch_images=batch, freeze_until=freeze_until,
                      device=device)
    net = M.build_model(cfg, state)
    T.finetune(net, images, priors, cfg, device=device)  # warm-up: kernels, allocator
    cfg = CosegConfig(image_size=size, epochs=epochs, batch_images=batch,
                      freeze_until=freeze_until, device=device)
    _sync(device)
    t = time.perf_counter()
    T.finetune(net, images, priors, cfg, device=device)
    _sync(device)
    s_per_img = (time.perf_counter() - t) / (epochs * batch)
    _, flops = train_flops_per_image(size, freeze_until, epochs)
    out = {"s_per_img": s_per_img, "gflop_per_img": flops / 1e9,
           "gflops": flops / s_per_img / 1e9,
           "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if device.startswith("cuda"):
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (one batch each)")
    ap.add_argument("--batch", type=int, default=CosegConfig.batch_images)
    ap.add_argument("--threads", type=int, default=0, help="0 = physical cores")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = ap.parse_args()
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    peak = matmul_peak(device=args.device)
    rows = [("paper (448, all layers)", 448, "none"),
            ("448, conv1-3 frozen", 448, "conv3_3"),
            ("320, conv1-3 frozen", 320, "conv3_3"),
            ("224, conv1-3 frozen", 224, "conv3_3")]
    results = []
    for name, size, freeze in rows:
        r = run_setting(size, freeze, args.epochs, args.batch, args.device)
        results.append((name, r))
    print(f"torch {torch.__version__}, {args.device}, {threads} threads, batch {args.batch}, "
          f"{args.epochs} timed epochs; fp32 torch.mm 4096²: {peak:.1f} GFLOP/s")
    print(f"{'setting':<26}{'s/img/epoch':>12}{'GFLOP/img':>11}{'GFLOP/s':>9}"
          f"{'% peak':>8}{'maxrss GB':>11}")
    for name, r in results:
        print(f"{name:<26}{r['s_per_img']:>12.2f}{r['gflop_per_img']:>11.1f}{r['gflops']:>9.1f}"
              f"{100 * r['gflops'] / peak:>7.0f}%{r['maxrss_gb']:>11.2f}")
    paper, default = results[0][1], results[2][1]
    summary = {"device": args.device, "peak_gflops": round(peak, 1),
               "paper_s_per_img": round(paper["s_per_img"], 3),
               "paper_gflops": round(paper["gflops"], 1),
               "paper_ratio": round(paper["gflops"] / peak, 3),
               "paper_maxrss_gb": round(paper["maxrss_gb"], 2),
               "default_s_per_img": round(default["s_per_img"], 3)}
    if "gpu_peak_gb" in paper:
        summary["gpu_peak_gb"] = round(max(r["gpu_peak_gb"] for _, r in results), 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
