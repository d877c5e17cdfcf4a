"""Bring your own data (issue 8, part A): every source behind one interface, messy inputs built the
way users have them, every skipped file named with its reason, and the loader reading exactly what
the manifest counts."""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest_data import manifest, read_samples
from PIL import Image, ImageFile

from mmoe_ds.data import BalancedLoader, LoaderConfig
from mmoe_ds.data import prepare as prepare_mod
from mmoe_ds.data.sources import SKIP_REASONS, SOURCES, Source

N_DIGITS = 40


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit gray) with a few bytes of pixel data: cheap to
    write, and decoding it would fail, so a skip for size proves nothing was decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def digit_images(n: int) -> list[tuple[Image.Image, int]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [(Image.fromarray((x * 255 / 16).round().astype(np.uint8)).resize((16, 16), Image.NEAREST), int(y))
              for x, y in zip(d.images[:n], d.target[:n])]
    assert len({im.tobytes() for im, _ in images}) == n  # the good pairs are distinct by construction
    return images


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def messy_folder(root: Path) -> None:
    """40 good pairs (sklearn digits as PNG and JPEG) and the problem files a real folder holds."""
    digits = digit_images(N_DIGITS)
    for i, (image, label) in enumerate(digits):
        where = root / f"digit_{label}"
        where.mkdir(parents=True, exist_ok=True)
        image.save(where / f"d{i:03d}.{'png' if i % 2 else 'jpg'}")
        (where / f"d{i:03d}.txt").write_text(f"a handwritten digit {WORDS[label]}\n")

    def pair(name: str, caption: bytes | str, image: bytes | Image.Image | None, fmt: str = "PNG"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, Image.Image):
            image.save(path, format=fmt)
        elif image is not None:
            path.write_bytes(image)
        if caption is not None:
            data = caption.encode() if isinstance(caption, str) else caption
            path.with_suffix(".txt").write_bytes(data)

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    pair("bad_caption.png", "café au lait".encode("cp1252"), Image.new("L", (9, 9), 40))
    pair("utf16.png", "naïve drawing".encode("utf-16"), Image.new("L", (9, 9), 41))
    pair("cmyk.jpg", "a cmyk photo", Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG")
    pair("fake.png", "a text file named png", b"hello, I am not an image\n")
    pair("zero.png", "an empty file", b"")
    pair("truncated.png", "a truncated png", _png(rgb)[:len(_png(rgb)) * 2 // 3])
    jpeg = io.BytesIO()
    rgb.resize((128, 96)).save(jpeg, format="JPEG", quality=95)
    pair("cut.jpg", "a truncated jpeg", jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    pair("lonely.png", None, Image.new("L", (9, 9), 42))
    (root / "orphan.txt").write_text("a caption without its image")
    pair("empty.png", "  \n\t ", Image.new("L", (9, 9), 43))
    pair("a b.png", "a with a space", Image.new("L", (9, 9), 44))
    pair("a_b.png", "a with an underscore", Image.new("L", (9, 9), 45))
    pair("r0.png", "r zero, twice", Image.new("L", (9, 9), 46))
    pair("r0.jpg", None, Image.new("RGB", (9, 9), (200, 10, 10)), "JPEG")
    pair("huge.png", "twenty thousand squared", png_header_only(20000, 20000))
    pair("big.png", "twelve thousand squared", png_header_only(12000, 12000))
    pair("deep16.png", "a 16-bit ramp", Image.fromarray((np.arange(400, dtype=np.uint16) * 150).reshape(20, 20)))
    pair("rgba.png", "a half transparent red bar", Image.new("RGBA", (30, 10), (255, 0, 0, 128)))
    pair("palette.png", "a palette image", rgb.convert("P", palette=Image.ADAPTIVE, colors=16))
    pair("bw.png", "a one-bit checker", Image.fromarray(np.indices((8, 8)).sum(0) % 2 == 0))
    pair("ünïcödé café/日本 語.png", "unicode and spaces in names", Image.new("L", (9, 9), 47))
    pair("long names/" + "ü" * 40 + ".png", "a name too long to escape in a tar header", Image.new("L", (9, 9), 51))
    pair("UPPER.PNG", "an upper-case suffix", Image.new("L", (9, 9), 48))
    pair("long.png", "word " * 2000, Image.new("L", (9, 9), 49))
    pair("twice.png", "the lower-case caption", Image.new("L", (9, 9), 50))
    (root / "twice.TXT").write_text("the upper-case caption")
    (root / "zz_copy2").mkdir()
    digits[1][0].save(root / "zz_copy2" / "d001.png")  # the very pixels of digit_1/d001.png (PNG is lossless)
    (root / "zz_copy2" / "d001.txt").write_text("a copy of a digit one")
    (root / "gone.png").symlink_to(root / "moved_away.png")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "README.md").write_text("my photos")


EXPECTED_SKIPS = {
    ("fake.png", "not_an_image"),
    ("zero.png", "not_an_image"),
    ("truncated.png", "corrupt_image"),
    ("cut.jpg", "corrupt_image"),
    ("lonely.png", "no_caption"),
    ("orphan.txt", "no_image"),
    ("empty.png", "empty_caption"),
    ("huge.png", "too_many_pixels"),
    ("big.png", "too_many_pixels"),
    ("zz_copy2/d001.png", "duplicate_image"),
    ("twice.txt", "ambiguous_caption"),
    (".DS_Store", "hidden_file"),
    ("gone.png", "unreadable_file"),
    ("README.md", "unknown_file_type"),
}
EXPECTED_NOTES = {
    ("bad_caption.txt", "caption_not_utf8"),
    ("utf16.txt", "caption_not_utf8"),
    ("long.txt", "caption_truncated"),
    ("cmyk.jpg", "converted"),
    ("deep16.png", "converted"),
    ("rgba.png", "converted"),
    ("palette.png", "converted"),
    ("bw.png", "converted"),
    ("r0.jpg", "shared_caption"),
    ("r0.png", "shared_caption"),
}
# good: 40 digits + bad_caption utf16 cmyk "a b" a_b r0.png r0.jpg deep16 rgba palette bw unicode "long names/ü..."
# UPPER long twice
EXPECTED_SAMPLES = N_DIGITS + 16


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_samples(out: Path) -> dict[str, tuple[str, dict[str, bytes]]]:
    samples = {}
    for rel, info in manifest(out)["shards"].items():
        for key, files in read_samples(out / rel):
            assert key not in samples, key
            samples[key] = (info["split"], files)
    return samples


@pytest.fixture(scope="module")
def prepared_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    folder, out = root / "my photos", root / "prepared"
    messy_folder(folder)
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as some libraries set it: truncated files must still be refused
    try:
        code = prepare_mod.main(["--source", "folder", "--input", str(folder), "--out", str(out), "--vocab-size",
                                 "300"])
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
    assert code == 0
    return out


def test_a_messy_folder_prepares_and_names_every_skipped_file(prepared_folder, capsys):
    out = prepared_folder
    skipped = jsonl(out / "skipped.jsonl")
    assert {(s["item"], s["reason"]) for s in skipped} == EXPECTED_SKIPS
    assert len(skipped) == len(EXPECTED_SKIPS) and all(s["reason"] in SKIP_REASONS for s in skipped)
    by_item = {s["item"]: s["detail"] for s in skipped}
    assert "zz_copy2/d001.png" in by_item and by_item["zz_copy2/d001.png"] == "same pixels as digit_1/d001.png"
    assert "12000x12000" in by_item["big.png"]  # our cap, from the header (decoding it would have failed)
    notes = {(n["item"], n["reason"]) for n in jsonl(out / "notes.jsonl")}
    assert notes == EXPECTED_NOTES
    m = manifest(out)
    assert sum(sum(c.values()) for c in m["counts"].values()) == EXPECTED_SAMPLES
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (out, out / "skipped.jsonl", out / "train"):  # the modes a plain write gives, not a temp's 0600
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~umask, path
    assert m["report"]["skipped"] == {"ambiguous_caption": 1, "corrupt_image": 2, "duplicate_image": 1,
                                      "empty_caption": 1, "hidden_file": 1, "no_caption": 1, "no_image": 1,
                                      "not_an_image": 2, "too_many_pixels": 2, "unknown_file_type": 1,
                                      "unreadable_file": 1}


def test_folder_samples_have_injective_keys_converted_modes_and_decoded_captions(prepared_folder):
    samples = all_samples(prepared_folder)
    assert len(samples) == EXPECTED_SAMPLES
    # colliding names stay apart; keys escape every byte but letters, digits and '-'
    for key in ("a_20b_2epng", "a_5fb_2epng", "r0_2epng", "r0_2ejpg", "digit_5f1_2fd001_2epng"):
        assert key in samples, key
    unicode_key = "".join(f"_{b:02x}" if not (chr(b).isascii() and chr(b).isalnum()) else chr(b)
                          for b in "ünïcödé café/日本 語.png".encode())
    assert unicode_key in samples
    # escaped, "long names/üüü...png" would pass the 100-byte tar name limit: the key is a SHA-256 instead
    assert "_z" + hashlib.sha256(("long names/" + "ü" * 40 + ".png").encode()).hexdigest() in samples
    caption = {k: files["txt"].decode("utf-8") for k, (_, files) in samples.items()}
    mode = {k: Image.open(io.BytesIO(files["png"])).mode for k, (_, files) in samples.items()}
    assert caption["bad_5fcaption_2epng"] == "café au lait" and caption["utf16_2epng"] == "naïve drawing"
    assert caption["r0_2ejpg"] == caption["r0_2epng"] == "r zero, twice"
    assert caption["twice_2epng"] == "the upper-case caption"
    assert len(caption["long_2epng"].encode()) <= 4096 and caption["long_2epng"].startswith("word word")
    assert mode["cmyk_2ejpg"] == mode["rgba_2epng"] == mode["palette_2epng"] == mode["r0_2ejpg"] == "RGB"
    assert mode["deep16_2epng"] == mode["bw_2epng"] == mode["digit_5f1_2fd001_2epng"] == "L"
    rgba = np.asarray(Image.open(io.BytesIO(samples["rgba_2epng"][1]["png"])))
    assert tuple(rgba[0, 0]) == (255, 127, 127)  # half-transparent red over white, not over black
    assert all("." not in k and "/" not in k and " " not in k for k in samples)


def test_the_loader_reads_exactly_what_the_manifest_counts(prepared_folder):
    counts = manifest(prepared_folder)["counts"]
    keys = []
    for split in ("train", "validation", "test"):
        assert counts[split]["image_text"] > 0, split
        loader = BalancedLoader(LoaderConfig(str(prepared_folder), split=split, composition={"image_text": 1},
                                             resampled=False))
        split_keys = [k for batch in loader for k in batch["keys"]]
        assert len(split_keys) == counts[split]["image_text"], split
        keys += split_keys
    assert len(keys) == len(set(keys)) == EXPECTED_SAMPLES


def test_the_summary_names_reasons_and_files(tmp_path, capsys):
    folder = tmp_path / "f"
    folder.mkdir()
    for i, image in enumerate(digit_images(12)):
        image[0].save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"digit {image[1]}")
    (folder / "x.png").write_bytes(b"not an image")
    (folder / "x.txt").write_text("x")
    assert prepare_mod.main(["--source", "folder", "--input", str(folder), "--out", str(tmp_path / "o"),
                             "--vocab-size", "300"]) == 0
    stdout = capsys.readouterr().out
    assert "skipped: 1" in stdout and "not_an_image: 1  (x.png)" in stdout


# -- the HF datasets route -------------------------------------------------------------------------
def _hf_rows(n: int, offset: int = 0) -> tuple[list[bytes], list[str]]:
    images = [_png(Image.new("L", (10, 10), offset + i)) for i in range(n)]
    return images, [f"shade {offset + i}" for i in range(n)]


def _prepare(args: list[str], out: Path) -> dict:
    assert prepare_mod.main([*args, "--out", str(out), "--vocab-size", "300"]) == 0
    return manifest(out)


def _total(m: dict) -> int:
    return sum(sum(c.values()) for c in m["counts"].values())


def test_hf_parquet_written_by_datasets_and_by_pandas(tmp_path):
    import datasets
    import pandas as pd

    images, texts = _hf_rows(30)
    images[3] = images[3][:40]  # a damaged cell
    texts[7] = "   "
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "text": texts},
                                    features=features)
    ds.to_parquet(tmp_path / "hf.parquet")
    m = _prepare(["--source", "hf", "--input", str(tmp_path / "hf.parquet")], tmp_path / "a")
    assert _total(m) == 28
    assert {(s["item"], s["reason"]) for s in jsonl(tmp_path / "a" / "skipped.jsonl")} == {
        ("train[3]", "corrupt_image"), ("train[7]", "empty_caption")}

    # pandas: raw bytes in a column, two files matched by a glob
    pd.DataFrame({"img": images[:15], "caption": texts[:15]}).to_parquet(tmp_path / "part-0.parquet")
    pd.DataFrame({"img": images[15:], "caption": texts[15:]}).to_parquet(tmp_path / "part-1.parquet")
    m = _prepare(["--source", "hf", "--input", str(tmp_path / "part-*.parquet"), "--image-column", "img",
                  "--text-column", "caption"], tmp_path / "b")
    assert _total(m) == 28 and m["build"]["input"].endswith("part-*.parquet")


def test_hf_jsonl_and_csv_with_image_paths_and_arrow_files(tmp_path):
    import datasets
    import pandas as pd

    (tmp_path / "imgs").mkdir()
    images, texts = _hf_rows(20, 100)
    for i, data in enumerate(images):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(data)
    paths = [f"imgs/{i}.png" for i in range(20)]
    paths[5] = "imgs/missing.png"
    df = pd.DataFrame({"image": paths, "text": texts})
    df.to_json(tmp_path / "rows.jsonl", orient="records", lines=True, force_ascii=False)
    df.to_csv(tmp_path / "rows.csv", index=False)
    for name in ("rows.jsonl", "rows.csv"):
        out = tmp_path / name.replace(".", "_")
        m = _prepare(["--source", "hf", "--input", str(tmp_path / name)], out)
        assert _total(m) == 19, name
        assert [(s["item"], s["reason"]) for s in jsonl(out / "skipped.jsonl")] == [("train[5]", "no_image")]

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [Image.open(io.BytesIO(b)) for b in images], "text": texts},
                                    features=features)
    ds.save_to_disk(tmp_path / "saved")
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))
    assert arrow
    assert _total(_prepare(["--source", "hf", "--input", str(arrow[0])], tmp_path / "arrow")) == 20
    assert _total(_prepare(["--source", "hf", "--input", str(tmp_path / "saved")], tmp_path / "saved_out")) == 20


