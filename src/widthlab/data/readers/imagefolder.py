"""Image folders (ImageNet layout): ``path/train/<class>/*.jpg`` and ``path/val/<class>/*.jpg``.

Images are decoded with Pillow when a batch needs them (a map-style ``Dataset``), never held in
memory as a whole. The transforms of the wide & sparse ImageNet recipe (Golubeva et al. 2021, App. A.1,
ImageNet)
are written here with PIL and torch, since torchvision is not a dependency:

- train: RandomResizedCrop(224, scale=(0.2, 1), ratio=(3/4, 4/3)), no flip (none is listed);
- test:  Resize(256) (short side), then CenterCrop(224);

then pixels / 255 and per-channel standardisation (the ImageNet statistics by default). The crop
parameters follow torchvision's algorithm (10 tries at a random area and log-uniform aspect ratio,
then a centre crop of clamped ratio) and draw from torch's global generator, which the trainer seeds
per run and saves in its checkpoints, so a resumed run sees the same crops.

``val/`` is the test split, as in the paper, which reports ImageNet validation accuracy. A
validation split for model selection can be carved from ``train/`` with ``val_fraction``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from widthlab.data.base import TaskData
from widthlab.data.splits import PRESETS, split_indices, take

EXTENSIONS = (".jpg", ".jpeg", ".png")


def scan(folder: Path, classes: list[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image files and labels of ``folder/<class>/*``, classes and files in sorted order.

    Args:
        folder: a split folder holding one subfolder per class.
        classes: the class names of the training split; a subfolder not among them is an error.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: no class folders, no images, or a class unknown to the training split.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing folder (expected one subfolder per class)")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not found:
        raise ValueError(f"{folder}: no class subfolders")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{folder}: class folder(s) {unknown[:3]} do not exist in the training split")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in found:
        files = sorted(p for p in (folder / c).iterdir() if p.suffix.lower() in EXTENSIONS)
        paths += files
        labels += [index[c]] * len(files)
    if not paths:
        raise ValueError(f"{folder}: no {'/'.join(EXTENSIONS)} images in the class folders")
    return paths, np.asarray(labels, dtype=np.int64), classes


# ----------------------------------------------------------------------------------- transforms

def random_resized_crop_box(width: int, height: int, scale: tuple[float, float] = (0.2, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A crop box ``(left, top, right, bottom)`` as torchvision's RandomResizedCrop draws it."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand(())))
        r = math.exp(log_r[0] + (log_r[1] - log_r[0]) * float(torch.rand(())))
        w = int(round(math.sqrt(target * r)))
        h = int(round(math.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            return left, top, left + w, top + h
    # Fallback: the largest centred crop whose ratio is clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float] = (0.2, 1.0)) -> Image.Image:
    """Crop a random box (:func:`random_resized_crop_box`) and resize it to ``size`` x ``size``."""
    box = random_resized_crop_box(*img.size, scale=scale)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def resize_short(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio (torchvision Resize(int))."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central ``size`` x ``size`` crop (torchvision's rounding); the image must be large enough."""
    w, h = img.size
    if w < size or h < size:
        img = img.resize((max(w, size), max(h, size)), Image.Resampling.BILINEAR)
        w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], standardised per channel when ``mean``/``std`` are given."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    if mean is not None:
        x = (x - mean) / std
    return x


class ImageFolderDataset(Dataset):
    """Decodes one image per item with Pillow and applies the train or test transform.

    Args:
        paths, labels: the files and their class indices.
        train: RandomResizedCrop (True) or Resize + CenterCrop (False).
        image_size, resize_size, min_scale: 224, 256 and 0.2 in the paper's recipe.
        mean, std: per-channel statistics of the [0, 1] pixels (None: no standardisation).
    """

    def __init__(self, paths: list[Path], labels: np.ndarray, *, train: bool, image_size: int = 224,
                 resize_size: int = 256, min_scale: float = 0.2, mean=None, std=None):
        self.paths, self.labels = list(paths), np.asarray(labels)
        self.train, self.min_scale = train, min_scale
        self.image_size, self.resize_size = image_size, resize_size
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.paths[i]
        try:
            with Image.open(path) as f:
                img = f.convert("RGB")
        except OSError as e:
            raise ValueError(f"{path}: cannot decode image ({e})") from None
        if self.train:
            img = random_resized_crop(img, self.image_size, (self.min_scale, 1.0))
        else:
            img = center_crop(resize_short(img, self.resize_size), self.image_size)
        return to_tensor(img, self.mean, self.std), torch.tensor(int(self.labels[i]))


