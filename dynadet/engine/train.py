"""The iteration-based training loop (single process or DDP under torchrun)."""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dynadet.api import build_model
from dynadet.config import save_config
from dynadet.data.categories import resolve_class_names
from dynadet.engine import distributed as dist_utils
from dynadet.engine.amp import resolve_amp
from dynadet.engine.logger import MetricsLogger, plot_run
from dynadet.engine.optim import ModelEMA, build_optimizer, build_scheduler
from dynadet.engine.state import (
    last_checkpoint,
    load_training_state,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)

log = logging.getLogger("dynadet")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_datasets(cfg: dict[str, Any], train: bool = True):
    """The train (or val) data set of the ``data`` config section."""
    from dynadet.data.coco import CocoDetection
    from dynadet.data.transforms import build_transforms

    data = cfg.get("data") or {}
    name = "train" if train else "val"
    split = data.get(name) or {}
    if not split.get("ann_file") or not split.get("image_dir"):
        raise ValueError(
            f"no {name} data set: set data.{name}.ann_file=PATH/TO/COCO.json and "
            f"data.{name}.image_dir=PATH/TO/IMAGES (e.g. from `dynadet data synth OUT`)"
        )
    return CocoDetection(
        split["ann_file"],
        split["image_dir"],
        transforms=build_transforms(data.get("augment"), train=train),
        filter_empty=bool(data.get("filter_empty", True)) if train else False,
        skip_bad_images=bool(data.get("skip_bad_images", False)),
        cache_images=bool(data.get("cache_images", False)),
    )


