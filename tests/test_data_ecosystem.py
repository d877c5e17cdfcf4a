"""Data as users' tools make it (issue 19): HF datasets built with `datasets` itself, HF captioned
image folders, img2dataset output folders; splits for inputs without held-out data; `--check`
agreeing with the launch; our shards read back by HF's webdataset builder."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest_data import manifest, read_samples
from foreign_shards import write_img2dataset_output
from PIL import Image

from mmoe_ds.data import prepare as prepare_mod
from mmoe_ds.data.index import main as index
from mmoe_ds.data.sources import PrepareReport, Record

REPO = Path(__file__).resolve().parents[1]
DS_CONFIG = str(REPO / "ds_configs/cpu_zero1_fp32.json")
WORDS = ["red", "green", "blue", "small", "large", "round", "square", "bright"]


def _image(i: int, size: int = 12) -> Image.Image:
    """A distinct image per i (no cross-split duplicates between the samples of a test)."""
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _caption(i: int) -> str:
    return f"a {WORDS[i % 8]} {WORDS[(i // 8) % 8]} thing number {i}"


def _prepare(*args: str) -> int:
    return prepare_mod.main([*args, "--vocab-size", "300"])


def _counts(out: Path) -> dict[str, int]:
    """Samples per split (all kinds)."""
    return {split: sum(kinds.values()) for split, kinds in manifest(out)["counts"].items()}


def _imagefolder(folder: Path, n: int, first: int = 0, split_dir: str | None = "train") -> Path:
    """HF's captioned image folder: images + metadata.jsonl (file_name, text)."""
    where = folder / split_dir if split_dir else folder
    where.mkdir(parents=True)
    with open(where / "metadata.jsonl", "w") as f:
        for i in range(first, first + n):
            _image(i).save(where / f"img{i:03d}.png")
            f.write(json.dumps({"file_name": f"img{i:03d}.png", "text": _caption(i)}) + "\n")
    return folder


def _hf_dataset(n: int, first: int = 0):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [_image(i) for i in range(first, first + n)],
                                       "text": [_caption(i) for i in range(first, first + n)]}, features=features)


# -- 1. a relative --input named like a builder is that folder ------------------------------------------
def test_hf_input_named_like_a_builder_reads_that_folder(tmp_path, monkeypatch):
    import datasets

    work = tmp_path / "work"
    _imagefolder(work / "imagefolder", 30)
    (work / "parquet").mkdir(parents=True)
    _hf_dataset(20, first=100).to_parquet(str(work / "parquet" / "part-0.parquet"))
    texts = datasets.Dataset.from_dict({"text": [_caption(i) for i in range(200, 240)]})
    (work / "json").mkdir()
    texts.to_json(str(work / "json" / "rows.jsonl"))
    (work / "csv").mkdir()
    texts.select(range(25)).to_csv(str(work / "csv" / "rows.csv"), index=False)
    monkeypatch.chdir(work)
    for name, extra, total in (("imagefolder", [], 30), ("parquet", [], 20), ("json", ["--image-column", "none"], 40),
                               ("csv", ["--image-column", "none"], 25)):
        relative, absolute = tmp_path / f"rel-{name}", tmp_path / f"abs-{name}"
        assert _prepare("--source", "hf", "--input", name, "--out", str(relative), *extra) == 0
        assert _prepare("--source", "hf", "--input", str(work / name), "--out", str(absolute), *extra) == 0
        assert _counts(relative) == _counts(absolute) and sum(_counts(relative).values()) == total, name
        assert manifest(relative)["report"]["skipped"] == {}, name  # nothing from the other folders


