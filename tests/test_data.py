"""Datasets: digits, imagefolder, parquet (and the to_parquet round trip), errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vitcae_ray.config import DataConfig
from vitcae_ray.data import DATASETS, DataError, build_datasets
from vitcae_ray.data.to_parquet import main as to_parquet_main

REPO = Path(__file__).resolve().parents[1]


def _all(ds) -> tuple[torch.Tensor, list[int]]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), [y for _, y in items]


# --------------------------------------------------------------------------------------- digits


@pytest.mark.parametrize("size", [16, 32])
def test_digits_shapes_values_and_split(size: int) -> None:
    train, val, channels = build_datasets(DataConfig(dataset="digits", image_size=size, val_fraction=0.2))
    assert channels == 1
    assert len(train) + len(val) == 1797
    assert len(val) == round(1797 * 0.2)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(1797))
    for ds in (train, val):
        x, y = ds[0]
        assert x.dtype == torch.float32 and tuple(x.shape) == (1, size, size)
        assert isinstance(y, int)
        assert ds.images.shape == (len(ds), 1, size, size)
        assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
        assert float(ds.images.max()) > 0.5  # actually scaled from 0..16, not left tiny
    labels = set(train.targets.tolist()) | set(val.targets.tolist())
    assert labels == set(range(10))


def test_digits_split_is_seeded() -> None:
    a_train, a_val, _ = build_datasets(DataConfig(split_seed=0))
    b_train, b_val, _ = build_datasets(DataConfig(split_seed=0))
    c_train, c_val, _ = build_datasets(DataConfig(split_seed=1))
    assert a_val.indices == b_val.indices and a_train.indices == b_train.indices
    assert torch.equal(a_train.images, b_train.images)
    assert a_val.indices != c_val.indices


def test_digits_force_three_channels() -> None:
    train, val, channels = build_datasets(DataConfig(channels=3, image_size=16))
    gray, _, _ = build_datasets(DataConfig(channels=0, image_size=16))
    assert channels == 3
    x, _ = train[5]
    assert tuple(x.shape) == (3, 16, 16)
    for c in range(3):
        assert torch.equal(x[c], gray[5][0][0])


# ---------------------------------------------------------------------------------- imagefolder


def _png(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode in ("L", "P") else tuple([value] * len(mode))
    Image.new(mode, size, color).save(path)


def _tree(root: Path) -> None:
    _png(root / "cat" / "a.png", (20, 20), "RGB", 200)
    _png(root / "cat" / "b.png", (10, 14), "L", 100)
    _png(root / "cat" / "sub" / "c.png", (40, 40), "RGBA", 50)
    _png(root / "dog" / "a.png", (16, 16), "RGB", 10)
    _png(root / "dog" / "b.png", (8, 8), "P", 3)
    _png(root / "dog" / "c.png", (33, 17), "L", 255)
    (root / "dog" / "notes.txt").write_text("not an image")


def test_imagefolder_split(tmp_path: Path) -> None:
    _tree(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.34)
    train, val, channels = build_datasets(cfg)
    assert channels == 3  # the first image (cat/a.png) is RGB
    assert train.classes == ["cat", "dog"]
    assert len(train) + len(val) == 6 and len(val) == 2
    x, y = _all(train)
    xv, yv = _all(val)
    assert x.shape == (4, 3, 16, 16) and xv.shape == (2, 3, 16, 16)
    assert sorted(y + yv) == [0, 0, 0, 1, 1, 1]
    assert set(train.paths).isdisjoint(val.paths)
    assert float(torch.cat([x, xv]).min()) >= 0.0 and float(torch.cat([x, xv]).max()) <= 1.0
    by_path = dict(zip(train.paths + val.paths, torch.cat([x, xv])))
    assert torch.allclose(by_path[str(tmp_path / "cat" / "a.png")], torch.full((3, 16, 16), 200 / 255))
    assert torch.allclose(by_path[str(tmp_path / "dog" / "c.png")], torch.ones(3, 16, 16))
    again, _, _ = build_datasets(cfg)
    assert again.paths == train.paths


def test_imagefolder_train_val_and_gray(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "a" / "0.png", (12, 12), "L", 30)
    _png(tmp_path / "train" / "b" / "0.png", (12, 12), "RGB", 60)
    _png(tmp_path / "val" / "b" / "0.png", (9, 9), "L", 90)
    train, val, channels = build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8))
    assert channels == 1  # decided by the first train image
    assert (len(train), len(val)) == (2, 1)
    assert [train[i][1] for i in range(2)] == [0, 1]
    x, y = val[0]
    assert tuple(x.shape) == (1, 8, 8) and y == 1
    assert torch.allclose(x, torch.full((1, 8, 8), 90 / 255))


def test_imagefolder_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class folders in .*" + tmp_path.name):
        build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match=r"class folder .*cat.* holds no images"):
        build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    with pytest.raises(DataError, match="not found"):
        build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="--data-root"):
        build_datasets(DataConfig(dataset="imagefolder", root=None))


def test_imagefolder_scan_hidden_symlinks_and_val_classes(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    _png(elsewhere / "bird" / "0.png", (8, 8), "RGB", 10)
    _png(elsewhere / "more" / "1.png", (8, 8), "RGB", 20)
    root = tmp_path / "root"
    _png(root / "cat" / "0.PNG", (8, 8), "RGB", 30)  # extensions match in any case
    _png(root / "cat" / ".hidden.png", (8, 8), "RGB", 40)
    _png(root / ".thumbs" / "0.png", (8, 8), "RGB", 50)
    (root / "cat" / "linked").symlink_to(elsewhere / "more", target_is_directory=True)
    (root / "bird").symlink_to(elsewhere / "bird", target_is_directory=True)
    train, val, _ = build_datasets(DataConfig(dataset="imagefolder", root=str(root), val_fraction=0.34))
    assert train.classes == ["bird", "cat"]
    names = sorted(Path(p).relative_to(root).as_posix() for p in train.paths + val.paths)
    assert names == ["bird/0.png", "cat/0.PNG", "cat/linked/1.png"]

    split = tmp_path / "split"
    _png(split / "train" / "cat" / "0.png", (8, 8), "RGB", 1)
    _png(split / "train" / "dog" / "0.png", (8, 8), "RGB", 2)
    _png(split / "val" / "cow" / "0.png", (8, 8), "RGB", 3)
    cfg = DataConfig(dataset="imagefolder", root=str(split))
    with pytest.raises(DataError, match=r"class folder .*cow.* has no matching train class") as info:
        build_datasets(cfg)
    assert "\n" not in str(info.value)
    (split / "val" / "cow" / "0.png").rename(split / "val" / "cow" / "0.txt")
    (split / "val" / "cow").rename(split / "val" / "dog")
    with pytest.raises(DataError, match=r"class folder .*val.*dog.* holds no images"):
        build_datasets(cfg)


def test_parquet_bad_uri_is_one_line() -> None:
    with pytest.raises(DataError, match=r"cannot open 'nosuchfs://bucket/x'") as info:
        build_datasets(DataConfig(dataset="parquet", root="nosuchfs://bucket/x"))
    assert "\n" not in str(info.value)


def test_imagefolder_corrupt_file(tmp_path: Path) -> None:
    _tree(tmp_path)
    bad = tmp_path / "dog" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG this is not really a png")
    train, val, _ = build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16))
    with pytest.raises(DataError, match="zz_broken.png") as info:
        for ds in (train, val):
            _all(ds)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------- parquet


def test_to_parquet_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits-pq"
    args = ["--dataset", "digits", "--image-size", "16", "--out", str(out), "--shard-size", "700"]
    assert to_parquet_main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("done: 1617 train + 180 val")
    assert sum(line.startswith("wrote ") for line in printed) == 4  # 3 train shards + 1 val
    assert (out / "_SUCCESS").exists() and not (out / "_INCOMPLETE").exists()
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"part-{i:05d}.parquet" for i in range(3)]
    schema = pq.read_schema(out / "train" / "part-00000.parquet")
    assert schema.field("image").type == pa.binary() and schema.field("label").type == pa.int64()

    ref_train, ref_val, _ = build_datasets(DataConfig(image_size=16))
    train, val, channels = build_datasets(DataConfig(dataset="parquet", root=str(out), image_size=16))
    assert channels == 1
    # the train rows in the order --shuffle-seed 0 fixes, the val rows in theirs
    order = torch.randperm(len(ref_train), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(order, torch.arange(len(order)))
    for ref_images, ref_targets, got in (
        (ref_train.images[order], ref_train.targets[order], train),
        (ref_val.images, ref_val.targets, val),
    ):
        x, y = _all(got)
        assert x.shape == ref_images.shape
        assert float((x - ref_images).abs().max()) <= 1 / 255 + 1e-6
        assert y == ref_targets.tolist()

    # Existing output is not overwritten without --overwrite; with it the run succeeds again.
    assert to_parquet_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert to_parquet_main(args + ["--overwrite", "--channels", "3"]) == 0
    train3, _, channels3 = build_datasets(DataConfig(dataset="parquet", root=str(out), image_size=16))
    assert channels3 == 3 and tuple(train3[0][0].shape) == (3, 16, 16)


def test_to_parquet_mixes_the_classes_of_a_class_ordered_source(tmp_path: Path) -> None:
    """An ImageFolder lists its images class by class; each written train shard mixes them."""
    root = tmp_path / "folder"
    for c, name in enumerate(("ant", "bee", "cat")):
        for i in range(10):
            _png(root / "train" / name / f"{i}.png", (8, 8), "L", 10 * c + i)
            _png(root / "val" / name / f"{i}.png", (8, 8), "L", 10 * c + i)
    out = tmp_path / "pq"
    args = ["--dataset", "imagefolder", "--data-root", str(root), "--image-size", "8", "--out", str(out)]
    assert to_parquet_main([*args, "--shard-size", "10"]) == 0
    shards = [pq.read_table(p).column("label").to_pylist() for p in sorted((out / "train").iterdir())]
    assert len(shards) == 3 and sorted(sum(shards, [])) == [0] * 10 + [1] * 10 + [2] * 10
    assert all(len(set(labels)) > 1 for labels in shards)
    # the same seed writes the same order; another seed another
    assert to_parquet_main([*args, "--shard-size", "10", "--overwrite"]) == 0
    again = [pq.read_table(p).column("label").to_pylist() for p in sorted((out / "train").iterdir())]
    assert again == shards
    assert to_parquet_main([*args, "--shard-size", "10", "--overwrite", "--shuffle-seed", "1"]) == 0
    other = [pq.read_table(p).column("label").to_pylist() for p in sorted((out / "train").iterdir())]
    assert other != shards
    # val keeps the source's order
    assert pq.read_table(out / "val").column("label").to_pylist() == [0] * 10 + [1] * 10 + [2] * 10


def test_to_parquet_cli_bad_dataset(tmp_path: Path) -> None:
    out = tmp_path / "nope"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "vitcae_ray.data.to_parquet", "--dataset", "nope", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown dataset 'nope'")
    assert "digits" in lines[0]
    assert not out.exists()


def _write_table(path: Path, images: list[bytes], labels: list[int]) -> None:
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())})
    pq.write_table(table, path)


def _png_bytes(mode: str, size: int, value: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_single_file_split_resize_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "imgs.parquet"
    images = [_png_bytes("RGB", 24, 10 * i) for i in range(10)]
    _write_table(path, images, list(range(10)))
    train, val, channels = build_datasets(
        DataConfig(dataset="parquet", root=str(path), image_size=8, val_fraction=0.2)
    )
    assert channels == 3 and (len(train), len(val)) == (8, 2)
    for ds in (train, val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert tuple(x.shape) == (3, 8, 8)
            assert torch.allclose(x, torch.full((3, 8, 8), 10 * y / 255), atol=1e-6)

    broken = tmp_path / "broken.parquet"
    _write_table(broken, [_png_bytes("L", 8, 1), b"garbage", _png_bytes("L", 8, 2)], [0, 1, 2])
    cfg = DataConfig(dataset="parquet", root=str(broken), image_size=8, val_fraction=0.3)
    train, val, _ = build_datasets(cfg)
    with pytest.raises(DataError, match=r"row 1 of .*broken.parquet"):
        for ds in (train, val):
            _all(ds)

    nolabel = tmp_path / "nolabel.parquet"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), nolabel)
    with pytest.raises(DataError, match=r"nolabel.parquet.*no column 'label'"):
        build_datasets(DataConfig(dataset="parquet", root=str(nolabel)))
    with pytest.raises(DataError, match=r"missing.parquet.* not found"):
        build_datasets(DataConfig(dataset="parquet", root=str(tmp_path / "missing.parquet")))


# ------------------------------------------------------------------------------ registry, errors


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(dataset="imagenet22k"))
    msg = str(info.value)
    assert "imagenet22k" in msg
    for name in ("digits", "mnist", "cifar10", "celeba", "imagefolder", "parquet"):
        assert name in msg and name in DATASETS


def test_image_size_too_small() -> None:
    with pytest.raises(DataError, match="image_size"):
        build_datasets(DataConfig(image_size=4))


@pytest.mark.parametrize("name", ["mnist", "cifar10", "celeba"])
def test_torchvision_missing_root(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DataError, match="--data-root") as info:
        build_datasets(DataConfig(dataset=name, root=str(missing), download=False))
    assert str(missing) in str(info.value) and name in str(info.value)
    with pytest.raises(DataError, match="--data-root"):
        build_datasets(DataConfig(dataset=name, root=None))
    # The folder exists but holds no dataset files: torchvision's error becomes one line.
    with pytest.raises(DataError, match="--data-root") as info:
        build_datasets(DataConfig(dataset=name, root=str(tmp_path), download=False))
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def test_parquet_rows_come_from_the_footers_alone(tmp_path: Path) -> None:
    """The streamed split's row count reads the footers: it holds where the data pages are
    unreadable, and matches a full read where they are not."""
    from vitcae_ray.data.files import parquet_rows, resolve

    folder = tmp_path / "train"
    folder.mkdir()
    for i, n in enumerate((5, 7)):
        table = pa.table({"image": [bytes([i]) * 4000] * n, "label": list(range(n))})
        pq.write_table(table, folder / f"part-{i:05d}.parquet", compression="none")
    fs, path = resolve(str(folder))
    assert parquet_rows(fs, path, "train") == 12 == pq.read_table(folder).num_rows
    part = folder / "part-00001.parquet"
    raw = bytearray(part.read_bytes())
    raw[4:64] = b"\xff" * 60  # the first data page's header; the footer intact
    part.write_bytes(bytes(raw))
    with pytest.raises(Exception):  # noqa: B017 - whatever pyarrow raises on a broken page
        pq.read_table(folder).column("image").to_pylist()
    assert parquet_rows(fs, path, "train") == 12
    with pytest.raises(DataError, match=r"^dataset 'parquet': cannot read 'nowhere'"):
        parquet_rows(fs, str(tmp_path / "missing"), "nowhere")
