"""`mmoe-ds prepare`: the embedded real dataset, folder and HF sources, determinism, no leakage,
atomic output, and interoperability of the shards with `datasets` and `webdataset`."""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest_data import digest, make_loader, manifest, read_samples, shards_of
from PIL import Image

from mmoe_ds.data import CLASS_NAMES, class_caption, class_captions, sources
from mmoe_ds.data import prepare as prepare_mod
from mmoe_ds.data.captions import TEMPLATES
from mmoe_ds.data.sources import Record

# the module (the package's attribute `embedded` is its function): where the system data lives
embedded_module = importlib.import_module("mmoe_ds.data.sources.embedded")

REPO = Path(__file__).resolve().parents[1]
SMALL_ARGS = ["--small", "--samples-per-shard", "100", "--max-length", "48"]  # as conftest's small_dataset


def all_samples(data_dir):
    """(split, kind, key, files) of every sample of a prepared dataset."""
    for rel, info in sorted(manifest(data_dir)["shards"].items()):
        for key, files in read_samples(Path(data_dir) / rel):
            yield info["split"], info["kind"], key, files


# -- the embedded dataset --------------------------------------------------------------------------
def test_two_builds_are_byte_identical_and_the_seed_only_reorders(small_dataset, tmp_path):
    again = tmp_path / "again"
    env = dict(os.environ, PYTHONHASHSEED="7", HF_HUB_OFFLINE="1")  # another process, another hash seed
    subprocess.run([sys.executable, "-m", "mmoe_ds.cli", "prepare", "--out", str(again), *SMALL_ARGS],
                   cwd=REPO, env=env, check=True, capture_output=True)
    assert digest(again) == digest(small_dataset)

    reseeded = tmp_path / "reseeded"
    assert prepare_mod.main(["--out", str(reseeded), "--seed", "1", *SMALL_ARGS]) == 0
    m0, m1 = manifest(small_dataset), manifest(reseeded)
    assert m1["counts"] == m0["counts"] and m1["shards"].keys() == m0["shards"].keys()
    rel = shards_of(small_dataset, "train", "image_text")[0]
    assert m1["shards"][rel]["sha256"] != m0["shards"][rel]["sha256"]
    keys = lambda d: sorted(k for s, _, k, _ in all_samples(d))  # noqa: E731
    assert keys(reseeded) == keys(small_dataset)