def test_a_bare_name_that_is_no_path_is_not_tried_as_a_hub_id(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _prepare("--source", "hf", "--input", "imagefolder", "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


# -- 4. inputs with only a train split get held-out splits, stably ----------------------------------
def test_train_only_inputs_get_validation_and_test_by_a_stable_hash(tmp_path, capsys):
    import datasets

    _imagefolder(tmp_path / "imagefolder", 60)
    datasets.DatasetDict({"train": _hf_dataset(60, first=100)}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "parquet").mkdir()
    for part in range(2):
        _hf_dataset(30, first=200 + 30 * part).to_parquet(str(tmp_path / "parquet" / f"part-{part}.parquet"))
    for name in ("imagefolder", "dict", "parquet"):
        runs = []
        for run in range(2):
            out = tmp_path / f"out-{name}-{run}"
            assert _prepare("--source", "hf", "--input", str(tmp_path / name), "--out", str(out)) == 0
            assert "note: splits: validation 10%, test 10%" in capsys.readouterr().out
            runs.append(out)
        counts = _counts(runs[0])
        assert counts["validation"] > 0 and counts["test"] > 0 and sum(counts.values()) == 60, (name, counts)
        assert "--validation-fraction" in manifest(runs[0])["build"]["splits"]
        assert manifest(runs[0])["shards"] == manifest(runs[1])["shards"], name  # same split, same bytes
    out = tmp_path / "out-more"
    assert _prepare("--source", "hf", "--input", str(tmp_path / "dict"), "--out", str(out),
                    "--validation-fraction", "0.3", "--test-fraction", "0.3") == 0
    assert _counts(out)["train"] < _counts(tmp_path / "out-dict-0")["train"]
    with pytest.raises(SystemExit) as exit_:  # a usage error, before anything is read
        _prepare("--source", "hf", "--input", str(tmp_path / "dict"), "--out", str(out),
                 "--validation-fraction", "0.5", "--test-fraction", "0.5")
    assert exit_.value.code == 2
    # --check passes on such data with the pairs recipe
    recipe = _recipe(tmp_path, runs[0], max_length=64)
    proc = _check(recipe)
    assert proc.returncode == 0 and "configuration OK" in proc.stdout, proc.stdout + proc.stderr


# -- 5. HF's captioned image folder through --source folder and --source hf -------------------------
def test_hf_captioned_image_folder_prepares_through_folder_and_hf_alike(tmp_path, capsys):
    folder = _imagefolder(tmp_path / "captioned", 40)
    _imagefolder(folder, 10, first=40, split_dir="test")
    assert _prepare("--source", "folder", "--input", str(folder), "--out", str(tmp_path / "f")) == 0
    assert _prepare("--source", "hf", "--input", str(folder), "--out", str(tmp_path / "h")) == 0
    assert sum(_counts(tmp_path / "f").values()) == sum(_counts(tmp_path / "h").values()) == 50
    assert manifest(tmp_path / "f")["report"]["skipped"] == {}
    # without any caption: the error names both layouts and --source hf
    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(5):
        _image(i).save(bare / f"{i}.png")
    capsys.readouterr()
    assert _prepare("--source", "folder", "--input", str(bare), "--out", str(tmp_path / "b")) == 2
    err = capsys.readouterr().err
    assert ".txt" in err and "metadata.jsonl" in err and "--source hf" in err and err.count("\n") == 1


# -- 6. caption columns holding lists -------------------------------------------------------------
def test_a_list_caption_column_gives_first_or_one_sample_per_caption(tmp_path, capsys):
    import datasets

    lengths = [1 + i % 4 for i in range(24)]
    sentences = [[f"{_caption(i)} said {j}" for j in range(n)] for i, n in enumerate(lengths)]
    ds = datasets.Dataset.from_dict({"image": [_image(i) for i in range(24)], "sentences": sentences},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "sentences": [datasets.Value("string")]}))
    ds.save_to_disk(str(tmp_path / "coco"))
    capsys.readouterr()  # datasets' progress bars
    base = ["--source", "hf", "--input", str(tmp_path / "coco"), "--text-column", "sentences"]
    assert _prepare(*base, "--out", str(tmp_path / "none")) == 2  # one line naming the option
    err = capsys.readouterr().err
    assert "holds lists of captions" in err and "--caption-select" in err and err.count("\n") == 1
    assert _prepare(*base, "--caption-select", "first", "--out", str(tmp_path / "first")) == 0
    assert sum(_counts(tmp_path / "first").values()) == 24
    assert _prepare(*base, "--caption-select", "all", "--out", str(tmp_path / "all")) == 0
    assert sum(_counts(tmp_path / "all").values()) == sum(lengths)
    keys, split_of_row = [], {}
    for rel, info in manifest(tmp_path / "all")["shards"].items():
        for key, files in read_samples(tmp_path / "all" / rel):
            keys.append(key)
            row = json.loads(files["json"])["origin"].rsplit("[", 1)[0]
            assert split_of_row.setdefault(row, info["split"]) == info["split"]  # a row's captions in one split
    assert len(set(keys)) == len(keys) == sum(lengths)
    assert _prepare(*base, "--caption-select", "all", "--out", str(tmp_path / "again")) == 0
    assert manifest(tmp_path / "again")["shards"] == manifest(tmp_path / "all")["shards"]  # stable keys and bytes


