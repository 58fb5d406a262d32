"""Mask R-CNN R50-FPN (v2, trainable BatchNorm) LightningModule with COCO box/mask mAP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

from examples.modules.optim import ConfiguredOptimizerModule


class MaskRCNNModule(ConfiguredOptimizerModule):
    """torchvision ``maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)``.

    Without pretrained weights torchvision builds the backbone with ``BatchNorm2d`` and all
    five stages trainable, so backbone, FPN, box-head and mask-head convs are
    scale-invariant (the RPN head convs have no norm). Never loads weights.

    Args:
        num_classes: classes including background (91 = raw COCO category ids).
        min_size, max_size: the model's internal resize (800/1333 in the COCO recipe).
        sync_batchnorm: convert every BatchNorm to ``SyncBatchNorm`` (the SMD paper's
            "SyncBN"; needs a multi-GPU process group to synchronize, falls back to plain BN in a
            single process). ``trainer.sync_batchnorm=true`` does the same through Lightning.
        box_detections_per_img: detections kept per image at evaluation.
        compute_map: compute COCO box/segm mAP (torchmetrics + pycocotools) in validation.
        optimizer, scheduler, ...: see :class:`~examples.modules.optim.ConfiguredOptimizerModule`.
    """

    def __init__(
        self,
        num_classes: int = 91,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        norm_weight_decay: float | None = None,
        bias_weight_decay: float | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        sync_batchnorm: bool = False,
        box_detections_per_img: int = 100,
        compute_map: bool = True,
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval, norm_weight_decay, bias_weight_decay)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = maskrcnn_resnet50_fpn_v2(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            min_size=min_size,
            max_size=max_size,
            box_detections_per_img=box_detections_per_img,
        )
        if sync_batchnorm:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.val_map = None
        if compute_map:
            from torchmetrics.detection import MeanAveragePrecision

            self.val_map = MeanAveragePrecision(iou_type=("bbox", "segm"), backend="pycocotools")

    def optimized_module(self) -> nn.Module:
        return self.model

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.model(images)

    def training_step(self, batch: tuple[tuple, tuple], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.model(list(images), list(targets))
        loss = sum(losses.values())
        bs = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for key, value in losses.items():
            self.log(f"train/{key}", value, batch_size=bs)
        return loss

    def validation_step(self, batch: tuple[tuple, tuple], batch_idx: int) -> None:
        if self.val_map is None:
            return
        images, targets = batch
        preds = self.model(list(images))
        self.val_map.update(
            [
                {
                    "boxes": p["boxes"],
                    "scores": p["scores"],
                    "labels": p["labels"],
                    "masks": (p["masks"][:, 0] > 0.5),
                }
                for p in preds
            ],
            [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"].bool()} for t in targets],
        )

    def on_validation_epoch_end(self) -> None:
        if self.val_map is None:
            return
        result = self.val_map.compute()
        self.val_map.reset()
        for iou in ("bbox", "segm"):
            for suffix in ("map", "map_50", "map_75"):
                key = f"{iou}_{suffix}"
                if key in result:
                    self.log(f"val/{key}", result[key].float(), sync_dist=False)