def test_manifest_matches_the_shards(small_dataset):
    m = manifest(small_dataset)
    counts = {split: Counter() for split in m["counts"]}
    for rel, info in m["shards"].items():
        path = small_dataset / rel
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"], rel
        samples = read_samples(path)
        assert len(samples) == info["samples"]
        for key, files in samples:
            meta = json.loads(files["json"])
            assert meta["modality"] == info["kind"] and meta["source"] == info["source"], (rel, key)
            assert meta["license"] and "label" in meta
            assert ("png" in files) == (info["kind"] != "text") and ("txt" in files) == (info["kind"] != "image")
        counts[info["split"]][info["kind"]] += len(samples)
    assert {s: dict(c) for s, c in counts.items()} == {s: {k: n for k, n in c.items() if n}
                                                        for s, c in m["counts"].items()}
    assert m["classes"] == CLASS_NAMES
    assert m["build"]["fashion_mnist_debian"] == (embedded_module.FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists()
    assert m["build"]["wordnet_debian"] == (embedded_module.WORDNET_DIR / "data.noun").exists()
    assert m["build"]["source"] == "embedded" and m["build"]["size"] == "small"
    assert (small_dataset / "processor" / "processor_config.json").exists()
    assert all(sum(m["counts"][split].values()) > 0 for split in ("train", "validation", "test"))


def test_no_content_is_shared_between_splits(small_dataset):
    owners: dict[str, set] = {}
    for split, _, _, files in all_samples(small_dataset):
        if "png" in files:
            image = Image.open(io.BytesIO(files["png"]))
            content = hashlib.sha1(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
        else:
            content = " ".join(files["txt"].decode().split()).casefold()
        owners.setdefault(content, set()).add(split)
    assert all(len(splits) == 1 for splits in owners.values())


def test_cross_split_duplicates_stay_in_the_first_of_test_validation_train():
    def rec(split, key, pixel=None, text=None):
        image = Image.new("L", (4, 4), pixel) if pixel is not None else None
        return Record(split, "image_text" if image and text else ("image" if image else "text"), "s", key, image, text,
                      None, "")

    records = [rec("train", "a", 1, "one"), rec("train", "b", 1, "uno"), rec("test", "c", 1, "un"),
               rec("train", "d", 2, "two"), rec("train", "e", 2, "zwei"), rec("validation", "f", text="A  gloss"),
               rec("train", "g", text="a gloss"), rec("train", "h", text="another gloss")]
    kept, dropped = prepare_mod.drop_cross_split_duplicates(records)
    assert [r.key for r in kept] == ["c", "d", "e", "f", "h"]  # same image twice within train is kept
    assert dropped == Counter({"train": 3})


def test_captions_come_from_class_names_through_templates(small_dataset):
    assert class_caption("fashion_mnist", 9) == "an ankle boot"
    assert class_caption("fashion_mnist", 0) == "a T-shirt"
    assert class_caption("digits", 7) == "a handwritten seven"
    assert class_caption("digits", 7, template=1) == "a picture of a handwritten seven"
    assert class_captions("fashion_mnist")[9] == "an ankle boot" and len(class_captions("digits")) == 10
    with pytest.raises(ValueError, match="source"):
        class_caption("cifar", 0)
    used_templates = Counter()
    for split, kind, key, files in all_samples(small_dataset):
        meta = json.loads(files["json"])
        if kind != "image_text" or meta["source"] not in CLASS_NAMES:
            continue
        caption = files["txt"].decode()
        variants = [class_caption(meta["source"], meta["label"], t) for t in range(len(TEMPLATES))]
        assert caption in variants, (key, caption)
        assert split != "test" or caption == variants[0]  # test captions are the canonical ones
        used_templates[variants.index(caption)] += 1
    assert len(used_templates) == len(TEMPLATES)


def test_photos_are_captioned_by_their_docstrings_and_texts_are_real_english(small_dataset):
    from skimage import data

    photos = {key: files["txt"].decode() for _, _, key, files in all_samples(small_dataset)
              if key.startswith("skimage_")}
    assert photos["skimage_astronaut"] == "Color image of the astronaut Eileen Collins"
    for key, caption in photos.items():
        assert caption == getattr(data, key[len("skimage_"):]).__doc__.strip().splitlines()[0].rstrip(".")
    texts = [files["txt"].decode() for _, kind, _, files in all_samples(small_dataset) if kind == "text"]
    assert len(texts) > 500 and all(len(t.split()) >= 4 for t in texts)
    assert manifest(small_dataset)["build"]["text_source"] in ("wordnet", "licenses", "python_docs")


def test_falls_back_cleanly_without_the_debian_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(embedded_module, "FASHION_DIR", tmp_path / "absent")  # as on a system without them
    monkeypatch.setattr(embedded_module, "WORDNET_DIR", tmp_path / "absent")
    out = tmp_path / "fallback"
    assert prepare_mod.main(["--out", str(out), *SMALL_ARGS]) == 0
    m = manifest(out)
    assert m["build"]["fashion_mnist_debian"] is False and m["build"]["wordnet_debian"] is False
    assert "fashion_mnist" not in m["sources"] and {"digits", "skimage"} <= set(m["sources"])
    assert m["build"]["text_source"] == ("licenses" if embedded_module.LICENSES_DIR.is_dir() else "python_docs")
    batch = next(iter(make_loader(out, seed=0)))
    assert batch["sample_kind"].tolist() == [0] * 5 + [1] * 2 + [2]

    monkeypatch.setattr(embedded_module, "LICENSES_DIR", tmp_path / "absent")
    source, texts, _ = sources.english_texts(limit=300)
    assert source == "python_docs" and len(texts) == 300 and len(set(texts)) == 300


# -- user sources ----------------------------------------------------------------------------------
def _gray(value: int, size=(20, 20)) -> Image.Image:
    return Image.fromarray(np.full(size[::-1], value, dtype=np.uint8))


def test_prepare_from_a_folder_of_captioned_images(tmp_path):
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for i in range(40):
        where = folder / ("nested" if i % 2 else "")  # dots in names: keys must not keep them
        _gray(i * 6).save(where / f"img.{i}.png")
        (where / f"img.{i}.txt").write_text(f"a gray square of shade {i}\n")
    Image.new("RGBA", (30, 10), (255, 0, 0, 128)).save(folder / "rgba.png")
    (folder / "rgba.txt").write_text("a red bar")
    Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * 100).save(folder / "deep.png")
    (folder / "deep.txt").write_text("a 16-bit gradient")
    _gray(5).save(folder / "uncaptioned.png")
    _gray(5).save(folder / "silent.jpg")
    (folder / "silent.txt").write_text("  \n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "broken.txt").write_text("never read")

    out = tmp_path / "prepared"
    args = ["--source", "folder", "--input", str(folder), "--out", str(out), "--vocab-size", "300"]
    assert prepare_mod.main(args) == 0
    m = manifest(out)
    assert sum(sum(c.values()) for c in m["counts"].values()) == 42
    assert m["report"]["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "no_caption": 1}
    assert m["report"]["changed"] == {"converted": 2}  # RGBA -> RGB, I;16 -> L
    assert {Image.open(io.BytesIO(f["png"])).mode for _, _, _, f in all_samples(out)} == {"L", "RGB"}
    batch = next(iter(make_loader(out, composition={"image_text": 4})))
    assert batch["has_image"].all() and (batch["labels"] != -100).any()
    assert all(k.startswith("folder/") and "." not in k.split("/", 1)[1] for k in batch["keys"])


def test_prepare_from_a_local_hf_dataset_keeps_its_splits(tmp_path):
    import datasets

    def part(n, offset):
        images = [_gray(offset + i, (12, 12)) for i in range(n)]
        texts = [f"shade number {offset + i}" for i in range(n)]
        return images, texts

    train_images, train_texts = part(24, 0)
    train_images[3], train_texts[5] = None, ""  # rows a real dataset might have: left out and counted
    test_images, test_texts = part(6, 100)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": train_images, "caption": train_texts}, features=features),
        "test": datasets.Dataset.from_dict({"image": test_images, "caption": test_texts}, features=features)})
    ds.save_to_disk(tmp_path / "hf")
    out = tmp_path / "prepared"
    args = ["--source", "hf", "--input", str(tmp_path / "hf"), "--out", str(out), "--vocab-size", "300"]
    assert prepare_mod.main(args) == 2  # the text column is called "caption" here: a clear error, no output
    assert not out.exists()
    assert prepare_mod.main(args + ["--text-column", "caption"]) == 0
    m = manifest(out)
    # its test split is kept; the validation split it lacks is hashed out of its train rows (and said)
    assert m["counts"]["test"]["image_text"] == 6 and m["counts"]["validation"]["image_text"] > 0
    assert m["counts"]["train"]["image_text"] + m["counts"]["validation"]["image_text"] == 22
    assert "no validation split" in m["build"]["splits"] and "--validation-fraction" in m["build"]["splits"]
    assert m["report"]["skipped"] == {"empty_caption": 1, "no_image": 1}


# -- robustness of the command ---------------------------------------------------------------------
def test_a_failed_prepare_leaves_the_previous_output_untouched(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        _gray(i * 10).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"shade {i}")
    out = tmp_path / "out"
    args = ["--source", "folder", "--input", str(folder), "--out", str(out), "--vocab-size", "300"]
    assert prepare_mod.main(args) == 0
    before = digest(out)

    # records no source yields (a CMYK image cannot be stored as PNG): the build fails after the
    # train shards were written
    records = [Record("train", "image_text", "s", f"k{i}", _gray(i), f"shade {i}", None, "") for i in range(10)]
    records.append(Record("validation", "image_text", "s", "cmyk", Image.new("CMYK", (4, 4)), "cmyk", None, ""))
    with pytest.raises(OSError, match="CMYK"):
        prepare_mod.write_dataset(records, out, vocab_size=300)
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]  # no temp dir left behind