# -- 7. index over an img2dataset output folder --------------------------------------------------
def test_index_ignores_img2dataset_side_files_and_refuses_missing_shards(tmp_path, capsys):
    shards = tmp_path / "shards"
    names = write_img2dataset_output(shards, 3, 8)
    missing = str(shards / "00009.tar")
    args = ["--train", str(shards / "*"), "--train", missing, "--out"]
    assert index(args + [str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "00009.tar" in err and err.count("\n") == 1 and not (tmp_path / "refused").exists()
    assert index(args + [str(tmp_path / "idx"), "--allow-missing"]) == 0
    captured = capsys.readouterr()
    m = manifest(tmp_path / "idx")
    assert sorted(Path(k).name for k in m["shards"]) == names  # no .parquet / _stats.json
    assert m["build"]["ignored_files"] == 6 and m["build"]["missing_shards"] == [missing]
    assert "6 files that are not tar shards ignored" in captured.err and "only a train split" in captured.err
    assert m["counts"]["train"]["image_text"] == 24


def test_index_refuses_an_unreadable_shard_unless_allowed(tmp_path, capsys):
    shards = tmp_path / "shards"
    write_img2dataset_output(shards, 2, 4)
    args = ["--train", str(shards / "*.tar"), "--train", f"pipe:cat {shards / 'gone.tar'}", "--out"]
    assert index(args + [str(tmp_path / "a")]) == 2
    assert "cannot be read, first pipe:cat" in capsys.readouterr().err
    assert index(args + [str(tmp_path / "b"), "--allow-missing"]) == 0
    assert len(manifest(tmp_path / "b")["shards"]) == 2


# -- 8. our shards read by HF's webdataset builder --------------------------------------------------
def test_hf_webdataset_builder_keeps_every_caption_of_our_shards(small_dataset):
    import datasets

    m = manifest(small_dataset)
    files = {split: sorted(glob.glob(str(small_dataset / split / "*.tar"))) for split in ("train", "validation")}
    loaded = datasets.load_dataset("webdataset", data_files=files)
    for split in files:
        expected = m["counts"][split]["image_text"] + m["counts"][split]["text"]
        captions = sum(1 for t in loaded[split]["txt"] if t)
        images = sum(1 for p in loaded[split]["png"] if p is not None)
        assert captions == expected and images == m["counts"][split]["image_text"] + m["counts"][split]["image"]
        assert all(meta["origin"] for meta in loaded[split]["json"])  # where each sample came from


def test_prepared_json_keeps_the_source_file(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(12):
        _image(i).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(_caption(i))
    assert _prepare("--source", "folder", "--input", str(folder), "--out", str(tmp_path / "out")) == 0
    origins = {json.loads(files["json"])["origin"] for rel in manifest(tmp_path / "out")["shards"]
               for _, files in read_samples(tmp_path / "out" / rel)}
    assert origins == {f"p{i}.png" for i in range(12)}


# -- 2, 3. --check: a misspelled data.dir, and data that does not fit the model ------------------------
def _recipe(tmp_path: Path, data_dir: Path, **data) -> Path:
    raw = json.loads((REPO / "recipes/pairs_cpu.json").read_text())
    raw["data"].update({"dir": str(data_dir), "composition": {"image_text": 4}, **data})
    raw["train"]["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    return path


def _check(recipe: Path, launch: bool = False) -> subprocess.CompletedProcess:
    code = ("import sys, mmoe_ds.train as t; rc = t.main(sys.argv[1:]); "
            "print('deepspeed imported' if 'deepspeed' in sys.modules else 'deepspeed not imported'); sys.exit(rc)")
    args = ["--recipe", str(recipe), "--deepspeed_config", DS_CONFIG] + ([] if launch else ["--check"])
    return subprocess.run([sys.executable, "-c", code, *args] + ([] if launch else ["--world_size", "2"]),
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "2",
                               "PYTHONPATH": str(REPO)})


def test_a_misspelled_data_dir_fails_check_naming_the_path(tmp_path):
    recipe = json.loads((REPO / "recipes/pairs_cpu.json").read_text())
    recipe["data"].update(dir=str(tmp_path / "data" / "mnie"), prepare_if_missing=True)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    proc = _check(path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    assert f"data.dir={tmp_path / 'data' / 'mnie'} does not exist" in proc.stderr
    assert "builds only the embedded dataset" in proc.stderr and not (tmp_path / "data").exists()


def test_check_refuses_what_the_launch_refuses_with_the_same_message(tmp_path):
    shards = tmp_path / "shards"
    write_img2dataset_output(shards, 4, 10)
    data = tmp_path / "indexed"
    assert index(["--shards", str(shards / "*.tar"), "--validation-fraction", "0.3", "--test-fraction", "0.3",
                  "--out", str(data)]) == 0
    recipe = _recipe(tmp_path, data, max_length=48)  # index's default 224 px / patch 16: 196 image tokens
    check, launch = _check(recipe), _check(recipe, launch=True)
    assert check.returncode == launch.returncode == 2, check.stdout + check.stderr
    assert "max_length=48" in check.stderr and "196" in check.stderr
    assert check.stderr == launch.stderr and check.stderr.count("\n") == 1
    assert "deepspeed not imported" in check.stdout + launch.stdout
    ok = _check(_recipe(tmp_path, data, max_length=260))
    assert ok.returncode == 0 and "configuration OK" in ok.stdout, ok.stdout + ok.stderr


# -- the streaming writer against the list rule it replaces ------------------------------------------
def test_streamed_cross_split_check_equals_the_reference_rule(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(300):
        split = ["train", "validation", "test"][int(rng.choice(3, p=[0.6, 0.2, 0.2]))]
        pixel = int(rng.integers(0, 40))
        text = None if rng.random() < 0.3 else f"text {int(rng.integers(0, 30))}"
        image = None if (text is not None and rng.random() < 0.3) else Image.new("L", (4, 4), pixel)
        kind = "image_text" if image is not None and text else ("image" if image is not None else "text")
        records.append(Record(split, kind, "s", f"k{i}", image, text, None, "", origin=f"item{i}"))
    expected_report = PrepareReport()
    kept, dropped = prepare_mod.drop_cross_split_duplicates(records, expected_report)
    out, report = tmp_path / "out", PrepareReport()
    prepare_mod.write_dataset(iter(records), out, samples_per_shard=7, vocab_size=300, report=report)
    written = {key for rel in manifest(out)["shards"] for key, _ in read_samples(out / rel)}
    assert written == {r.key for r in kept} and dropped
    assert sorted(report.skipped, key=str) == sorted(expected_report.skipped, key=str)
    assert manifest(out)["dropped_cross_split_duplicates"] == dict(dropped)


def test_metadata_rows_without_an_image_and_unselected_lists_are_named(tmp_path):
    folder = tmp_path / "meta"
    folder.mkdir()
    rows = [{"file_name": f"m{i}.png", "text": _caption(i)} for i in range(6)]
    rows += [{"file_name": "gone.png", "text": "no such file"}, {"file_name": "m6.png", "text": ["one", "two"]},
             {"file_name": "m7.png"}]
    for i in range(8):
        _image(i).save(folder / f"m{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert _prepare("--source", "folder", "--input", str(folder), "--out", str(tmp_path / "out")) == 0
    skipped = {e["item"]: (e["reason"], e["detail"]) for e in
               map(json.loads, (tmp_path / "out" / "skipped.jsonl").read_text().splitlines())}
    assert skipped["metadata.jsonl:7"][0] == "no_image" and skipped["metadata.jsonl:10"][0] == "bad_json"
    assert skipped["metadata.jsonl:8"][0] == "bad_text" and "--caption-select" in skipped["metadata.jsonl:8"][1]
    assert skipped["metadata.jsonl:9"][0] == "no_caption" and skipped["m7.png"][0] == "no_caption"
    assert sum(_counts(tmp_path / "out").values()) == 6
