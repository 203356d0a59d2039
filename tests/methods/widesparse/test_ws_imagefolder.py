"""The image-folder dataset (the ImageNet pipeline of Golubeva et al. 2021, App. A.1) on a tiny folder of
generated PNG and JPEG files."""

import numpy as np
import pytest
import torch
from PIL import Image

from widthlab.data.readers.imagefolder import (
    center_crop,
    random_resized_crop_box,
    resize_short,
)
from widthlab.data.registry import load_dataset


def write_folder(root, sizes=((40, 30), (30, 50), (64, 64)), classes=("cat", "dog", "emu"), per_class=4):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[(ci + i) % len(sizes)]
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                arr[..., 0] = 80 * ci  # a class-dependent red channel
                ext = ".png" if i % 2 else ".JPG"
                Image.fromarray(arr).save(d / f"img{i}{ext}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_load_train_and_test_splits(tmp_path):
    root = write_folder(tmp_path / "imgs")
    torch.manual_seed(0)
    data = load_dataset("imagefolder", path=str(root), image_size=24, resize_size=28)
    assert data.input_shape == (3, 24, 24) and data.num_outputs == 3 and data.task == "classification"
    assert len(data.train) == 12 and len(data.val) == 0 and len(data.test) == 6
    assert data.meta["class_names"] == ["cat", "dog", "emu"]
    x, y = data.train[5]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and int(y) == 1
    # Test transform is deterministic; ImageNet standardisation of a red channel of 80*c / 255.
    a, ya = data.test[5]  # a PNG (lossless): its red channel is exactly 160
    b, _ = data.test[5]
    assert torch.equal(a, b) and int(ya) == 2
    assert a[0].mean().item() == pytest.approx((160 / 255 - 0.485) / 0.229, abs=1e-4)
    # A batch as the trainer draws it (DataLoader over the lazy dataset).
    from widthlab.train.loader import batches
    xb, yb = next(batches(data.train, 5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert xb.shape == (5, 3, 24, 24) and yb.shape == (5,)


def test_validation_split_and_subset(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=10)
    data = load_dataset("imagefolder", path=str(root), val_fraction=0.2, subset=12, image_size=16,
                        resize_size=16, seed=3)
    assert len(data.val) == 6 and len(data.train) == 12
    labels = [int(data.train[i][1]) for i in range(12)]
    assert sorted(np.bincount(labels).tolist()) == [4, 4, 4]  # stratified


def test_random_resized_crop_is_seeded_and_in_bounds():
    torch.manual_seed(0)
    boxes = [random_resized_crop_box(100, 60) for _ in range(200)]
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 60
        area = (right - left) * (bottom - top) / 6000
        assert 0.19 <= area <= 1.01
    torch.manual_seed(0)
    assert boxes == [random_resized_crop_box(100, 60) for _ in range(200)]
    # No crop of ratio 3/4..4/3 fits a very flat image: fallback is the centred clamped-ratio crop.
    assert random_resized_crop_box(400, 10, scale=(0.9, 1.0)) == (193, 0, 206, 10)


def test_resize_and_center_crop():
    img = Image.new("RGB", (300, 200))
    r = resize_short(img, 256)
    assert r.size == (384, 256)
    assert center_crop(r, 224).size == (224, 224)
    assert center_crop(Image.new("RGB", (10, 10)), 16).size == (16, 16)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("imagefolder", path=str(tmp_path))
    root = write_folder(tmp_path / "imgs")
    (root / "val" / "yak").mkdir()
    with pytest.raises(ValueError, match="yak"):
        load_dataset("imagefolder", path=str(root))
    with pytest.raises(ValueError, match="augment"):
        load_dataset("imagefolder", path=str(root), augment=True)
    with pytest.raises(ValueError, match="normalize"):
        load_dataset("imagefolder", path=str(root), normalize="feature")
