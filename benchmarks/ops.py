"""Time dynadet's pure-PyTorch ops against the dense / naive alternative, in one run.

    python benchmarks/ops.py [--repeat 7] [--threads 0] [--json out.json]

Rows (shapes of the core issue's targets):
  * batched NMS, 1000 and 5000 boxes over 80 classes (thr 0.5) vs a greedy loop over the sorted
    boxes (the textbook pure-PyTorch NMS); target ≤ 20 ms.
  * modulated DCNv2 256→256 3×3 on 1×256×100×168 vs a dense ``conv2d`` of the same shape;
    target ≤ 5× the dense conv.
  * RoIAlign of 1024 RoIs (7×7, aligned, sampling ratio 0 and 2) on 2×256×200×336 (scale 1/4)
    vs a per-RoI loop; target ≤ 500 ms.
When torchvision's compiled ops load (e.g. in the peer environment), their times are added.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dynadet.ops.boxes import box_iou
from dynadet.ops.deform_conv import deform_conv2d
from dynadet.ops.nms import batched_nms
from dynadet.ops.roi_align import roi_align


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def detector_boxes(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Boxes like a detector's pre-NMS output on an 800×1333 image."""
    g = torch.Generator().manual_seed(seed)
    ctr = torch.rand(n, 2, generator=g) * torch.tensor([1333.0, 800.0])
    wh = 10 + torch.rand(n, 2, generator=g) * 290
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], 1)
    return boxes, torch.rand(n, generator=g), torch.randint(classes, (n,), generator=g)


def greedy_loop_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, thr: float
) -> torch.Tensor:
    """The textbook loop: keep the best box, drop what overlaps it, repeat."""
    offset = idxs.to(boxes) * (boxes.max() - boxes.min() + 1)
    shifted = boxes + offset[:, None]
    order = scores.argsort(descending=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        if order.numel() == 1:
            break
        iou = box_iou(shifted[i][None], shifted[order[1:]])[0]
        order = order[1:][iou <= thr]
    return torch.stack(keep)


def random_rois(k: int, n_images: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ctr = torch.rand(k, 2, generator=g) * torch.tensor([1344.0, 800.0])
    wh = 16 + torch.rand(k, 2, generator=g) * 400
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], 1)
    idx = torch.randint(n_images, (k, 1), generator=g).float()
    return torch.cat([idx, boxes], 1)


def torchvision_ops():
    try:
        import torchvision.ops as tvo

        tvo.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
        return tvo
    except Exception:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tvo = torchvision_ops()
    rows = []

    def add(
        op: str,
        shape: str,
        ours: float,
        base_name: str,
        base: float,
        target: str,
        tv: float | None = None,
    ) -> None:
        rows.append(
            {
                "op": op,
                "shape": shape,
                "ours_ms": ours,
                "baseline": base_name,
                "baseline_ms": base,
                "ratio": ours / base,
                "target": target,
                "torchvision_ms": tv,
            }
        )

    with torch.inference_mode():
        for n in (1000, 5000):
            boxes, scores, idxs = detector_boxes(n, 80)
            keep = batched_nms(boxes, scores, idxs, 0.5)
            ref = greedy_loop_nms(boxes, scores, idxs, 0.5)
            assert torch.equal(keep.sort().values, ref.sort().values), "NMS mismatch"
            ours = timeit(lambda b=boxes, s=scores, i=idxs: batched_nms(b, s, i, 0.5), args.repeat)
            base = timeit(
                lambda b=boxes, s=scores, i=idxs: greedy_loop_nms(b, s, i, 0.5),
                max(1, args.repeat // 3),
            )
            tv = None
            if tvo is not None:
                tv = timeit(
                    lambda b=boxes, s=scores, i=idxs: tvo.batched_nms(b, s, i, 0.5), args.repeat
                )
            add("batched_nms", f"{n} boxes × 80 classes", ours, "greedy loop", base, "≤ 20 ms", tv)

        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 256, 100, 168, generator=g)
        w = torch.randn(256, 256, 3, 3, generator=g) * 0.02
        b = torch.zeros(256)
        offset = torch.randn(1, 18, 100, 168, generator=g) * 2
        mask = torch.rand(1, 9, 100, 168, generator=g)
        ours = timeit(lambda: deform_conv2d(x, offset, w, b, padding=1, mask=mask), args.repeat)
        base = timeit(lambda: F.conv2d(x, w, b, padding=1), args.repeat)
        tv = None
        if tvo is not None:
            tv = timeit(
                lambda: tvo.deform_conv2d(x, offset, w, b, padding=1, mask=mask), args.repeat
            )
        add(
            "deform_conv2d (DCNv2)",
            "1×256×100×168, 256→256 3×3",
            ours,
            "dense conv2d",
            base,
            "≤ 5× dense",
            tv,
        )

        feat = torch.randn(2, 256, 200, 336, generator=g)
        rois = random_rois(1024, 2)
        for ratio in (0, 2):
            ours = timeit(lambda r=ratio: roi_align(feat, rois, 7, 0.25, r, True), args.repeat)
            base = timeit(
                lambda r=ratio: [
                    roi_align(feat, rois[i : i + 1], 7, 0.25, r, True) for i in range(rois.shape[0])
                ],
                1,
                warmup=0,
            )
            tv = None
            if tvo is not None:
                tv = timeit(
                    lambda r=ratio: tvo.roi_align(feat, rois, 7, 0.25, r, True), args.repeat
                )
            add(
                "roi_align",
                f"1024 RoIs 7×7 on 2×256×200×336, ratio {ratio}",
                ours,
                "per-RoI loop",
                base,
                "≤ 500 ms",
                tv,
            )

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    header = "| op | shape | ours (ms) | baseline | baseline (ms) | ours / baseline | target |"
    if tvo is not None:
        header += " torchvision compiled (ms) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        line = (
            f"| {r['op']} | {r['shape']} | {r['ours_ms']:.1f} | {r['baseline']} | "
            f"{r['baseline_ms']:.1f} | {r['ratio']:.3g} | {r['target']} |"
        )
        if tvo is not None:
            line += f" {r['torchvision_ms']:.1f} |"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
