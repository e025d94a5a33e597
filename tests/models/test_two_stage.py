"""Two-stage detector end to end: a tiny Faster R-CNN trains, infers batched and unbatched, and
the Faster / Dynamic R-CNN presets build with the expected module tree."""

import pytest
import torch

from dynadet.api import build_model
from dynadet.config import load_config
from dynadet.data.synthetic import render_scene
from dynadet.models.fpn import FPN
from dynadet.models.preprocess import Preprocessor
from dynadet.models.priors import AnchorGenerator
from dynadet.models.resnet import ResNet
from dynadet.models.roi_head import RoIHead
from dynadet.models.rpn import RPNHead
from dynadet.models.two_stage import TwoStageDetector
from dynadet.ops.roi_align import MultiScaleRoIAlign


def _tiny(num_classes=5, **roi_kwargs) -> TwoStageDetector:
    backbone = ResNet(depth=18, out_indices=(0, 1, 2, 3), frozen_stages=-1, norm="bn",
                      norm_eval=False, base_width=8)
    neck = FPN(backbone.out_channels, 16, extra_blocks="maxpool", init="xavier")
    anchors = AnchorGenerator([4, 8, 16, 32, 64], ratios=[0.5, 1.0, 2.0], octave_base_scale=8)
    # fewer proposals and RoIs than the recipe keep the test fast
    few = {"nms_pre": 300, "max_per_img": 150}
    rpn = RPNHead(anchors, in_channels=16, feat_channels=16, train_proposals=few,
                  test_proposals=few)
    extractor = MultiScaleRoIAlign(7, 0, True, (4, 8, 16, 32), level_mapping="mmdet")
    roi_head = RoIHead(num_classes, extractor, in_channels=16, fc_channels=32, num_samples=128,
                       **roi_kwargs)
    return TwoStageDetector(backbone, rpn, roi_head, Preprocessor(min_size=128, max_size=192),
                            neck=neck)


def _scenes(seeds, h=120, w=160):
    images, targets = [], []
    for s in seeds:
        sc = render_scene(s, h, w, size_range=(20, 60))
        images.append(torch.from_numpy(sc.image).permute(2, 0, 1).float())
        targets.append(
            {"boxes": torch.from_numpy(sc.boxes), "labels": torch.from_numpy(sc.labels)}
        )
    return images, targets


def test_tiny_faster_rcnn_trains_and_loss_goes_down():
    torch.manual_seed(0)
    model = _tiny().train()
    images, targets = _scenes([1, 2])
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    totals = []
    for _ in range(10):
        losses = model(images, targets)
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert min(totals[-3:]) < 0.5 * totals[0], totals
    assert sum(totals[-5:]) < sum(totals[:5]), totals


