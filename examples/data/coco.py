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

from examples.data.common import DatasetError, check_batches, loader_kwargs, require


def _load_coco(ann_file: str | Path | dict):
    """pycocotools' COCO index of an ``instances_*.json`` path, or of its already parsed content."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints timing lines
        if isinstance(ann_file, dict):
            coco = COCO()
            coco.dataset = ann_file
            coco.createIndex()
            return coco
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
        ann_file: ``instances_*.json``, or its parsed content (as :meth:`COCODataModule.check` keeps it).
        train: random horizontal flip (p=0.5).
        remove_empty: drop images without a usable annotation.
    """

    def __init__(self, img_dir: str | Path, ann_file: str | Path | dict, train: bool = False, remove_empty: bool = False):
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
        num_workers: loader workers; ``None``: the CPUs available per device, minus one (≤ 8).
        pin_memory: ``None``: pin when training on a CUDA device.
        num_classes: the model's classes (``data.num_classes``): labels are the raw category ids,
            so it must exceed the largest id of the annotation files (91 for COCO).
    """

    def __init__(
        self,
        root: str = "data/coco",
        train_images: str = "train2017",
        val_images: str = "val2017",
        train_ann: str = "annotations/instances_train2017.json",
        val_ann: str = "annotations/instances_val2017.json",
        batch_size: int = 2,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        num_classes: int | None = None,
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
        self.num_classes = num_classes
        self.annotations: dict[str, dict] = {}  # parsed by check(), reused by setup()
        self.train_set = self.val_set = None

    def check(self, world_size: int = 1) -> None:
        """Raise a clear error now (before the model is built) when an image folder or json is missing,
        a json is unreadable, truncated or not COCO-shaped, an image it lists is not in its folder,
        train and val have different categories, ``num_classes`` does not cover the category ids, or
        ``batch_size`` leaves no training batch. Parses each json once (kept for :meth:`setup`) and
        lists each image folder once; no image is opened."""
        hint = (
            "Point data.root=/path/to/coco (holding train2017/, val2017/, annotations/) or set "
            "data.train_images / data.val_images / data.train_ann / data.val_ann (relative to data.root); "
            "COCO is not downloaded automatically."
        )
        for key, path in self.paths.items():
            require(path, f"COCO {key}", f"data.root + data.{key}", hint)
        categories = {}
        for split in ("train", "val"):
            key, path = f"data.{split}_ann", self.paths[f"{split}_ann"]
            data = self.annotations.get(split) or _read_instances(path, key)
            _check_files(data, self.paths[f"{split}_images"], f"data.{split}_images", path)
            categories[split] = sorted(c["id"] for c in data["categories"])
            self.annotations[split] = data
        if categories["train"] != categories["val"]:
            raise DatasetError(
                f"COCO categories differ: {self.paths['train_ann']} (data.train_ann) has ids {_ids(categories['train'])}, "
                f"{self.paths['val_ann']} (data.val_ann) has {_ids(categories['val'])}. Use the train and val files "
                "of the same release."
            )
        top = max(categories["train"], default=0)
        if self.num_classes is not None and not top < int(self.num_classes):
            raise DatasetError(
                f"data.num_classes={self.num_classes} but {self.paths['train_ann']} (data.train_ann) has category ids "
                f"up to {top}; the labels are the raw ids, so the head needs data.num_classes={top + 1} or more "
                "(91 for COCO 2017)."
            )
        usable = sum(1 for i in _images_with_boxes(self.annotations["train"]))
        check_batches(usable, self.batch_size, world_size,
                      f"{self.paths['train_ann']} (data.train_ann; images with a non-crowd box)")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        p, parsed = self.paths, self.annotations
        self.train_set = CocoInstances(p["train_images"], parsed.pop("train", p["train_ann"]), train=True, remove_empty=True)
        self.val_set = CocoInstances(p["val_images"], parsed.pop("val", p["val_ann"]), train=False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, drop_last=True, collate_fn=collate_lists,
                          **loader_kwargs(self.num_workers, self.pin_memory, self.trainer))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False, collate_fn=collate_lists,
                          **loader_kwargs(self.num_workers, self.pin_memory, self.trainer))


_REFETCH = "Re-extract annotations_trainval2017.zip (https://cocodataset.org/#download) into data.root/annotations/."


def _ids(ids: list[int]) -> str:
    return f"{ids[:8]}{' …' if len(ids) > 8 else ''} ({len(ids)} categories)"


def _read_instances(path: Path, key: str) -> dict:
    """Parse an ``instances_*.json`` once and check its shape; errors name the file and ``key``."""
    import json

    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise DatasetError(f"COCO annotation file {path.resolve()} ({key}) cannot be read: {type(err).__name__}: "
                           f"{err} (truncated or damaged). {_REFETCH}") from None
    problem = None
    if not isinstance(data, dict):
        problem = f"a JSON {type(data).__name__}, not an object"
    else:
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
        if missing:
            problem = f"no {' / '.join(repr(k) for k in missing)} list (keys: {sorted(data)[:8]})"
    if problem is None:
        need = {"images": ("id", "file_name", "width", "height"),
                "annotations": ("id", "image_id", "category_id", "bbox", "segmentation"),
                "categories": ("id", "name")}
        for part, keys in need.items():
            bad = next((i for i, e in enumerate(data[part]) if not isinstance(e, dict) or any(k not in e for k in keys)), None)
            if bad is not None:
                problem = f"{part}[{bad}] lacks one of {list(keys)}: {str(data[part][bad])[:120]}"
                break
    if problem is None:
        images, cats = {i["id"] for i in data["images"]}, {c["id"] for c in data["categories"]}
        for i, a in enumerate(data["annotations"]):
            if a["image_id"] not in images or a["category_id"] not in cats or len(a["bbox"]) != 4:
                problem = (f"annotations[{i}] (id {a['id']}) refers to image {a['image_id']} / category "
                           f"{a['category_id']} not listed, or its bbox is not [x, y, w, h]")
                break
    if problem is not None:
        raise DatasetError(f"COCO annotation file {path.resolve()} ({key}) is not a COCO instances file: {problem}. "
                           f"{_REFETCH}")
    return data


def _check_files(data: dict, folder: Path, key: str, ann: Path) -> None:
    """Every image the json lists is in ``folder`` (one directory listing, no image opened)."""
    import os

    present = set(os.listdir(folder))
    absent = [i["file_name"] for i in data["images"] if i["file_name"] not in present
              and not (folder / i["file_name"]).is_file()]  # file_name may hold a sub-folder
    if absent:
        raise DatasetError(
            f"{len(absent)} of the {len(data['images'])} images listed in {ann.resolve()} are not in "
            f"{folder.resolve()} ({key}): {', '.join(absent[:3])}{' …' if len(absent) > 3 else ''}. Extract the "
            f"matching image archive there (train2017.zip / val2017.zip), or point {key} at the folder that holds them."
        )


def _images_with_boxes(data: dict):
    """Ids of the images with at least one non-crowd annotation of positive width and height (those
    :class:`CocoInstances` keeps for training; clipping to the image is not checked here)."""
    seen = set()
    for a in data["annotations"]:
        if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0 and a["image_id"] not in seen:
            seen.add(a["image_id"])
            yield a["image_id"]