def test_hf_text_only_rows(tmp_path):
    import pandas as pd

    pd.DataFrame({"body": [f"sentence number {i} of a corpus" for i in range(30)] + [None, ""]}).to_parquet(
        tmp_path / "t.parquet")
    out = tmp_path / "o"
    m = _prepare(["--source", "hf", "--input", str(tmp_path / "t.parquet"), "--image-column", "none",
                  "--text-column", "body"], out)
    assert sum(m["counts"][s]["text"] for s in m["counts"]) == 30 and _total(m) == 30
    assert {(s["item"], s["reason"]) for s in jsonl(out / "skipped.jsonl")} == {
        ("train[30]", "no_caption"), ("train[31]", "empty_caption")}


# -- text-only files -------------------------------------------------------------------------------
def test_text_files_txt_and_jsonl(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    lines = [f"line {i} of the plain text corpus" for i in range(25)]
    (corpus / "plain.txt").write_bytes(("\n".join(lines[:10]) + "\n\n   \n" + "\n".join(lines[10:])).encode()
                                       + b"\nna\xefve cp1252 line\n" + b"x" * 9000 + b"\n")
    rows = [json.dumps({"text": f"json row {i}", "id": i}) for i in range(12)]
    rows[2] = "{not json"
    rows[4] = json.dumps({"title": "no text field"})
    rows[6] = json.dumps({"text": 42})
    rows[8] = json.dumps({"text": " "})
    rows[9] = json.dumps(["a", "list"])
    rows[10] = json.dumps({"text": "y" * 200_000})  # longer than a line may be for --max-caption-bytes 4096
    (corpus / "sub" / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    m = _prepare(["--source", "text", "--input", str(corpus)], out)
    assert sum(m["counts"][s]["text"] for s in m["counts"]) == 25 + 2 + 6 == _total(m)
    assert {(s["item"], s["reason"]) for s in jsonl(out / "skipped.jsonl")} == {
        ("sub/rows.jsonl:3", "bad_json"), ("sub/rows.jsonl:5", "no_caption"), ("sub/rows.jsonl:7", "bad_text"),
        ("sub/rows.jsonl:9", "empty_caption"), ("sub/rows.jsonl:10", "bad_json"),
        ("sub/rows.jsonl:11", "line_too_long")}
    assert {(s["item"], s["reason"]) for s in jsonl(out / "notes.jsonl")} == {
        ("plain.txt:28", "caption_not_utf8"), ("plain.txt:29", "caption_truncated")}
    texts = {files["txt"].decode() for _, (_, files) in all_samples(out).items()}
    assert "naïve cp1252 line" in texts and "x" * 4096 in texts and "json row 11" in texts


# -- one interface, one-line errors ----------------------------------------------------------------
def test_every_source_implements_the_interface_and_is_in_the_help(capsys):
    assert set(SOURCES) == {"embedded", "folder", "hf", "text", "emoji", "covariance"}
    assert all(issubclass(cls, Source) and cls.help for cls in SOURCES.values())
    with pytest.raises(SystemExit) as exit_:
        prepare_mod.parse_args(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for name in SOURCES:
        assert f"\n  {name} " in help_text, name


def _error(argv: list[str], capsys) -> str:
    """The stderr of a failing `prepare`: exit code 2 and exactly one line."""
    try:
        code = prepare_mod.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_errors_are_one_line_naming_problem_and_fix(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "captions_only").mkdir()
    (tmp_path / "captions_only" / "a.txt").write_text("a caption")
    (tmp_path / "file.png").write_bytes(_png(Image.new("L", (4, 4))))
    (tmp_path / "t.parquet").write_bytes(b"PAR1 not really")
    images, texts = _hf_rows(4)
    import pandas as pd

    pd.DataFrame({"image": images, "caption": texts}).to_parquet(tmp_path / "ok.parquet")
    cases = [
        (["--source", "folder", *out], "needs --input"),
        (["--source", "folder", "--input", str(tmp_path / "absent"), *out], "no such folder"),
        (["--source", "folder", "--input", str(tmp_path / "file.png"), *out], "is a file, not a folder"),
        (["--source", "folder", "--input", str(tmp_path / "empty"), *out], "the folder is empty"),
        (["--source", "folder", "--input", str(tmp_path / "captions_only"), *out], "no_image 1"),
        (["--image-size", "30", "--patch-size", "7", *out], "--image-size 30 is not a multiple of --patch-size 7"),
        (["--image-size", "56", "--patch-size", "7", "--max-length", "40", *out], "use --max-length 67"),
        (["--max-image-pixels", "lots", *out], "--max-image-pixels"),
        (["--source", "hf", "--input", str(tmp_path / "ok.parquet"), *out], "no column 'text'"),
        (["--source", "hf", "--input", str(tmp_path / "t.parquet"), *out], "could not read it as parquet"),
        (["--source", "hf", "--input", str(tmp_path / "nothing-*.parquet"), *out], "no file matches"),
        (["--source", "hf", "--input", str(tmp_path / "file.png"), *out], "not data files"),
        (["--source", "hf", "--input", "someone/some-dataset", *out], "HF_HUB_OFFLINE"),
        (["--source", "text", "--input", str(tmp_path / "empty"), *out], "no .txt or .jsonl"),
        (["--input", str(tmp_path / "empty"), *out], "takes no --input"),
        (["--source", "bogus", *out], "invalid choice"),
        (["--source", "folder", "--input", str(tmp_path / "captions_only"), "--out", str(tmp_path / "empty" / ".."),
          ], "not a prepared dataset"),
        (["--out", str(tmp_path / "file.png")], "is a file"),
    ]
    for argv, expected in cases:
        assert expected in _error(argv, capsys), argv
    assert not (tmp_path / "out").exists()
