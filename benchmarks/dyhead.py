"""ATSS R50-FPN with and without DyHead: network forward time and MACs/FLOPs in one run.

    python benchmarks/dyhead.py [--size 800 1344] [--repeat 3] [--threads 0] [--device cpu]

Builds ``atss_r50_fpn_1x`` (FPN → ATSS head with 4-conv GN towers, 3×3 predictors) and
``dyhead_r50_atss_fpn_1x`` (FPN → 6 DyHead blocks → ATSS head without towers, 1×1 predictors),
random weights, eval mode, batch 1. Both run on the same normalised ``H × W`` tensor (800 × 1344:
a COCO image resized to 800/1333 and padded to 32; P3–P7 are the ceil-halvings DyHead needs), so
the timed call is the network only — ``head(features(x))``: backbone, neck, head; no decoding or
NMS, whose cost depends on the random scores.

MACs come from :class:`dynadet.tools.flops.MacCounter` (FLOPs = 2 × MACs; the DCNs are counted
as their conv MACs plus 4 MACs per bilinear sample; norms, activations, attention elementwise
ops are not counted). The reference note (``reference/dyhead.md`` §5) quotes about +20 G for
the 6-block head over ATSS's towers (≈ +20 GMAC derived at 896 × 1408). Forward times are
medians of interleaved runs. On a shared CPU pass ``--threads 1``.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from torch import Tensor, nn

from dynadet.api import build_model
from dynadet.config import load_config
from dynadet.tools.benchmark import interleaved_medians
from dynadet.tools.flops import MacCounter

MODELS = {
    "ATSS R50-FPN": "atss_r50_fpn_1x",
    "ATSS R50-FPN + DyHead ×6": "dyhead_r50_atss_fpn_1x",
}


def network(model: nn.Module, x: Tensor) -> object:
    """Backbone, neck and head of a one-stage detector on a preprocessed batch."""
    return model.head(model.features(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1344], metavar=("H", "W"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {
        label: build_model(load_config(preset)).to(device).eval()
        for label, preset in MODELS.items()
    }
    x = torch.randn(1, 3, *args.size, device=device) * 50

    macs: dict[str, dict[str, int]] = {}
    with torch.inference_mode():
        for label, model in models.items():
            with MacCounter(model) as counter:
                network(model, x)
            report = counter.report(tuple(x.shape))
            macs[label] = {"total": report.macs, **report.parts}
        times = interleaved_medians(
            {label: (lambda m=model: network(m, x)) for label, model in models.items()},
            args.repeat, device,
        )

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__} on {device} ({platform.machine()}), "
        f"{torch.get_num_threads()} thread(s), load {load:.2f}; input 1×3×{args.size[0]}×"
        f"{args.size[1]}; GMACs (FLOPs = 2 × MACs); median of {args.repeat}\n"
    )
    print("| model | backbone | FPN | DyHead | head | total GMACs | total GFLOPs | forward ms |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|")
    for label, m in macs.items():
        fpn = m.get("neck.0", m.get("neck", 0))
        dyhead = m.get("neck.1", 0)
        print(
            f"| {label} | {m['backbone'] / 1e9:.2f} | {fpn / 1e9:.2f} | {dyhead / 1e9:.2f} | "
            f"{m['head'] / 1e9:.2f} | {m['total'] / 1e9:.2f} | {2 * m['total'] / 1e9:.2f} | "
            f"{times[label]:.0f} |"
        )
    base, dy = (macs[k] for k in MODELS)
    t_base, t_dy = (times[k] for k in MODELS)
    head_side = dy.get("neck.1", 0) + dy["head"] - base["head"]
    print(
        f"\nDyHead / ATSS: MACs {dy['total'] / base['total']:.2f}×, forward time "
        f"{t_dy / t_base:.2f}×; DyHead blocks + head − ATSS head = {head_side / 1e9:+.1f} GMACs "
        f"({2 * head_side / 1e9:+.1f} GFLOPs); reference: about +20 G"
    )


if __name__ == "__main__":
    main()
