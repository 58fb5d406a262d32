"""Image classification LightningModule (digits CNN, ResNet18-CIFAR, ResNet50, MobileNetV2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from pytorch_lightning.utilities import rank_zero_info

from examples.modules.nets import build_adapted, shardable_blocks
from examples.modules.optim import ConfiguredOptimizerModule


class ImageClassifier(ConfiguredOptimizerModule):
    """Cross-entropy classifier logging loss and top-1 (and top-5) accuracy.

    Args:
        arch: network name, see :func:`examples.modules.nets.build_classifier`.
        num_classes: number of classes.
        label_smoothing: cross-entropy label smoothing (0 in the papers).
        zero_init_residual: ResNets: zero-init the last BN γ of each block (Goyal et al. option).
        in_channels: channels of the input images (``data.channels``): the first conv takes them.
        image_size: side of the input images (``data.image_size``); below 64 px the ResNets and
            MobileNetV2 get a small-image stem, and images smaller than the network's total stride
            are upsampled (bilinear) to it. One line on rank 0 says what was adapted.
        fully_shard: apply ``torch.distributed.fsdp.fully_shard`` (FSDP2) in ``configure_model``;
            set by ``strategy=fsdp2`` (``ModelParallelStrategy``).
        bn_recalibration_batches: before each validation during fit, recompute the BatchNorm running
            statistics from this many training batches (forward only, no gradient; 0 = off). When the
            weight norms move fast (a large λη: a few % per step), the running averages lag the
            weights, and in a deep network the lag compounds layer by layer until eval-mode outputs
            are constant; this measures the network as it is (the "precise BN" of Wu & Johnson,
            2021). The training itself is unchanged: the running statistics are not used by it.
        optimizer, scheduler, scheduler_interval, norm_weight_decay, bias_weight_decay, head_weight_decay:
            see :class:`~examples.modules.optim.ConfiguredOptimizerModule`.
    """

    def __init__(
        self,
        arch: str = "resnet18_cifar",
        num_classes: int = 10,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        norm_weight_decay: float | None = None,
        bias_weight_decay: float | None = None,
        head_weight_decay: float | None = None,
        label_smoothing: float = 0.0,
        zero_init_residual: bool = False,
        fully_shard: bool = False,
        in_channels: int = 3,
        image_size: int | None = None,
        bn_recalibration_batches: int = 0,
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval, norm_weight_decay, bias_weight_decay,
                         head_weight_decay)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model, notes, min_size = build_adapted(arch, num_classes, zero_init_residual, in_channels, image_size)
        self.upsample_to = min_size if image_size is not None and image_size < min_size else None
        if self.upsample_to:
            notes.append(f"inputs upsampled {image_size}→{self.upsample_to} px (bilinear)")
        if notes:
            size = f"{in_channels}×{image_size}×{image_size}" if image_size else f"{in_channels} channels"
            rank_zero_info(f"[examples] model {arch} adapted to the data ({size}, {num_classes} classes): "
                           + "; ".join(notes))
        self.label_smoothing = label_smoothing
        self.fully_shard = fully_shard
        if bn_recalibration_batches < 0:
            raise ValueError(f"model.bn_recalibration_batches must be ≥ 0, got {bn_recalibration_batches}")
        self.bn_recalibration_batches = bn_recalibration_batches
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1)
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1)
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=5) if num_classes > 5 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample_to and x.shape[-1] < self.upsample_to:
            x = F.interpolate(x, size=(self.upsample_to, self.upsample_to), mode="bilinear", align_corners=False)
        return self.model(x)

    def optimized_module(self) -> torch.nn.Module:
        return self.model

    def configure_model(self) -> None:
        """FSDP2: shard each residual/inverted block, then the whole network, over the DP mesh."""
        if not self.fully_shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        for block in shardable_blocks(self.model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        if self.bn_recalibration_batches and not self.trainer.sanity_checking and self.trainer.training is False \
                and self.trainer.state.fn == "fit":
            self._recalibrate_batchnorm()

    @torch.no_grad()
    def _recalibrate_batchnorm(self) -> None:
        """BatchNorm running statistics recomputed (cumulative average) from training batches."""
        norms = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        loader = self.trainer.train_dataloader
        if not norms or loader is None:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
            m.train()
        for i, (x, _) in enumerate(loader):
            if i >= self.bn_recalibration_batches:
                break
            self(x.to(self.device))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc, prog_bar=True)
        if self.val_acc5 is not None:
            self.val_acc5(logits, y)
            self.log("val/acc5", self.val_acc5)