class Trainer:
    """Trains the ``model`` of a resolved config on its ``data`` with its ``train`` section.

    Args:
        cfg: resolved config (``model``, ``data``, ``train``, optional ``classes``).
        run_dir: output folder (config, checkpoints, metrics, plots, evaluations).
        resume: continue from ``run_dir/checkpoints/last`` if present.
        device: ``"cpu"``, ``"cuda"``; default CUDA when available.
    """

    def __init__(
        self,
        cfg: dict[str, Any],
        run_dir: str | Path,
        resume: bool = False,
        device: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.tcfg: dict[str, Any] = dict(cfg.get("train") or {})
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.distributed = dist_utils.init_distributed()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and self.distributed:
            device = f"cuda:{torch.cuda.current_device()}"
        self.device = torch.device(device)
        self.main = dist_utils.is_main_process()

    # ---------------------------------------------------------------- setup
    def _check_output_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise OSError(f"cannot write to the run folder {self.run_dir}: {e}") from e

    def setup(self) -> None:
        t = self.tcfg
        seed = int(t.get("seed", 0))
        seed_everything(seed + dist_utils.get_rank())
        if self.main:
            self._check_output_dir()
        self.model: nn.Module = build_model(self.cfg).to(self.device)
        self.class_names = resolve_class_names(self.cfg.get("classes"), self.model.num_classes)
        self.max_iters = int(t.get("max_iters", 1000))
        self.accumulate = int(t.get("accumulate", 1))
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t, self.max_iters)
        self.ema = ModelEMA(self.model, float(t["ema"])) if t.get("ema") else None
        self.precision = resolve_amp(t.get("amp", False), self.device)
        self.amp = self.precision.scaler  # fp16: gradient scaler, which skips non-finite steps
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if self.precision.enabled and self.main:
            log.info("mixed precision: %s autocast on %s", self.precision.name, self.device.type)
        self.start_iter = 0
        if self.resume:
            self._load_last()
        self.ddp_model = self.model
        if self.distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(t.get("find_unused_parameters", False)),
            )
        world = dist_utils.get_world_size()
        total = int(t.get("batch_size", 2))
        if total % (world * self.accumulate):
            raise ValueError(
                f"train.batch_size={total} is not divisible by world size {world} "
                f"× accumulate {self.accumulate}"
            )
        self.batch_per_step = total // (world * self.accumulate)
        from dynadet.data.loader import build_train_loader

        self.dataset = build_datasets(self.cfg, train=True)
        data = self.cfg.get("data") or {}
        self.loader = build_train_loader(
            self.dataset,
            self.batch_per_step,
            num_workers=int(data.get("num_workers", 0)),
            seed=seed,
            aspect_grouping=bool(data.get("aspect_grouping", True)),
            start_iter=self.start_iter * self.accumulate,
        )
        if self.main:
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.logger = (
            MetricsLogger(self.run_dir, tensorboard=bool(t.get("tensorboard", True)))
            if self.main
            else None
        )
        if self.logger is not None and self.start_iter:
            self.logger.truncate_after(self.start_iter)

    def _load_last(self) -> None:
        path = last_checkpoint(self.run_dir)
        if path is None:
            log.info("resume: no checkpoint in %s, starting from scratch", self.run_dir)
            return
        from dynadet.engine.checkpoint import load_checkpoint

        weights, _, _, _ = load_checkpoint(path)
        self.model.load_state_dict(weights, strict=True)
        state = load_training_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.start_iter = int(state["iteration"])
        if self.main:
            print(f"resumed from {path} at iteration {self.start_iter}")

    # ---------------------------------------------------------------- saving
    def save(self, iteration: int) -> Path | None:
        if not self.main:
            return None
        state = {
            "iteration": iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        weights = (
            self.ema.state
            if self.ema is not None and self.tcfg.get("save_ema")
            else self.model.state_dict()
        )
        path = save_training_checkpoint(
            self.run_dir,
            iteration,
            weights,
            self.cfg,
            self.class_names,
            state,
            keep=int(self.tcfg.get("keep_checkpoints", 3)),
        )
        self.last_saved = path
        return path

    # ---------------------------------------------------------------- loop
    def step(self, batch_iter) -> dict[str, float]:
        """One optimizer step over ``accumulate`` micro-batches; returns logged values."""
        self.ddp_model.train()
        totals: dict[str, float] = {}
        for micro in range(self.accumulate):
            images, targets = next(batch_iter)
            images = [im.to(self.device, non_blocking=True) for im in images]
            targets = [
                {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()}
                for t in targets
            ]
            sync = nullcontext()
            if self.distributed and micro < self.accumulate - 1:
                sync = self.ddp_model.no_sync()
            with sync, torch.autocast(
                self.device.type,
                dtype=self.precision.dtype,
                enabled=self.precision.enabled,
            ):
                out = self.ddp_model(images, targets)
                loss = sum(v for k, v in out.items() if k.startswith("loss"))
                self.scaler.scale(loss / self.accumulate).backward()
            for k, v in dist_utils.reduce_dict(
                {k: v.detach().float() for k, v in out.items()}
            ).items():
                totals[k] = totals.get(k, 0.0) + float(v) / self.accumulate
        totals["loss"] = sum(v for k, v in totals.items() if k.startswith("loss"))
        if not math.isfinite(totals["loss"]):
            return totals
        clip = self.tcfg.get("grad_clip")
        if clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.grad is not None]
            totals["grad_norm"] = float(nn.utils.clip_grad_norm_(params, float(clip)))
            if not self.amp and not math.isfinite(totals["grad_norm"]):
                return totals  # a finite loss with a NaN gradient: no step, run() stops
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return totals

    def run(self) -> dict[str, Any]:
        self.setup()
        t = self.tcfg
        ckpt_period = int(t.get("checkpoint_period", 0)) or self.max_iters
        self.eval_period = int(t.get("eval_period", 0))
        # num_evals: that many evaluations spread evenly, the last at the end (re-planned when a
        # time budget moves the end); otherwise every eval_period iterations and at the end.
        planned = _spread(0, self.max_iters, int(t.get("num_evals") or 0))
        self.eval_points = [p for p in planned if p > self.start_iter] or planned[-1:]
        log_period = max(1, int(t.get("log_period", 20)))
        self.last_saved: Path | None = None
        bar = tqdm(
            total=self.max_iters,
            initial=self.start_iter,
            disable=not self.main,
            dynamic_ncols=True,
            desc="train",
        )
        batch_iter = iter(self.loader)
        result: dict[str, Any] = {"run_dir": str(self.run_dir)}
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        budget = t.get("time_budget_s")
        # The first fit measures the pace over the first iterations of the warm-up (50, or half
        # the warm-up if shorter; at least 5), so the cosine/step schedule is laid out before
        # it starts; later fits (after evaluations) only correct drifts of more than 2 %.
        calibration = max(5, min(50, int(t.get("warmup_iters", 0)) // 2))
        eval_total = 0.0
        it = self.start_iter
        while it < self.max_iters:
            values = self.step(batch_iter)
            problem = self._non_finite(values)
            if problem:
                raise self._diverged(
                    f"{problem} at iteration {it + 1} "
                    f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())})"
                )
            values["lr"] = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[
                0
            ].get("lr_factor", 1.0)
            done = it + 1
            bar.update(1)
            if budget and done == self.start_iter + calibration:
                spent = time.perf_counter() - start
                self._fit_budget(done, float(budget) - spent, spent / calibration, bar)
                ckpt_period = min(ckpt_period, self.max_iters)
            if self.main and (done % log_period == 0 or done == self.max_iters or done == 1):
                bar.set_postfix(
                    {k: f"{v:.3f}" for k, v in values.items() if k.startswith("loss")}
                    | {"lr": f"{values['lr']:.2e}"}
                )
                self.logger.log("train", done, values)
            if done % ckpt_period == 0 or done == self.max_iters:
                self._check_finite_weights(done)
                self.save(done)
            if self._eval_due(done):
                eval_start = time.perf_counter()
                metrics = self.evaluate(done)
                eval_s = time.perf_counter() - eval_start
                eval_total += eval_s
                if metrics is not None:
                    result["metrics"] = metrics
                if budget and done < self.max_iters:
                    # Re-fit with the measured pace and evaluation time: the first fit saw
                    # neither warm caches nor an evaluation.
                    evals_left = self._evals_left(done)
                    spent = time.perf_counter() - start
                    self._fit_budget(
                        done,
                        float(budget) - spent - evals_left * eval_s,
                        (spent - eval_total) / (done - self.start_iter),
                        bar,
                    )
            if done % ckpt_period == 0:
                dist_utils.barrier()
            it = done
        bar.close()
        result["seconds"] = time.perf_counter() - start
        result["iterations"] = self.max_iters
        if self.main:
            plot_run(self.run_dir)
            self.logger.close()
        return result

    def _eval_due(self, done: int) -> bool:
        if self.eval_points:
            return done in self.eval_points
        return bool(self.eval_period) and (done % self.eval_period == 0 or done == self.max_iters)

    def _evals_left(self, done: int) -> int:
        """Evaluations still to come after iteration ``done``."""
        if self.eval_points:
            return sum(p > done for p in self.eval_points)
        if not self.eval_period:
            return 0
        return -(-(self.max_iters - done) // self.eval_period)

    def _non_finite(self, values: dict[str, float]) -> str | None:
        """What makes a step unusable: a NaN/inf loss, or a NaN/inf gradient norm (without
        AMP, whose scaler skips such steps itself)."""
        if not math.isfinite(values["loss"]):
            return f"loss is {values['loss']}"
        norm = values.get("grad_norm", 0.0)
        if not self.amp and not math.isfinite(norm):
            return f"gradient norm is {norm} with a finite loss"
        return None

    def _diverged(self, what: str) -> TrainingDiverged:
        where = self.last_saved or last_checkpoint(self.run_dir)
        return TrainingDiverged(
            f"{what}; last good checkpoint: {where if where else 'none saved yet'}"
        )

    def _check_finite_weights(self, iteration: int) -> None:
        """Never save non-finite weights (a NaN gradient with a finite loss, unclipped).

        Every rank checks its own (identical under DDP) copy, so all ranks stop together."""
        flags = [torch.isfinite(v).all() for v in self.model.state_dict().values()
                 if v.is_floating_point()]  # fmt: skip
        if flags and not bool(torch.stack(flags).all()):
            raise self._diverged(
                f"the weights are not finite after iteration {iteration}; not saving them"
            )

    def _fit_budget(self, done: int, remaining_s: float, per_iter: float, bar: tqdm) -> None:
        """Set ``max_iters`` so training ends within ``train.time_budget_s`` (quickstart):
        ``done`` iterations plus as many as ``remaining_s`` seconds hold at ``per_iter`` seconds
        each, never more than the configured ``max_iters``. The schedule is rebuilt for the new
        length (warm-up and the remaining decay keep their shape). Runs after a few calibration
        iterations and again after every evaluation, whose time it then knows, when the end
        moves by more than 2 %."""
        configured = int(self.tcfg.get("max_iters", 1000))
        new_max = max(done + 1, min(configured, done + int(remaining_s / max(per_iter, 1e-9))))
        first = self.max_iters == configured
        if new_max == self.max_iters or (
            not first and abs(new_max - self.max_iters) <= 0.02 * self.max_iters
        ):
            return
        evals_left = self._evals_left(done)
        self.max_iters = new_max
        self.scheduler = build_scheduler(self.optimizer, self.tcfg, new_max)
        self.scheduler.last_epoch = done - 1
        self.scheduler.step()
        if self.eval_points:  # the evaluations still to come, spread over the new remainder
            self.eval_points = [p for p in self.eval_points if p <= done]
            self.eval_points += _spread(done, new_max, evals_left)
        bar.total = new_max
        bar.refresh()

    def evaluate(self, iteration: int) -> dict[str, float] | None:
        from dynadet.data.loader import build_eval_loader
        from dynadet.engine.evaluate import evaluate

        if not hasattr(self, "val_dataset"):
            self.val_dataset = build_datasets(self.cfg, train=False)
        loader = build_eval_loader(
            self.val_dataset,
            batch_size=int(self.tcfg.get("eval_batch_size", 2)),
            num_workers=int((self.cfg.get("data") or {}).get("num_workers", 0)),
        )
        model = self.model
        if self.ema is not None:
            model = build_model(self.cfg).to(self.device)
            model.load_state_dict(self.ema.state)
        res = evaluate(
            model,
            loader,
            self.val_dataset.coco,
            self.val_dataset.category_ids,
            self.val_dataset.class_names,
            output_dir=self.run_dir / "eval" / f"iter_{iteration:07d}",
            progress=self.main,
            device=self.device,
        )
        if res is None:
            return None
        self.logger.log("eval", iteration, res.metrics)
        plot_run(self.run_dir)
        return dict(res.metrics)


def _spread(start: int, end: int, count: int) -> list[int]:
    """``count`` iterations evenly spaced in ``(start, end]``, the last one ``end``."""
    if count <= 0 or end <= start:
        return []
    return sorted({start + -(-(end - start) * k // count) for k in range(1, count + 1)})


def train(
    cfg: dict[str, Any], run_dir: str | Path, resume: bool = False, device: str | None = None
) -> dict[str, Any]:
    """Train and return a summary (run folder, seconds, last metrics)."""
    trainer = Trainer(cfg, run_dir, resume=resume, device=device)
    try:
        return trainer.run()
    finally:
        dist_utils.cleanup()