def load_imagefolder(*, path: str, image_size: int = 224, resize_size: int = 256, min_scale: float = 0.2,
                     normalize: str | None = "imagenet", val_fraction: float | None = None,
                     seed: int | None = None, subset: int | None = None, subset_mode: str | None = None,
                     test_fraction: float | None = None, flatten: bool | None = None,
                     augment: bool | None = None, normalize_target: bool | None = None) -> TaskData:
    """The train/val/test :class:`TaskData` of an image-folder dataset (dataset name ``imagefolder``).

    Args:
        path: folder with ``train/`` and ``val/``, each holding one subfolder of JPEG/PNG images per
            class; ``val/`` is the test split.
        image_size: side of the square network input (224).
        resize_size: test images are resized to this short side before the centre crop (256).
        min_scale: smallest crop area fraction of the training RandomResizedCrop (0.2, Golubeva et al. 2021,
            App. A.1).
        normalize: ``"imagenet"`` (default) or another fixed preset (``"cifar"``, ``"mnist"`` need
            matching channels), or ``"none"``; dataset-fitted modes would need a pass over every image.
        val_fraction: share of ``train/`` held out (stratified, seeded) for validation; default 0.
        seed: seed of the validation split and subset draws (default 0).
        subset: keep only this many training images (stratified unless ``subset_mode="first"``).
        subset_mode: ``"stratified"`` (default) or ``"first"``.
        test_fraction, flatten, augment, normalize_target: not applicable (an error unless None /
            false): the test split is ``val/`` and the augmentation is the crop above.

    Raises:
        FileNotFoundError: a missing folder. ValueError: a bad option or an empty/odd folder.
    """
    for key, v in (("test_fraction", test_fraction), ("flatten", flatten), ("augment", augment),
                   ("normalize_target", normalize_target)):
        if v not in (None, False):
            raise ValueError(f"dataset 'imagefolder': option {key} does not apply (the test split is "
                             f"val/, the training augmentation is RandomResizedCrop)")
    normalize = "imagenet" if normalize is None else normalize
    if normalize != "none" and normalize not in PRESETS:
        raise ValueError(f"dataset 'imagefolder': normalize={normalize!r}; expected 'none' or one of "
                         f"{', '.join(PRESETS)}")
    mean, std = PRESETS[normalize] if normalize != "none" else (None, None)
    if mean is not None and len(mean) != 3:
        raise ValueError(f"dataset 'imagefolder': normalize={normalize!r} is for {len(mean)}-channel images")
    for key, v in (("image_size", image_size), ("resize_size", resize_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"dataset 'imagefolder': option {key}={v!r} must be a positive int")
    if isinstance(min_scale, bool) or not isinstance(min_scale, (int, float)) or not 0 < min_scale <= 1:
        raise ValueError(f"dataset 'imagefolder': option min_scale={min_scale!r} must be in (0, 1]")
    seed = 0 if seed is None else int(seed)
    root = Path(path)
    train_paths, train_y, classes = scan(root / "train")
    test_paths, test_y, _ = scan(root / "val", classes)
    kw = dict(image_size=image_size, resize_size=resize_size, min_scale=min_scale, mean=mean, std=std)
    train_idx, val_idx, _ = split_indices(len(train_paths), test_fraction=0.0,
                                          val_fraction=float(val_fraction or 0.0), seed=seed, y=train_y)
    if subset is not None:
        if subset > len(train_idx):
            raise ValueError(f"dataset 'imagefolder': subset={subset} but train/ has {len(train_idx)} images")
        if subset_mode == "first":
            train_idx = train_idx[:subset]
        else:
            train_idx, _ = take(train_idx, subset, np.random.default_rng([seed, 1]), train_y)
    full_train = ImageFolderDataset(train_paths, train_y, train=True, **kw)
    # Validation images are evaluated, so they get the deterministic test transform.
    full_eval = ImageFolderDataset(train_paths, train_y, train=False, **kw)
    return TaskData(
        name="imagefolder", task="classification",
        train=Subset(full_train, [int(i) for i in train_idx]),
        val=Subset(full_eval, [int(i) for i in val_idx]),
        test=ImageFolderDataset(test_paths, test_y, train=False, **kw),
        input_shape=(3, image_size, image_size), num_outputs=len(classes),
        meta={"source": str(root), "class_names": classes, "normalize": normalize,
              "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test_paths)}},
    )
