"""Run logging: JSON-lines metrics, optional TensorBoard, PNG plots of losses and AP."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON object per record to ``run/metrics.jsonl`` (and TensorBoard if present).

    Records have a ``type`` (``"train"`` or ``"eval"``) and an ``iter``.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.writer = None

    def log(self, kind: str, iteration: int, values: Mapping[str, float]) -> None:
        record = {"type": kind, "iter": iteration, **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{kind}/{k}", float(v), iteration)

    def truncate_after(self, iteration: int) -> None:
        """Drop records past ``iteration`` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        kept = [
            json.dumps(record)
            for record in _parse_lines(self.path.read_text())
            if record["iter"] <= iteration
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _parse_lines(text: str) -> list[dict[str, Any]]:
    """JSON-lines records; a line torn by a killed process (or any non-record) is skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int):
            records.append(record)
    return records


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return _parse_lines(path.read_text())


# Logged training statistics of the dynamic methods, plotted in plots/dynamics.png.
DYNAMIC_KEYS = ("iou_thresh", "beta", "complexity_ratio", "rpn_complexity_ratio")


def plot_run(run_dir: Path) -> list[Path]:
    """Write ``plots/loss.png`` (every loss term) and ``plots/ap.png`` (AP over evaluations)."""
    from dynadet.engine.plot import line_chart

    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    out_dir = Path(run_dir) / "plots"
    written = []
    train = [r for r in records if r.get("type") == "train"]
    if train:
        keys = sorted({k for r in train for k in r if k.startswith("loss")})
        series = {k: [(r["iter"], r[k]) for r in train if k in r] for k in keys}
        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(
            line_chart(
                series, out_dir / "loss.png", "training loss", ylabel="loss (log scale)", log_y=True
            )
        )
    dyn = {k: [(r["iter"], r[k]) for r in train if k in r] for k in DYNAMIC_KEYS}
    dyn = {k: v for k, v in dyn.items() if v}
    if dyn:
        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(
            line_chart(
                dyn, out_dir / "dynamics.png",
                "dynamic training statistics (Dynamic R-CNN IoU threshold / beta, FGDH "
                "executed-cost ratio)", ylabel="value",
            )  # fmt: skip
        )
    evals = [r for r in records if r.get("type") == "eval" and r.get("AP") is not None]
    if evals:
        series = {
            k: [(r["iter"], r[k]) for r in evals if r.get(k) is not None]
            for k in ("AP", "AP50", "AP75")
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(
            line_chart(
                series, out_dir / "ap.png", "COCO AP on the validation split", ylabel="AP (%)"
            )
        )
    return written
