import torch

from dynadet.models.priors import AnchorGenerator, torchvision_retinanet_sizes


def test_torchvision_retinanet_base_anchors_are_truncated_and_rounded():
    gen = AnchorGenerator(
        strides=[8, 16, 32, 64, 128],
        sizes=torchvision_retinanet_sizes(),
        ratios=[0.5, 1.0, 2.0],
        round_base=True,
    )
    assert gen.sizes[0] == [32.0, 40.0, 50.0]
    assert gen.sizes[4] == [512.0, 645.0, 812.0]
    base = gen.base_anchors(0, torch.float32, torch.device("cpu"))
    # values documented for torchvision's P3 anchors (ratio-major, then scale)
    assert base[0].tolist() == [-23, -11, 23, 11]
    assert base[1].tolist() == [-28, -14, 28, 14]
    assert base[2].tolist() == [-35, -18, 35, 18]
    assert base[3].tolist() == [-16, -16, 16, 16]
    assert base.shape == (9, 4)


def test_mmdet_octave_anchors_are_exact_floats():
    gen = AnchorGenerator(strides=[8], ratios=[1.0], octave_base_scale=4, scales_per_octave=3)
    assert torch.allclose(
        torch.tensor(gen.sizes[0]), torch.tensor([32.0, 40.3175, 50.7968]), atol=1e-3
    )


def test_layout_is_location_major_with_anchors_fastest():
    gen = AnchorGenerator(strides=[16], ratios=[0.5, 1.0], sizes=[[32]])
    (anchors,) = gen([(2, 3)], (32, 48))
    assert anchors.shape == (2 * 3 * 2, 4)
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    # location (y=0, x=1) holds anchors 2 and 3, both centred at (16, 0)
    assert centers[2].tolist() == [16.0, 0.0] and centers[3].tolist() == [16.0, 0.0]
    assert centers[6].tolist() == [0.0, 16.0]


def test_offset_half_stride_for_mmdet_points():
    gen = AnchorGenerator(strides=[8], sizes=[[8]], offset=0.5)
    (anchors,) = gen([(2, 2)], (16, 16))
    assert anchors[0].tolist() == [0.0, 0.0, 8.0, 8.0]
    assert anchors[3].tolist() == [8.0, 8.0, 16.0, 16.0]


def test_inferred_strides_follow_torchvision_rule():
    gen = AnchorGenerator(strides=[64, 128], sizes=[[64], [128]], infer_strides=True)
    # a 320-high padded image has P6 5 rows and P7 3 rows: torchvision uses 320 // 3 = 106
    assert gen.level_strides([(5, 7), (3, 4)], (320, 448)) == [(64, 64), (106, 112)]
    _, p7 = gen([(5, 7), (3, 4)], (320, 448))
    centers = (p7[:, :2] + p7[:, 2:]) / 2
    assert centers[5].tolist() == [112.0, 106.0]
