"""The ImageNet sample loader and preprocessing: a tiny synthetic copy (always) and the shared
sample (when present)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from captum_gradmask.data import (
    class_names,
    load_image,
    load_imagenet_sample,
    preprocess_image,
    resize_boxes,
)

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared


@pytest.fixture
def tiny_sample(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "images" / "a.png")
    Image.new("L", (20, 10), 128).save(tmp_path / "images" / "b.png")
    (tmp_path / "annotations.csv").write_text(
        "file,label,synset,xmin,ymin,xmax,ymax\n"
        "images/a.png,3,n0003,0,0,39,29\n"
        "images/a.png,3,n0003,5,6,7,8\n"
        "images/b.png,1,n0001,2,2,9,9\n"
    )
    (tmp_path / "synsets.txt").write_text(
        "n0000 zero, nil\nn0001 one\nn0002 two, pair\nn0003 three\n"
    )
    return tmp_path


def test_records_group_boxes_per_image(tiny_sample: Path) -> None:
    records = load_imagenet_sample(tiny_sample)
    assert [r.path.name for r in records] == ["a.png", "b.png"]
    first, second = records
    assert first.label == 3 and first.synset == "n0003"
    assert first.boxes.tolist() == [[0, 0, 39, 29], [5, 6, 7, 8]]
    assert first.original_size == (30, 40)  # (height, width)
    assert second.boxes.tolist() == [[2, 2, 9, 9]] and second.original_size == (10, 20)
    assert len(load_imagenet_sample(tiny_sample, limit=1)) == 1


def test_loader_errors(tiny_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match=r"annotations\.csv"):
        load_imagenet_sample(empty)
    with pytest.raises(ValueError, match="limit"):
        load_imagenet_sample(tiny_sample, limit=0)
    (empty / "annotations.csv").write_text("file,label\nimages/a.png,3\n")
    with pytest.raises(ValueError, match="xmin"):
        load_imagenet_sample(empty)


def test_class_names(tiny_sample: Path) -> None:
    assert class_names(tiny_sample) == ["zero", "one", "two", "three"]
    assert class_names(tiny_sample / "synsets.txt", short=False)[2] == "two, pair"


def test_preprocess_normalizes_and_converts_to_rgb(tiny_sample: Path) -> None:
    red = preprocess_image(tiny_sample / "images" / "a.png", size=(30, 40))  # no resize
    assert red.shape == (3, 30, 40) and red.dtype == torch.float32
    # (255 / 255 - 0.5) / 0.5 = 1 and (0 - 0.5) / 0.5 = -1
    assert torch.equal(red[0], torch.ones(30, 40)) and torch.equal(red[1], -torch.ones(30, 40))
    gray = preprocess_image(load_image(tiny_sample / "images" / "b.png"), size=8,
                            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 2.0))  # fmt: skip
    assert gray.shape == (3, 8, 8)
    torch.testing.assert_close(gray[0], torch.full((8, 8), 128 / 255))
    torch.testing.assert_close(gray[2], torch.full((8, 8), 64 / 255))
    with pytest.raises(ValueError, match="std"):
        preprocess_image(Image.new("RGB", (4, 4)), std=(0.5, 0.0, 0.5))


@needs_shared
def test_shared_sample_loads() -> None:
    records = load_imagenet_sample(IMAGENET_SAMPLE)
    assert len(records) == 500
    first = records[0]
    assert first.path.name == "ILSVRC2012_val_00000001.JPEG"
    assert first.label == 65 and first.synset == "n01751748"
    assert first.boxes.tolist() == [[111, 108, 441, 193]] and first.original_size == (375, 500)
    assert len(records[1].boxes) == 2
    assert sum(len(r.boxes) for r in records) == 770
    for r in records:  # inclusive pixel indices inside the image
        height, width = r.original_size
        assert int(r.boxes[:, 2].max()) < width and int(r.boxes[:, 3].max()) < height
    names = class_names(IMAGENET_SAMPLE)
    assert len(names) == 1000 and names[0] == "tench" and names[65] == "sea snake"
    mapped = resize_boxes(first.boxes, first.original_size, (224, 224))
    assert mapped[0].tolist() == pytest.approx(
        [111 * 224 / 500, 108 * 224 / 375, 442 * 224 / 500, 194 * 224 / 375]
    )


@needs_shared
def test_preprocess_matches_vit_image_processor() -> None:
    # transformers 5 keeps the 4.x PIL pipeline as ViTImageProcessorPil (the default
    # ViTImageProcessor now resizes with torchvision and differs by one gray level).
    vit_pil = pytest.importorskip("transformers.models.vit.image_processing_pil_vit")
    processor = vit_pil.ViTImageProcessorPil.from_pretrained(HF_VIT_TINY)
    for record in load_imagenet_sample(IMAGENET_SAMPLE, limit=3):
        expected = processor(images=load_image(record.path), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(preprocess_image(record.path), expected[0], atol=1e-6, rtol=0)


def test_offset_skips_images_without_opening_them(tmp_path) -> None:
    from PIL import Image

    from captum_gradmask.data import load_imagenet_sample

    (tmp_path / "images").mkdir()
    rows = ["file,label,synset,xmin,ymin,xmax,ymax"]
    for i in range(4):
        rows += [f"images/{i}.png,{i},n{i},0,0,1,1", f"images/{i}.png,{i},n{i},1,1,2,2"]
        if i >= 2:  # files 0 and 1 do not exist: an offset of 2 must not open them
            Image.new("RGB", (5, 3)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "annotations.csv").write_text("\n".join(rows) + "\n")
    records = load_imagenet_sample(tmp_path, offset=2)
    assert [r.label for r in records] == [2, 3]
    assert records[0].boxes.shape == (2, 4) and records[0].original_size == (3, 5)
    assert [r.label for r in load_imagenet_sample(tmp_path, offset=2, limit=1)] == [2]
