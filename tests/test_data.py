"""Loading labelled images through ``datasets`` and augmenting them on tensors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaperturb.data import DataError, load_images, normalize, random_crop_flip

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = DATA / "tiny-imagenet-200-32px"
needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason=f"{TINY} not present")


@pytest.fixture(scope="module")
def tiny_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder in the ../shared/data layout: 3 classes x 10 images of Tiny ImageNet's train and
    validation splits, written with pyarrow (schema metadata, hence class names, kept)."""
    if not TINY.is_dir():
        pytest.skip(f"{TINY} not present")
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("tiny-slice")
    for split in ("train", "validation"):
        table = pq.read_table(TINY / f"{split}.parquet", filters=[("label", "in", [0, 5, 7])])
        keep = np.concatenate(
            [np.flatnonzero(table.column("label").to_numpy() == k)[:10] for k in (0, 5, 7)]
        )
        pq.write_table(table.take(pc.cast(keep, "int64")), folder / f"{split}.parquet")
    return folder


@needs_tiny
def test_slice_of_tiny_imagenet_from_the_shared_folder() -> None:
    data = load_images(TINY, classes=4, max_per_class=20)
    assert data.images.shape == (80, 3, 32, 32) and data.images.dtype == torch.uint8
    assert torch.bincount(data.labels).tolist() == [20, 20, 20, 20]
    assert data.class_names[0] == "n01443537: goldfish" and data.original_labels == [0, 1, 2, 3]
    assert data.source == "tiny-imagenet-200-32px/train"


@needs_tiny
def test_pixels_match_a_direct_decode(tiny_slice: Path) -> None:
    import pyarrow.parquet as pq
    from PIL import Image

    data = load_images(tiny_slice / "train.parquet", classes=[5, 7])
    table = pq.read_table(tiny_slice / "train.parquet").to_pylist()
    rows = [row for row in table if row["label"] in (5, 7)]
    assert len(data) == len(rows) == 20
    expected = np.array(Image.open(io.BytesIO(rows[3]["image"]["bytes"])).convert("RGB"))
    assert torch.equal(data.images[3], torch.from_numpy(expected).permute(2, 0, 1))
    assert data.labels.tolist() == [0 if row["label"] == 5 else 1 for row in rows]
    assert data.original_labels == [5, 7]


@needs_tiny
def test_resize_grayscale_and_splits(tiny_slice: Path) -> None:
    data = load_images(tiny_slice, "validation", image_size=16, channels=1)
    assert data.images.shape == (30, 1, 16, 16) and data.num_classes == 3
    with pytest.raises(DataError, match=r"splits found: \['train', 'validation'\]"):
        load_images(tiny_slice, "test")


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for name, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for index in range(3):
            Image.new("RGB", (40, 20), colour).save(tmp_path / name / f"{index}.png")
    data = load_images(tmp_path, image_size=8)
    assert data.images.shape == (6, 3, 8, 8) and data.class_names == ["cat", "dog"]
    red = data.images[data.labels == 0]
    assert (red[:, 0] == 255).all() and (red[:, 2] == 0).all()


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a .parquet file"):
        load_images(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="neither parquet files nor class sub-folders"):
        load_images(tmp_path)
    with pytest.raises(DataError, match="channels must be"):
        load_images(tmp_path, channels=2)


def test_missing_label_column_is_named(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    image = {"bytes": buffer.getvalue(), "path": "a.png"}
    features = {"image": {"_type": "Image"}, "caption": {"dtype": "string", "_type": "Value"}}
    table = pa.table({"image": [image], "caption": ["x"]}).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})}
    )
    pq.write_table(table, tmp_path / "train.parquet")
    with pytest.raises(DataError, match="no label column"):
        load_images(tmp_path)


@needs_tiny
def test_selection_errors(tiny_slice: Path) -> None:
    with pytest.raises(DataError, match="has 3 classes with images; cannot keep the first 9"):
        load_images(tiny_slice, classes=9)
    with pytest.raises(DataError, match=r"no images of classes \[1\]"):
        load_images(tiny_slice, classes=[0, 1])


def _reference_crop_flip(
    images: torch.Tensor, padding: int, dy: int, dx: int, flip: bool
) -> torch.Tensor:
    padded = F.pad(images, (padding,) * 4)
    height, width = images.shape[-2:]
    crop = padded[:, dy : dy + height, dx : dx + width]
    return crop.flip(-1) if flip else crop


def test_random_crop_flip_matches_a_per_image_reference() -> None:
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(7)
    out = random_crop_flip(images, padding=2, generator=generator)
    generator.manual_seed(7)
    offsets = torch.randint(0, 5, (2, 16), generator=generator)
    flips = torch.rand(16, generator=generator) < 0.5
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for index in range(16):
        expected = _reference_crop_flip(
            images[index], 2, int(offsets[0, index]), int(offsets[1, index]), bool(flips[index])
        )
        assert torch.equal(out[index], expected)
    assert flips.any() and not flips.all()


def test_augmentation_can_be_switched_off_and_is_reproducible() -> None:
    images = torch.randint(0, 256, (4, 1, 5, 5), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)
    first = random_crop_flip(images, generator=torch.Generator().manual_seed(1))
    second = random_crop_flip(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, second)


def test_normalize() -> None:
    images = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(images, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 2.0))


@needs_tiny
def test_skip_per_class_gives_a_slice_disjoint_from_the_first_images(tiny_slice: Path) -> None:
    """A validation slice (skip 4, keep 3) never shares an image with the first 4 of a class."""
    first = load_images(tiny_slice / "train.parquet", max_per_class=4)
    later = load_images(tiny_slice / "train.parquet", max_per_class=3, skip_per_class=4)
    rest = load_images(tiny_slice / "train.parquet", skip_per_class=4)
    assert torch.bincount(later.labels).tolist() == [3, 3, 3]
    assert torch.bincount(rest.labels).tolist() == [6, 6, 6]
    seen = {bytes(image.numpy()) for image in first.images}
    assert not seen & {bytes(image.numpy()) for image in rest.images}
    assert torch.equal(
        later.images, rest.images[torch.cat([torch.arange(3) + 6 * k for k in range(3)])]
    )
    with pytest.raises(DataError, match="empty"):
        load_images(tiny_slice / "train.parquet", skip_per_class=10)
