"""DynamicTrainingStats: hand-worked updates, both reference semantics, resume mid-window."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dynadet.models.dynamic_stats import DynamicTrainingStats


def _targets(*errors: float) -> Tensor:
    """Positives whose mean(|tx|, |ty|) are ``errors`` (w/h deltas large, must be ignored)."""
    e = torch.tensor(errors, dtype=torch.float32)
    return torch.stack([e, -e, torch.full_like(e, 9.0), torch.full_like(e, -9.0)], dim=1)


def _no_pos() -> Tensor:
    return torch.zeros(0, 4)


def _ious(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _values(s: DynamicTrainingStats) -> tuple[float, float]:
    return s.as_dict()["iou_thresh"], s.as_dict()["beta"]


# ------------------------------------------------------------------ hand-worked single updates


def test_iou_statistic_mmdet_is_mean_of_per_image_kth_largest() -> None:
    s = DynamicTrainingStats(iou_topk=2, beta_topk=1, interval=1)
    # image 0: 2nd largest of (0.9, 0.5, 0.7, 0.1) = 0.7; image 1 has fewer than K: its min 0.6
    s.update([_ious(0.9, 0.5, 0.7, 0.1), _ious(0.6)], _no_pos())
    assert s.iou_thresh.item() == pytest.approx(0.65)


def test_iou_statistic_official_is_kth_largest_of_the_concatenation() -> None:
    s = DynamicTrainingStats(iou_topk=2, beta_topk=1, interval=1, mode="official")
    # (K_I * 2 images) = 4th largest of (0.9, 0.7, 0.6, 0.5, 0.1) = 0.5
    s.update([_ious(0.9, 0.5, 0.7, 0.1), _ious(0.6)], _no_pos())
    assert s.iou_thresh.item() == pytest.approx(0.5)
    # fewer proposals than K_I * B: the smallest one
    s.update([_ious(0.8, 0.9), _ious(0.7)], _no_pos())
    assert s.iou_thresh.item() == pytest.approx(0.7)


def test_images_without_proposals_are_left_out_of_the_mean() -> None:
    s = DynamicTrainingStats(iou_topk=1, interval=1)
    s.update([_ious(), _ious(0.8, 0.6), _ious(0.5)], _no_pos())
    assert s.iou_thresh.item() == pytest.approx(0.65)
    s.update([_ious(), _ious()], _no_pos())  # nothing recorded: the window keeps the threshold
    assert s.iou_thresh.item() == pytest.approx(0.65)


def test_beta_statistic_is_kth_smallest_center_error() -> None:
    s = DynamicTrainingStats(iou_topk=1, beta_topk=1, interval=1)
    # 2 images -> the 2nd smallest of (0.3, 0.1, 0.5) = 0.3; |tw|, |th| = 9 are ignored
    s.update([_ious(0.7), _ious(0.7)], _targets(0.3, 0.1, 0.5))
    assert s.beta.item() == pytest.approx(0.3)
    # K_beta * B = 4 > P = 2: the largest of what there is
    s.update([_ious(0.7), _ious(0.7)], _targets(0.05, 0.2))
    assert s.beta.item() == pytest.approx(0.2)


def test_floor_and_cap() -> None:
    s = DynamicTrainingStats(iou_topk=1, beta_topk=1, interval=1, initial_iou=0.4,
                             initial_beta=1.0)  # fmt: skip
    s.update([_ious(0.3)], _targets(2.5))
    assert _values(s) == pytest.approx((0.4, 1.0))
    s.update([_ious(0.45)], _targets(0.7))
    assert _values(s) == pytest.approx((0.45, 0.7))


# ------------------------------------------------------------------ windows


def test_values_change_only_every_interval_and_use_the_window_mean() -> None:
    s = DynamicTrainingStats(iou_topk=1, beta_topk=1, interval=3)
    assert _values(s) == pytest.approx((0.4, 1.0))  # official first threshold
    for iou, err in [(0.5, 0.4), (0.6, 0.2)]:
        s.update([_ious(iou)], _targets(err))
        assert _values(s) == pytest.approx((0.4, 1.0))
    s.update([_ious(0.7)], _targets(0.3))
    assert _values(s) == pytest.approx((0.6, 0.3))  # mean(0.5, 0.6, 0.7), median(0.4, 0.2, 0.3)
    assert (s.num_updates.item(), s.iou_count.item(), s.beta_count.item()) == (3, 0, 0)
    # the next window starts empty
    for iou in (0.9, 0.8, 0.7):
        s.update([_ious(iou)], _targets(0.5))
    assert _values(s) == pytest.approx((0.8, 0.5))


def test_first_iou_option() -> None:
    s = DynamicTrainingStats(interval=2, first_iou=0.5)  # MMDetection's assigner value
    s.update([_ious(0.45)], _no_pos())
    assert s.iou_thresh.item() == pytest.approx(0.5)
    s.update([_ious(0.43)], _no_pos())
    assert s.iou_thresh.item() == pytest.approx(0.44)


def test_no_positives_keep_beta() -> None:
    s = DynamicTrainingStats(iou_topk=1, beta_topk=1, interval=2)
    s.update([_ious(0.5)], _targets(0.3))
    s.update([_ious(0.5)], _targets(0.5))
    assert s.beta.item() == pytest.approx(0.4)
    s.update([_ious(0.5)], _no_pos())
    s.update([_ious(0.5)], _no_pos())
    assert s.beta.item() == pytest.approx(0.4) and s.beta_count.item() == 0
    # a window with some empty iterations uses the recorded ones only
    s.update([_ious(0.5)], _no_pos())
    s.update([_ious(0.5)], _targets(0.25))
    assert s.beta.item() == pytest.approx(0.25)


@pytest.mark.parametrize("mode", ["mmdet", "official"])
def test_tiny_median_keeps_previous_beta(mode: str) -> None:
    s = DynamicTrainingStats(iou_topk=1, beta_topk=1, interval=3, mode=mode)
    for err in (0.0, 0.0, 0.5):  # GT-as-proposals give exact zeros
        s.update([_ious(0.5)], _targets(err))
    assert s.beta.item() == 1.0
    for err in (1e-16, 0.2, 0.0):
        s.update([_ious(0.5)], _targets(err))
    assert s.beta.item() == 1.0  # median 1e-16 < 1e-15
    for err in (0.3, 2e-15, 0.0):
        s.update([_ious(0.5)], _targets(err))
    assert s.beta.item() == pytest.approx(2e-15)


@pytest.mark.parametrize(("mode", "even", "odd"), [("mmdet", 0.25, 0.2), ("official", 0.3, 0.2)])
def test_median_semantics(mode: str, even: float, odd: float) -> None:
    s = DynamicTrainingStats(iou_topk=1, beta_topk=1, interval=4, mode=mode)
    for err in (0.4, 0.1, 0.3, 0.2):
        s.update([_ious(0.5)], _targets(err))
    assert s.beta.item() == pytest.approx(even)  # np.median 0.25 vs sorted[4 // 2] = 0.3
    for err in (0.4, 0.1, None, 0.2):  # 3 recorded values: both give the middle one
        s.update([_ious(0.5)], _no_pos() if err is None else _targets(err))
    assert s.beta.item() == pytest.approx(odd)


def test_eval_mode_does_nothing() -> None:
    s = DynamicTrainingStats(iou_topk=1, interval=1).eval()
    s.update([_ious(0.9)], _targets(0.1))
    assert _values(s) == pytest.approx((0.4, 1.0)) and s.num_updates.item() == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        DynamicTrainingStats(mode="detectron")
    with pytest.raises(ValueError, match="interval"):
        DynamicTrainingStats(interval=0)
    with pytest.raises(ValueError, match="pos_targets"):
        DynamicTrainingStats().update([_ious(0.5)], torch.zeros(3, 2))


# ------------------------------------------------------------------ against the references


def _reference(mode: str, sequence: list, k_i: int, k_b: int, interval: int) -> list:
    """The references' Python-list code (mmdet DynamicRoIHead / official train loop), float64."""
    thr, beta, s_iou, s_beta, out = 0.4, 1.0, [], [], []
    for step, (ious, errors) in enumerate(sequence, start=1):
        ious = [np.asarray(i, dtype=np.float64) for i in ious]
        if mode == "mmdet":
            kth = [np.sort(i)[::-1][min(k_i, len(i)) - 1] for i in ious if len(i)]
            if kth:
                s_iou.append(np.mean(kth))
        else:
            cat = np.sort(np.concatenate(ious))[::-1]
            if len(cat):
                s_iou.append(cat[min(k_i * len(ious), len(cat)) - 1])
        if len(errors):
            e = np.sort(np.abs(np.asarray(errors, dtype=np.float64)[:, :2]).mean(axis=1))
            s_beta.append(e[min(k_b * len(ious), len(e)) - 1])
        if step % interval == 0:
            if s_iou:
                thr = max(0.4, float(np.mean(s_iou)))
            med = (np.median(s_beta) if mode == "mmdet" else sorted(s_beta)[len(s_beta) // 2]
                   ) if s_beta else None  # fmt: skip
            if med is not None and med >= 1e-15:
                beta = min(1.0, float(med))
            s_iou, s_beta = [], []
        out.append((thr, beta))
    return out


def random_sequence(seed: int, steps: int, max_imgs: int = 3) -> list:
    """Random iterations: some images with fewer proposals than K, some without positives."""
    rng = random.Random(seed)
    sequence = []
    for _ in range(steps):
        n_imgs = rng.randint(1, max_imgs)
        ious = [[rng.random() for _ in range(rng.choice([0, 3, 8, 20]))] for _ in range(n_imgs)]
        if not any(ious):
            ious[0] = [rng.random()]
        n_pos = rng.choice([0, 1, 5, 12])
        errors = [[rng.uniform(-1, 1) * rng.choice([0.0, 1.0]) for _ in range(4)]
                  for _ in range(n_pos)]  # fmt: skip
        sequence.append((ious, errors))
    return sequence


def _feed(s: DynamicTrainingStats, item: tuple) -> None:
    ious, errors = item
    s.update([torch.tensor(i, dtype=torch.float32) for i in ious],
             torch.tensor(errors, dtype=torch.float32).reshape(-1, 4))  # fmt: skip


@pytest.mark.parametrize("mode", ["mmdet", "official"])
def test_matches_reference_code_on_random_sequences(mode: str) -> None:
    sequence = random_sequence(seed=3, steps=40)
    expected = _reference(mode, sequence, k_i=5, k_b=2, interval=4)
    s = DynamicTrainingStats(iou_topk=5, beta_topk=2, interval=4, mode=mode)
    got = []
    for item in sequence:
        _feed(s, item)
        got.append(_values(s))
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-6, atol=1e-7)
    assert len({b for _, b in expected}) > 3 and len({t for t, _ in expected}) > 3


