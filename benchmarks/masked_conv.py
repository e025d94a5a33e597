"""Sparse (masked) vs dense 3×3 conv + GroupNorm + ReLU, as FGDH runs its depth path at inference.

    python benchmarks/masked_conv.py [--threads 1] [--repeat 3] [--batches 1 8]
                                     [--densities 1 5 10 25 50 100] [--device cpu]

One 256→256 3×3 conv (no bias) → GN(32) with statistics over the active pixels → ReLU on
256×100×168 maps (P3 of an 800×1344 input), masks drawn uniformly at random at each density.
Columns, all computing the same numbers:

* ``dense``: ``conv2d`` on the whole map, masked GN, ReLU, ``× mask`` (``dense_threshold=0``);
* ``sparse``: the gather → GEMM → scatter path forced (``dense_threshold=2``);
* ``auto``: the default, which falls back to ``dense`` above ``DEFAULT_DENSE_THRESHOLD``;
* ``conv+GN``: plain ``conv2d`` → ``group_norm`` → ReLU (the training op; different numbers
  unless every pixel is active), as the cost of ignoring the gates altogether.

Runs of the three paths are interleaved and the median is reported, so machine load hits them
alike. On a shared CPU pass ``--threads 1``: with two OpenMP threads and a busy neighbour, every
parallel region waits for a descheduled thread and small ops take milliseconds.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

from dynadet.ops.masked_conv import DEFAULT_DENSE_THRESHOLD, masked_conv_gn
from dynadet.tools.benchmark import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--densities", type=float, nargs="+", default=[1, 5, 10, 25, 50, 100])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, nargs=2, default=[100, 168])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    c, (h, w) = args.channels, args.size

    torch.manual_seed(0)
    weight = torch.randn(c, c, 3, 3, device=device) * 0.02
    norm = nn.GroupNorm(32, c).to(device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"torch {torch.__version__} on {device} ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} thread(s), load average before {load[0]:.2f}; "
        f"{c}→{c} 3×3 + GN(32, masked stats) + ReLU on {h}×{w}; "
        f"DEFAULT_DENSE_THRESHOLD={DEFAULT_DENSE_THRESHOLD}; median of {args.repeat}\n"
    )
    print(
        "| batch | density % | conv+GN ms | dense ms | sparse ms | auto ms "
        "| dense / sparse | auto / dense | auto / conv+GN |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for n in args.batches:
            x = torch.randn(n, c, h, w, device=device)
            for density in args.densities:
                g = torch.Generator().manual_seed(int(density * 10))
                mask = (torch.rand(n, 1, h, w, generator=g) < density / 100).to(device)

                def run(
                    threshold: float, x: torch.Tensor = x, mask: torch.Tensor = mask
                ) -> torch.Tensor:
                    return masked_conv_gn(
                        x, mask, weight, None, norm, True, "masked", dense_threshold=threshold
                    )

                def plain(x: torch.Tensor = x) -> torch.Tensor:
                    return F.relu(norm(F.conv2d(x, weight, padding=1)))

                t = interleaved_medians(
                    {
                        "plain": plain,
                        "dense": lambda: run(0.0),
                        "sparse": lambda: run(2.0),
                        "auto": lambda: run(DEFAULT_DENSE_THRESHOLD),
                    },
                    args.repeat,
                    device,
                )
                print(
                    f"| {n} | {density:g} | {t['plain']:.1f} | {t['dense']:.1f} | "
                    f"{t['sparse']:.1f} | {t['auto']:.1f} | {t['dense'] / t['sparse']:.2f}× | "
                    f"{t['auto'] / t['dense']:.2f}× | {t['auto'] / t['plain']:.2f}× |",
                    flush=True,
                )
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\nload average after: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min)")


if __name__ == "__main__":
    main()