def test_empty_and_crowded_images_train():
    torch.manual_seed(1)
    model = _tiny().train()
    images, targets = _scenes([3, 4])
    targets[0] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    xy = torch.stack(torch.meshgrid(torch.arange(12.0), torch.arange(15.0), indexing="ij"), -1)
    xy = xy.reshape(-1, 2).flip(1) * 10
    targets[1] = {"boxes": torch.cat([xy, xy + 12], 1), "labels": torch.arange(180) % 3}
    losses = model(images, targets)  # 180 boxes: more than the 128 positive RoI slots
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_eval_returns_valid_results_and_batching_does_not_change_them():
    torch.manual_seed(2)
    # a low score threshold so that an untrained model still returns detections
    model = _tiny(score_thresh=0.0, max_per_img=50).eval()
    images, _ = _scenes([5, 6])
    with torch.no_grad():
        batched = model(images)
        single = [model([im])[0] for im in images]
    for b, s in zip(batched, single, strict=True):
        assert set(b) == {"boxes", "scores", "labels"}
        assert b["boxes"].shape == (50, 4) and b["labels"].dtype == torch.long
        assert (b["labels"] >= 0).all() and (b["labels"] < 5).all()
        assert (b["scores"][:-1] >= b["scores"][1:]).all()
        # original image coordinates (the model saw the images resized to 128 x 170)
        assert (b["boxes"] >= 0).all() and (b["boxes"][:, 2] <= 160 + 1e-3).all()
        assert (b["boxes"][:, 3] <= 120 + 1e-3).all() and b["boxes"][:, 2].max() > 128
        torch.testing.assert_close(b["scores"], s["scores"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b["boxes"], s["boxes"], atol=1e-3, rtol=1e-4)
        assert torch.equal(b["labels"], s["labels"])


def test_training_needs_targets():
    model = _tiny().train()
    images, _ = _scenes([7])
    with pytest.raises(ValueError, match="needs targets"):
        model(images)


SMALL = ["model.preprocess.min_size=96", "model.preprocess.max_size=128",
         "model.roi_head.num_classes=5"]


def test_faster_rcnn_preset_builds_with_reference_module_tree():
    cfg = load_config("faster_rcnn_r50_fpn_1x")
    model = build_model(cfg)
    assert isinstance(model, TwoStageDetector) and model.num_classes == 80
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("backbone.")}
    assert shapes["rpn.conv.weight"] == (256, 256, 3, 3)
    assert shapes["rpn.cls_logits.weight"] == (3, 256, 1, 1)
    assert shapes["rpn.bbox_pred.weight"] == (12, 256, 1, 1)
    assert shapes["roi_head.box_head.fc6.weight"] == (1024, 12544)
    assert shapes["roi_head.box_head.fc7.weight"] == (1024, 1024)
    assert shapes["roi_head.cls_score.weight"] == (81, 1024)
    assert shapes["roi_head.bbox_pred.weight"] == (320, 1024)
    assert len([k for k in shapes if k.startswith("neck.")]) == 16
    assert len(shapes) == 16 + 6 + 8
    # mmdet's pytorch-style backbone: layer1 frozen, BN statistics frozen, later affine trained
    assert "backbone.layer4.2.bn3.num_batches_tracked" in state
    assert not model.backbone.layer1[0].conv1.weight.requires_grad
    assert model.backbone.layer2[0].bn1.weight.requires_grad
    model.train()
    assert not model.backbone.layer2[0].bn1.training
    assert model.rpn.train_proposals.nms_pre == 2000 and model.rpn.test_proposals.nms_pre == 1000
    assert model.roi_head.roi_extractor.level_mapping == "mmdet"


def test_dynamic_rcnn_preset_trains_logs_statistics_and_leaves_them_alone_in_eval():
    torch.manual_seed(3)
    cfg = load_config("dynamic_rcnn_r50_fpn_1x", SMALL + [
        "model.backbone.depth=18", "+model.backbone.base_width=8",
        "model.neck.in_channels=[8,16,32,64]", "model.neck.out_channels=16",
        "model.rpn.in_channels=16", "model.rpn.feat_channels=16",
        "model.roi_head.in_channels=16", "model.roi_head.fc_channels=32",
    ])
    model = build_model(cfg)
    dynamic = model.roi_head.dynamic
    assert model.rpn.train_proposals.nms_thresh == 0.85
    assert model.rpn.test_proposals.nms_thresh == 0.85
    assert dynamic.iou_thresh.item() == 0.5 and dynamic.beta.item() == 1.0
    model.train()
    images, targets = _scenes([8, 9])
    losses = model(images, targets)
    assert losses["iou_thresh"].item() == 0.5 and losses["beta"].item() == 1.0
    assert not losses["iou_thresh"].requires_grad
    assert int(dynamic.num_updates) == 1
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    model.eval()
    before = {k: v.clone() for k, v in dynamic.state_dict().items()}
    with torch.no_grad():
        model(images)
    assert all(torch.equal(v, before[k]) for k, v in dynamic.state_dict().items())