# ------------------------------------------------------------------ state and resume


@pytest.mark.parametrize("mode", ["mmdet", "official"])
def test_resume_mid_window_continues_exactly(tmp_path: Path, mode: str) -> None:
    sequence = random_sequence(seed=7, steps=23)
    straight = DynamicTrainingStats(iou_topk=5, beta_topk=2, interval=5, mode=mode)
    expected = []
    for item in sequence:
        _feed(straight, item)
        expected.append(_values(straight))

    first = DynamicTrainingStats(iou_topk=5, beta_topk=2, interval=5, mode=mode)
    for item in sequence[:12]:  # stop inside the third window
        _feed(first, item)
    assert first.iou_count.item() == 2
    save_file(first.state_dict(), str(tmp_path / "stats.safetensors"))  # how checkpoints store it
    resumed = DynamicTrainingStats(iou_topk=5, beta_topk=2, interval=5, mode=mode)
    resumed.load_state_dict(load_file(str(tmp_path / "stats.safetensors")))
    got = expected[:12]
    for item in sequence[12:]:
        _feed(resumed, item)
        got.append(_values(resumed))
    assert got == expected  # bit-exact
    assert torch.equal(resumed.iou_history, straight.iou_history)


def test_all_state_is_in_buffers() -> None:
    s = DynamicTrainingStats(interval=7)
    assert set(s.state_dict()) == {"iou_thresh", "beta", "num_updates", "iou_history",
                                   "iou_count", "beta_history", "beta_count"}  # fmt: skip
    assert s.iou_history.shape == s.beta_history.shape == (7,)
    assert s.iou_thresh.shape == s.beta.shape == ()


def test_weights_without_the_state_load_strictly() -> None:
    """Converted reference weights never had this state: keep the initial values."""
    parent = torch.nn.Module()
    parent.stats = DynamicTrainingStats()
    parent.fc = torch.nn.Linear(2, 2)
    state = {k: v for k, v in parent.state_dict().items() if k.startswith("fc.")}
    parent.load_state_dict(state, strict=True)
    # but a partial state is an error
    state["stats.beta"] = torch.tensor(0.5)
    with pytest.raises(RuntimeError, match="iou_thresh"):
        parent.load_state_dict(state, strict=True)


def test_update_reads_nothing_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """No .item()/.tolist()/bool() on tensors inside update() (no host sync on CUDA)."""
    s = DynamicTrainingStats(iou_topk=2, beta_topk=1, interval=2)
    calls = []
    for name in ("item", "tolist", "__bool__"):
        original = getattr(Tensor, name)

        def spy(self, *a, _orig=original, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(Tensor, name, spy)
    for _ in range(3):
        s.update([_ious(0.9, 0.5, 0.7), _ious(0.6)], _targets(0.3, 0.1))
    monkeypatch.undo()
    assert calls == []
    assert _values(s) == pytest.approx((0.65, 0.3))
