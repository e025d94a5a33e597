"""Preprocessor sizes: training vs inference long-side caps (test_max_size)."""

import torch

from dynadet.models.preprocess import Preprocessor
from dynadet.models.tta import TestTimeAugmentation


def test_train_and_test_long_side_caps():
    pre = Preprocessor(min_size=[1200], max_size=1400, test_min_size=800, test_max_size=1333)
    image = torch.zeros(3, 500, 1000)  # long side 2x the short side
    pre.train()
    assert tuple(pre([image]).tensor.shape[-2:]) == (704, 1408)   # 700x1400, padded to 32
    pre.eval()
    assert tuple(pre([image]).tensor.shape[-2:]) == (672, 1344)   # 666x1333 (cap 1333)
    plain = Preprocessor(min_size=[1200], max_size=1400, test_min_size=800).eval()
    # without test_max_size, inference keeps the training cap: 700x1400
    assert tuple(plain([image]).tensor.shape[-2:]) == (704, 1408)


def test_tta_overrides_and_restores_test_max_size():
    seen = []

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.preprocess = Preprocessor(min_size=800, max_size=1400, test_max_size=1333)

        def forward(self, images):
            p = self.preprocess
            seen.append((p.test_min_size, p.max_size, p.test_max_size))
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                     "labels": torch.zeros(0, dtype=torch.long)} for _ in images]

    stub = Stub().eval()
    tta = TestTimeAugmentation(stub, scales=(600, 1000), max_size=2000, flip=False).eval()
    tta([torch.zeros(3, 50, 60)])
    assert seen == [(600, 2000, None), (1000, 2000, None)]
    pre = stub.preprocess
    assert (pre.test_min_size, pre.max_size, pre.test_max_size) == (800, 1400, 1333)
