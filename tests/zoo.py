"""Small but architecturally faithful torchvision and timm models, with an input batch each, for the zoo tests.

Each entry builds the library's own classes (torchvision builders or their model classes with
fewer blocks / narrower widths, timm ``create_model`` with ``pretrained=False``), so every block
type of the family is there, at a size that fits a 2-core CPU in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    forward: Callable[[nn.Module], Any]  # runs one forward on a fixed batch, in the model's dtype
    fast: bool = False  # in the default (non-slow) run
    batch: Callable[[torch.dtype], tuple[tuple, dict]] | None = None


def _dtype(m: nn.Module) -> torch.dtype:
    return next(m.parameters()).dtype


def image_batch(size: int, n: int = 2) -> Callable[[torch.dtype], tuple[tuple, dict]]:
    def make(dtype: torch.dtype) -> tuple[tuple, dict]:
        g = torch.Generator().manual_seed(1)
        return (torch.randn(n, 3, size, size, generator=g).to(dtype),), {}

    return make


def _classifier(name: str, build: Callable[[], nn.Module], size: int = 64, fast: bool = False) -> ZooModel:
    batch = image_batch(size)

    def forward(m: nn.Module) -> Any:
        args, kwargs = batch(_dtype(m))
        return m(*args, **kwargs)

    return ZooModel(name, build, forward, fast, batch)


def detection_batch(size: int = 64) -> Callable[[torch.dtype], tuple[tuple, dict]]:
    def make(dtype: torch.dtype) -> tuple[tuple, dict]:
        g = torch.Generator().manual_seed(1)
        images = [torch.rand(3, size, size, generator=g).to(dtype) for _ in range(2)]
        targets = []
        for _ in images:
            masks = torch.zeros(2, size, size, dtype=torch.uint8)
            masks[0, 5:25, 10:30] = 1
            masks[1, 30:60, 15:50] = 1
            boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0], [15.0, 30.0, 50.0, 60.0]], dtype=dtype)
            targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
        return (images, targets), {}

    return make


def _detector(name: str, build: Callable[[], nn.Module], fast: bool = False) -> ZooModel:
    batch = detection_batch()

    def forward(m: nn.Module) -> Any:
        args, kwargs = batch(_dtype(m))
        return m(*args, **kwargs)

    return ZooModel(name, build, forward, fast, batch)


def _segmenter(name: str, build: Callable[[], nn.Module], fast: bool = False) -> ZooModel:
    return _classifier(name, build, size=64, fast=fast)


# ------------------------------------------------------------------------------------------
# torchvision
# ------------------------------------------------------------------------------------------


def _tv():
    import torchvision.models as tvm

    return tvm


def _vgg_bn():
    from torchvision.models.vgg import VGG, make_layers

    model = VGG(make_layers([16, "M", 32, "M", 32, 32, "M", 64, "M"], batch_norm=True), num_classes=10)
    model.classifier = nn.Sequential(  # same layer types as torchvision's, 4096 → 64 wide
        nn.Linear(64 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(),
        nn.Linear(64, 10),
    )
    return model


def _resnext():
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=10)


def _wide_resnet():
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=128, num_classes=10)


def _densenet():
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, bn_size=2, num_classes=10)


def _efficientnet():
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.34)
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=10, last_channel=last)


def _efficientnet_v2():
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    setting = [FusedMBConvConfig(1, 3, 1, 16, 16, 1), FusedMBConvConfig(4, 3, 2, 16, 24, 1),
               MBConvConfig(4, 3, 2, 24, 32, 1), MBConvConfig(6, 3, 1, 32, 40, 2)]
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=10, last_channel=128)


def _convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    setting = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)]
    return ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=10)


def _swin(v2: bool = False):
    from torchvision.models.swin_transformer import (
        PatchMergingV2,
        SwinTransformer,
        SwinTransformerBlockV2,
    )

    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return SwinTransformer([4, 4], 16, [2, 2], [2, 4], [2, 2], stochastic_depth_prob=0.1, num_classes=10, **extra)


def _vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             dropout=0.1, num_classes=10)


def _googlenet():
    return _tv().googlenet(weights=None, init_weights=True, aux_logits=True, num_classes=10)


def _maskrcnn_v2():
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64,
                                    rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=20,
                                    box_batch_size_per_image=8)


def _retinanet_v2():
    from torchvision.models.detection import retinanet_resnet50_fpn_v2

    return retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64)


def _deeplabv3():
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    return deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)


def _fcn():
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.resnet import BasicBlock, ResNet
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    backbone = ResNet(BasicBlock, [1, 1, 1, 1])  # torchvision's fcn_resnet50, with a ResNet-18-like body
    body = IntermediateLayerGetter(backbone, return_layers={"layer4": "out", "layer3": "aux"})
    return FCN(body, FCNHead(512, 3), FCNHead(256, 3))


def torchvision_zoo() -> list[ZooModel]:
    tvm = _tv()
    return [
        _classifier("tv/resnet18", lambda: tvm.resnet18(weights=None, num_classes=10), fast=True),
        _classifier("tv/resnet50(zero_init_residual)",
                    lambda: tvm.resnet50(weights=None, num_classes=10, zero_init_residual=True)),
        _classifier("tv/resnext(8x4d)", _resnext),
        _classifier("tv/wide_resnet", _wide_resnet),
        _classifier("tv/vgg_bn", _vgg_bn),
        _classifier("tv/densenet", _densenet),
        _classifier("tv/mobilenet_v2(0.35)", lambda: tvm.mobilenet_v2(weights=None, width_mult=0.35, num_classes=10),
                    fast=True),
        _classifier("tv/mobilenet_v3_small(0.5)",
                    lambda: tvm.mobilenet_v3_small(weights=None, width_mult=0.5, num_classes=10)),
        _classifier("tv/mobilenet_v3_large(0.5)",
                    lambda: tvm.mobilenet_v3_large(weights=None, width_mult=0.5, num_classes=10)),
        _classifier("tv/shufflenet_v2_x0_5", lambda: tvm.shufflenet_v2_x0_5(weights=None, num_classes=10), fast=True),
        _classifier("tv/mnasnet0_5", lambda: tvm.mnasnet0_5(weights=None, num_classes=10)),
        _classifier("tv/efficientnet_b0(0.25)", _efficientnet, fast=True),
        _classifier("tv/efficientnet_v2(small)", _efficientnet_v2),
        _classifier("tv/regnet_x_400mf", lambda: tvm.regnet_x_400mf(weights=None, num_classes=10)),
        _classifier("tv/regnet_y_400mf", lambda: tvm.regnet_y_400mf(weights=None, num_classes=10)),
        _classifier("tv/convnext(small)", _convnext, fast=True),
        _classifier("tv/googlenet", _googlenet, size=64),
        _classifier("tv/squeezenet1_1", lambda: tvm.squeezenet1_1(weights=None, num_classes=10), size=64),
        _classifier("tv/swin(small)", _swin, fast=True),
        _classifier("tv/swin_v2(small)", lambda: _swin(v2=True)),
        _classifier("tv/vit(small)", _vit, size=32, fast=True),
        _detector("tv/maskrcnn_resnet50_fpn_v2", _maskrcnn_v2),
        _detector("tv/retinanet_resnet50_fpn_v2", _retinanet_v2),
        _segmenter("tv/deeplabv3_mobilenet_v3_large", _deeplabv3),
        _segmenter("tv/fcn(resnet18-like)", _fcn),
    ]


# ------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


def _mixer(resmlp: bool = False) -> nn.Module:
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    extra = dict(block_layer=ResBlock, norm_layer=Affine, mlp_ratio=4) if resmlp else {}
    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32, drop_path_rate=0.1, **extra)


def timm_zoo() -> list[ZooModel]:
    return [
        _classifier("timm/resnet18d", _timm("resnet18d", drop_path_rate=0.1), fast=True),
        _classifier("timm/resnetv2_50x1_bit", _timm("resnetv2_50x1_bit")),
        _classifier("timm/nf_resnet26", _timm("nf_resnet26")),
        _classifier("timm/nf_regnet_b0", _timm("nf_regnet_b0"), fast=True),
        _classifier("timm/convnext_atto", _timm("convnext_atto", drop_path_rate=0.1), fast=True),
        _classifier("timm/cspresnet50", _timm("cspresnet50")),
        _classifier("timm/cspdarknet53", _timm("cspdarknet53")),
        _classifier("timm/dla34", _timm("dla34")),
        _classifier("timm/ghostnet_050", _timm("ghostnet_050"), fast=True),
        _classifier("timm/repvgg_a0", _timm("repvgg_a0")),
        _classifier("timm/MlpMixer(small)", _mixer, size=32),
        _classifier("timm/ResMLP(small)", lambda: _mixer(resmlp=True), size=32),
        _classifier("timm/efficientnet_b0", _timm("efficientnet_b0", drop_path_rate=0.1)),
        _classifier("timm/mobilenetv3_small_050", _timm("mobilenetv3_small_050")),
        _classifier("timm/regnety_002", _timm("regnety_002")),
        _classifier("timm/vit_tiny(32px)", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8), size=32),
        _classifier("timm/test_nfnet", _timm("test_nfnet")),
        _classifier("timm/test_efficientnet_gn", _timm("test_efficientnet_gn")),
    ]


def zoo() -> list[ZooModel]:
    return torchvision_zoo() + timm_zoo()
