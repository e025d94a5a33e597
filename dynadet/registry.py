"""The one mapping from config ``type`` names to classes."""

from __future__ import annotations

from collections.abc import Callable

from dynadet.models.atss import ATSSHead
from dynadet.models.chain import Chain
from dynadet.models.detector import OneStageDetector
from dynadet.models.dyhead import DyHead
from dynadet.models.dynamic_stats import DynamicTrainingStats
from dynadet.models.fcos import FCOSHead
from dynadet.models.fcos_routing import FCOSRoutingHead
from dynadet.models.fpn import FPN
from dynadet.models.preprocess import Preprocessor
from dynadet.models.priors import AnchorGenerator
from dynadet.models.resnet import ResNet
from dynadet.models.retinanet import RetinaNetHead
from dynadet.models.roi_head import RoIHead
from dynadet.models.routing_heads import ATSSRoutingHead, RetinaNetRoutingHead
from dynadet.models.rpn import RPNHead
from dynadet.models.rpn_routing import RPNRoutingHead
from dynadet.models.swin import SwinTransformer
from dynadet.models.two_stage import TwoStageDetector
from dynadet.ops.roi_align import MultiScaleRoIAlign

REGISTRY: dict[str, Callable] = {
    "OneStageDetector": OneStageDetector,
    "ResNet": ResNet,
    "SwinTransformer": SwinTransformer,
    "FPN": FPN,
    "Chain": Chain,
    "DyHead": DyHead,
    "FCOSHead": FCOSHead,
    "FCOSRoutingHead": FCOSRoutingHead,
    "ATSSHead": ATSSHead,
    "RetinaNetHead": RetinaNetHead,
    "ATSSRoutingHead": ATSSRoutingHead,
    "RetinaNetRoutingHead": RetinaNetRoutingHead,
    "AnchorGenerator": AnchorGenerator,
    "Preprocessor": Preprocessor,
    "TwoStageDetector": TwoStageDetector,
    "RPNHead": RPNHead,
    "RPNRoutingHead": RPNRoutingHead,
    "RoIHead": RoIHead,
    "MultiScaleRoIAlign": MultiScaleRoIAlign,
    "DynamicTrainingStats": DynamicTrainingStats,
}
