"""COCO instances (``annotations/instances_*.json`` + images) as Mask R-CNN targets."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from examples.data.common import loader_kwargs, require


def _load_coco(ann_file: str | Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints timing lines
        return COCO(str(ann_file))


class CocoInstances(Dataset):
    """COCO images with ``{"boxes", "labels", "masks", "image_id", "area", "iscrowd"}`` targets.

    Boxes are xyxy in pixels, clipped to the image; labels are the raw COCO category ids
    (use ``num_classes=91``); masks are uint8 ``[N, H, W]`` rasterized from polygons (or RLE)
    by pycocotools. Crowd annotations and degenerate boxes (zero width/height) are skipped,
    as in torchvision's detection reference. With ``remove_empty`` (training), images left
    without any annotation are dropped.

    Args:
        img_dir: folder of the images (``file_name`` entries of the json).
        ann_file: ``instances_*.json``.
        train: random horizontal flip (p=0.5).
        remove_empty: drop images without a usable annotation.
    """

    def __init__(self, img_dir: str | Path, ann_file: str | Path, train: bool = False, remove_empty: bool = False):
        self.img_dir = Path(img_dir)
        self.coco = _load_coco(ann_file)
        self.train = train
        ids = sorted(self.coco.imgs)
        if remove_empty:
            ids = [i for i in ids if self._annotations(i)]
        self.ids = ids

    def _annotations(self, img_id: int) -> list[dict[str, Any]]:
        info = self.coco.imgs[img_id]
        w, h = info["width"], info["height"]
        keep = []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id)):
            if ann.get("iscrowd", 0):
                continue
            x, y, bw, bh = ann["bbox"]
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(w), x + bw), min(float(h), y + bh)
            if x2 <= x1 or y2 <= y1:
                continue
            keep.append({**ann, "_xyxy": [x1, y1, x2, y2]})
        return keep

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        image = Image.open(self.img_dir / info["file_name"]).convert("RGB")
        anns = self._annotations(img_id)
        h, w = info["height"], info["width"]
        if anns:
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])).to(torch.uint8)
        else:
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
        target = {
            "boxes": torch.tensor([a["_xyxy"] for a in anns], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "masks": masks,
            "image_id": torch.tensor(img_id),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        img = TF.to_tensor(image)
        if self.train and torch.rand(()) < 0.5:
            img = img.flip(-1)
            target["masks"] = target["masks"].flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        return img, target


def collate_lists(batch: list[tuple[Any, Any]]) -> tuple[tuple, tuple]:
    """Detection collate: a tuple of images and a tuple of targets (sizes differ)."""
    return tuple(zip(*batch))


class COCODataModule(pl.LightningDataModule):
    """COCO 2017 instances for Mask R-CNN.

    Args:
        root: COCO folder; the defaults below are relative to it.
        train_images / val_images: image folders (``train2017``, ``val2017``).
        train_ann / val_ann: annotation files (``annotations/instances_{train,val}2017.json``).
        batch_size: images per device (2 per GPU × 8 GPUs = 16 in the 4x recipe).
    """

    def __init__(
        self,
        root: str = "data/coco",
        train_images: str = "train2017",
        val_images: str = "val2017",
        train_ann: str = "annotations/instances_train2017.json",
        val_ann: str = "annotations/instances_val2017.json",
        batch_size: int = 2,
        num_workers: int = 4,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.paths = {
            "train_images": self.root / train_images,
            "val_images": self.root / val_images,
            "train_ann": self.root / train_ann,
            "val_ann": self.root / val_ann,
        }
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set = self.val_set = None

    def check(self) -> None:
        """Raise a clear error now (before training) when an image folder or json is missing."""
        hint = (
            "Point data.root=/path/to/coco (holding train2017/, val2017/, annotations/) or set "
            "data.train_images / data.val_images / data.train_ann / data.val_ann (relative to data.root); "
            "COCO is not downloaded automatically."
        )
        for key, path in self.paths.items():
            require(path, f"COCO {key}", f"data.root + data.{key}", hint)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        p = self.paths
        self.train_set = CocoInstances(p["train_images"], p["train_ann"], train=True, remove_empty=True)
        self.val_set = CocoInstances(p["val_images"], p["val_ann"], train=False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, drop_last=True, collate_fn=collate_lists,
                          **loader_kwargs(self.num_workers, self.pin_memory))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False, collate_fn=collate_lists,
                          **loader_kwargs(self.num_workers, self.pin_memory))