def test_prepare_rejects_bad_arguments_with_a_message(tmp_path, capsys):
    assert prepare_mod.main(["--source", "folder", "--out", str(tmp_path / "x")]) == 2
    assert "--input" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    empty = ["--source", "folder", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]
    assert prepare_mod.main(empty) == 2
    assert "the folder is empty" in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    assert prepare_mod.main(empty) == 2
    assert "no training samples" in capsys.readouterr().err and not (tmp_path / "x").exists()


# -- interoperability ------------------------------------------------------------------------------
def test_hf_datasets_reads_our_shards(small_dataset):
    import datasets

    m = manifest(small_dataset)
    for kind, image, text in [("image_text", True, True), ("text", False, True), ("image", True, False)]:
        rels = shards_of(small_dataset, "validation", kind)
        ds = datasets.load_dataset("webdataset", data_files={"validation": [str(small_dataset / r) for r in rels]},
                                   split="validation")
        assert len(ds) == sum(m["shards"][r]["samples"] for r in rels)
        row = ds[0]
        assert row["json"]["modality"] == kind and row["__key__"]
        assert isinstance(row.get("png"), Image.Image) == image and bool(row.get("txt")) == text


def test_webdataset_reads_our_shards_like_our_reader(small_dataset):
    import webdataset as wds

    rels = shards_of(small_dataset, "validation", "image_text")
    urls = [str(small_dataset / r) for r in rels]
    theirs = [(s["__key__"], s["txt"]) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    ours = [(key, files["txt"]) for url in urls for key, files in read_samples(url)]
    assert theirs == ours and len(ours) > 100


def test_our_reader_reads_tars_from_other_writers(tmp_path):
    import tarfile

    import webdataset as wds

    from mmoe_ds.data.shards import iter_raw
    from mmoe_ds.data.skips import SkipLog

    long_key = "deep/" + "x" * 120 + "_é"  # needs pax (or GNU) records for its name
    expected = [(long_key, {"txt": b"caption one", "json": b"{}"}), ("plain", {"txt": b"caption two", "json": b"{}"})]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            directory = tarfile.TarInfo("deep")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            for key, files in expected:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 1.5  # a fractional mtime: another pax record
                    tar.addfile(info, io.BytesIO(data))
        skips = SkipLog()
        assert list(iter_raw(str(path), skips)) == expected and not any(skips.counts().values())

    path = tmp_path / "wds.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "sample0", "txt": "a caption", "json": {"modality": "text"}})
    skips = SkipLog()
    assert [(k, sorted(f)) for k, f in iter_raw(str(path), skips)] == [("sample0", ["json", "txt"])]
