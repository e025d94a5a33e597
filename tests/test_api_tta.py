"""``test.tta`` in the config switches the Detector's inference to multi-scale + flip TTA."""

import torch

from dynadet.api import Detector
from dynadet.models.tta import TestTimeAugmentation

TINY = ["model.backbone.base_width=8", "model.neck.out_channels=16",
        "model.neck.in_channels=[16,32,64]",
        "model.head.in_channels=16", "model.head.feat_channels=16", "model.head.num_convs=1",
        "model.neck.norm=none", "model.head.norm=none"]


def test_tta_from_config_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    plain = Detector.from_config("quickstart_fcos", TINY)
    assert plain.runner is plain.model
    path = plain.save(tmp_path / "w")
    tta = Detector.from_checkpoint(path, ["test.tta={scales: [96, 128], flip: true}"])
    assert isinstance(tta.runner, TestTimeAugmentation)
    assert tta.runner.detector is tta.model
    image = torch.randint(0, 255, (3, 90, 120), dtype=torch.uint8).float()
    pred = tta.predict(image)
    assert pred.boxes.shape[1] == 4
    assert (pred.boxes[:, 2] <= 120 + 1e-3).all() and (pred.boxes[:, 3] <= 90 + 1e-3).all()
    # saving keeps the plain detector's keys
    again = Detector.from_checkpoint(tta.save(tmp_path / "w2"))
    assert set(again.model.state_dict()) == set(plain.model.state_dict())
