"""Cost of the score network on the model grid: forward time, score-norm features at L levels,
and achieved GFLOP/s against a plain Conv3d measured in the same run.

    python benchmarks/score_forward.py [--channels 16 32 64] [--levels 20] [--repeats 5]

Times are medians of ``--repeats`` runs on the stated machine (threads = all cores). Forward
times with contiguous and channels-last 3D memory layout; features as the inference path runs
them (channels-last), on the full grid and on the brain's bounding box (template mask).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch
from torch import nn

from SpatialMSMALib.score import GeometricNoiseSchedule, ScoreUNet, score_norm_features
from SpatialMSMALib.score.features import crop_around
from SpatialMSMALib.template import DEFAULT_SHAPE, template_on_grid


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def conv_flops(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor) -> float:
    """Multiply-adds x 2 of every convolution in one forward pass (hooks)."""
    total = 0.0

    def hook(module, inputs, output):
        nonlocal total
        kernel = module.weight[0, 0].numel()
        if isinstance(module, nn.ConvTranspose3d):  # each input voxel scatters a kernel
            total += 2.0 * inputs[0].numel() * module.out_channels * kernel
        else:  # each output voxel gathers in_channels x kernel inputs
            total += 2.0 * output.numel() * (module.in_channels // module.groups) * kernel

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
    with torch.inference_mode():
        model(x, sigma)
    for h in handles:
        h.remove()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--levels", type=int, default=20)
    parser.add_argument("--sigmas-per-pass", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ScoreUNet(3, 2, tuple(args.channels)).eval()
    x = torch.randn(1, 2, *DEFAULT_SHAPE)
    sigma = torch.tensor([0.1])
    flops = conv_flops(model, x, sigma)
    channels_last = torch.channels_last_3d

    def forward(net, inp):
        def run():
            with torch.inference_mode():
                net(inp, sigma)
        return run

    forward_s = median_seconds(forward(model, x), args.repeats)
    plain = nn.Conv3d(16, 16, 3, padding=1).eval()
    xp = torch.randn(1, 16, *DEFAULT_SHAPE)
    plain_flops = 2.0 * 16 * 16 * 27 * xp[0, 0].numel()
    plain_s = median_seconds(forward(lambda a, _: plain(a), xp), args.repeats)
    model.to(memory_format=channels_last)
    plain.to(memory_format=channels_last)
    forward_cl_s = median_seconds(forward(model, x.contiguous(memory_format=channels_last)),
                                  args.repeats)
    plain_cl_s = median_seconds(
        forward(lambda a, _: plain(a), xp.contiguous(memory_format=channels_last)), args.repeats)
    sigmas = GeometricNoiseSchedule(num_levels=args.levels).sigmas
    brain = template_on_grid().brain_mask
    features_full_s = median_seconds(
        lambda: score_norm_features(model, x[0], sigmas, sigmas_per_pass=args.sigmas_per_pass),
        args.repeats,
    )
    features_brain_s = median_seconds(
        lambda: score_norm_features(model, x[0], sigmas, sigmas_per_pass=args.sigmas_per_pass,
                                    mask=brain),
        args.repeats,
    )
    region = crop_around(brain, 8)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads "
                   f"{torch.get_num_threads()}, no GPU",
        "grid": list(DEFAULT_SHAPE),
        "brain_crop": [s.stop - s.start for s in region],
        "channels": args.channels,
        "parameters": sum(p.numel() for p in model.parameters()),
        "network_gflop": round(flops / 1e9, 2),
        "forward_s": round(forward_s, 3),
        "forward_channels_last_s": round(forward_cl_s, 3),
        "network_gflops_per_s": round(flops / forward_s / 1e9, 1),
        "network_channels_last_gflops_per_s": round(flops / forward_cl_s / 1e9, 1),
        "plain_conv3d_gflops_per_s": round(plain_flops / plain_s / 1e9, 1),
        "plain_conv3d_channels_last_gflops_per_s": round(plain_flops / plain_cl_s / 1e9, 1),
        f"features_L{args.levels}_full_grid_s": round(features_full_s, 2),
        f"features_L{args.levels}_brain_crop_s": round(features_brain_s, 2),
        "sigmas_per_pass": args.sigmas_per_pass,
        "repeats": args.repeats,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
