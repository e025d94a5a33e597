"""Head wall time of FGDH Dynamic D8 (gates forced to a density) vs Fix D8, beside the FLOPs ratio.

    python benchmarks/fgdh.py [--size 800 1344] [--density 0.3] [--pattern blobs|uniform]
                              [--variants 4] [--repeat 3] [--threads 0] [--device cpu]

Both heads are built from their presets (``fgdh_r50_fcos_fix_d8_1x``,
``fgdh_r50_fcos_dynamic_d8_mid_1x``) with random weights and run in eval mode on the same random
P3–P7 features of an ``H × W`` input (800 × 1344: the padded COCO test size). No trained weights
are available here, so every spatial gate of the dynamic head is replaced by
:class:`ForcedDensityGate`: the real gate conv still runs (its cost is part of the head), then
its output is kept (clamped to ≥ 0.5) on a mask of the requested density and zeroed elsewhere.
Each gate cycles through ``--variants`` masks per level, one per call, so the sparse convs see
new row counts from call to call as they do from image to image (with one fixed mask,
shape-specialised kernels would be reused more than in real use). ``blobs`` masks are
thresholded smooth noise — gates of a trained model open on objects, in connected regions — so
the 3×3 dilation of conv1's mask adds only a rim; ``uniform`` masks are i.i.d. pixels (worst
case: the dilation opens most of the map). The depth path then runs through the masked conv
(sparse gather → GEMM → scatter below ``DEFAULT_DENSE_THRESHOLD`` active pixels, all levels of a
layer in one batch); scale paths, gates and resizes stay dense, as in the reference.

Printed: the head's cost in README units (tower MACs / 2^30, executed for the dynamic head;
mean over the masks), all counted head MACs (towers, gates, resizes, predictors;
:mod:`dynadet.tools.flops`), the median head time (runs interleaved), and the realised speed-up
relative to the counted-MACs speed-up (target ≥ 0.7).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynadet.config import build, load_config
from dynadet.models.routing import SpatialGate
from dynadet.registry import REGISTRY
from dynadet.tools.benchmark import interleaved_medians
from dynadet.tools.flops import PAPER_UNIT, MacCounter, level_sizes

FIX, DYNAMIC = "fgdh_r50_fcos_fix_d8_1x", "fgdh_r50_fcos_dynamic_d8_mid_1x"


class ForcedDensityGate(SpatialGate):
    """Wraps a :class:`SpatialGate`: ``[N, C, H, W] → [N, 1, H, W]``, open (≥ 0.5) on a fixed
    mask with a ``density`` fraction of open pixels per image, exactly 0 elsewhere."""

    def __init__(
        self, gate: SpatialGate, density: float, pattern: str, seed: int, variants: int = 1
    ) -> None:
        super().__init__(gate.conv.in_channels, gate.tau)
        self.load_state_dict(gate.state_dict())
        self.density = density
        self.pattern = pattern
        self.seed = seed
        self.variants = variants
        self._masks: dict[tuple[int, ...], list[Tensor]] = {}
        self._calls: dict[tuple[int, ...], int] = {}

    def mask(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A ``[N, 1, H, W]`` 0/1 mask with ``round(density·H·W)`` ones per image: the next of
        ``variants`` masks drawn once per shape (so the row counts of the sparse convs change
        from call to call, as they do from image to image)."""
        if shape not in self._masks:
            n, _, h, w = shape
            g = torch.Generator().manual_seed(self.seed * 1000 + h)
            masks = []
            for _ in range(self.variants):
                if self.pattern == "blobs":
                    coarse = torch.rand(n, 1, h // 8 + 2, w // 8 + 2, generator=g)
                    noise = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
                else:
                    noise = torch.rand(n, 1, h, w, generator=g)
                k = round(self.density * h * w)
                order = noise.flatten(1).argsort(dim=1, descending=True)[:, :k]
                flat = torch.zeros(n, h * w).scatter_(1, order, 1.0)
                masks.append(flat.view(n, 1, h, w).to(like))
            self._masks[shape] = masks
        calls = self._calls.get(shape, 0)
        self._calls[shape] = calls + 1
        return self._masks[shape][calls % self.variants]

    def activate(self, logits: Tensor) -> Tensor:
        gate = super().activate(logits)
        return gate.clamp(min=0.5) * self.mask(tuple(gate.shape), gate)


def force_density(head: nn.Module, density: float, pattern: str, variants: int = 1) -> int:
    """Replace every :class:`SpatialGate` in ``head``; returns how many were replaced."""
    targets = [
        (parent, name, child)
        for parent in head.modules()
        for name, child in parent.named_children()
        if isinstance(child, SpatialGate) and not isinstance(child, ForcedDensityGate)
    ]
    for i, (parent, name, child) in enumerate(targets):
        setattr(parent, name, ForcedDensityGate(child, density, pattern, i, variants))
    return len(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1344], metavar=("H", "W"))
    parser.add_argument("--density", type=float, default=0.3, help="open-gate fraction (0.3)")
    parser.add_argument("--pattern", choices=("blobs", "uniform"), default="blobs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", type=int, default=4,
                        help="masks per gate and level, cycled call by call (4)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    heads = {}
    for label, preset in (("Fix D8", FIX), ("Dynamic D8", DYNAMIC)):
        heads[label] = build(load_config(preset)["model"]["head"], REGISTRY).to(device).eval()
    replaced = force_density(heads["Dynamic D8"], args.density, args.pattern, args.variants)
    sizes = level_sizes(*args.size, heads["Fix D8"].anchor_generator.strides)
    features = [torch.randn(1, 256, h, w, device=device) for h, w in sizes]

    counted, paper, fraction = {}, {}, 0.0
    with torch.inference_mode():
        for label, head in heads.items():
            passes = args.variants if label == "Dynamic D8" else 1  # mean over the masks
            executed = 0.0
            with MacCounter(head) as counter:
                for _ in range(passes):
                    head(features)
                    executed += float(head.last_cost.executed[0]) / passes
            counted[label] = counter.report().macs / passes
            paper[label] = executed / PAPER_UNIT
            fraction = executed / float(head.last_cost.full[0])  # the dynamic head's, last
        times = interleaved_medians(
            {label: (lambda head=head: head(features)) for label, head in heads.items()},
            args.repeat, device,
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__} on {device} ({platform.machine()}), "
        f"{torch.get_num_threads()} thread(s), load {load:.2f}; input {args.size[0]}×"
        f"{args.size[1]} (P3 {sizes[0][0]}×{sizes[0][1]}); {replaced} gates forced to density "
        f"{args.density:g} ({args.pattern}, {args.variants} masks each, cycled); executed "
        f"tower fraction {fraction:.3f}; median of {args.repeat}\n"
    )
    print("| head | README FLOPs (tower MACs/2^30) | counted head GMACs | time ms |")
    print("|:---|---:|---:|---:|")
    for label in heads:
        print(f"| {label} | {paper[label]:.1f} | {counted[label] / 1e9:.1f} | "
              f"{times[label]:.1f} |")
    flops_speedup = counted["Fix D8"] / counted["Dynamic D8"]
    paper_speedup = paper["Fix D8"] / paper["Dynamic D8"]
    time_speedup = times["Fix D8"] / times["Dynamic D8"]
    realised = time_speedup / flops_speedup
    print(
        f"\nspeed-up Fix/Dynamic: counted MACs {flops_speedup:.2f}×, README FLOPs "
        f"{paper_speedup:.2f}×, wall time {time_speedup:.2f}×; realised / MACs speed-up "
        f"{realised:.2f} (target ≥ 0.7: {'met' if realised >= 0.7 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
