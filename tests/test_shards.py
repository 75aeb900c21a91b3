"""Packing pairs + perturbations into WebDataset shards: counts, manifest, atomicity, resume, verify."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pertvl
from pertvl.cli import main as pertvl_main
from pertvl.data import image, shards
from pertvl.data.records import PERTURBATION_TYPES, Pair, write_pairs
from pertvl.data.shards import packing
from pertvl.data.shards.reading import iter_samples
from pertvl.data.text import clean_text

WORDS = "the lungs are clear there is no pleural effusion or pneumothorax heart size normal".split()


def perturbation_record(text: str) -> dict:
    """A fabricated perturbations.jsonl record: three shuffles available, the rest unavailable."""
    words = text.split()
    swapped = [w for i in range(0, len(words) - 1, 2) for w in (words[i + 1], words[i])]
    swapped += words[len(swapped) :]
    perts = {"reverse": " ".join(words[::-1]), "swap_adjacent": " ".join(swapped)}
    perts["shuffle_all"] = " ".join(words[1:] + words[:1])
    perts = {k: v for k, v in perts.items() if v != text}
    unavailable = {t: "no adjectives" for t in PERTURBATION_TYPES if t not in perts}
    return {"text": text, "perturbations": perts, "unavailable": unavailable, "seed": 0}


def make_corpus(
    root: Path,
    splits: dict[str, int],
    *,
    missing_image: tuple[str, ...] = (),
    missing_perturbations: tuple[str, ...] = (),
    undecodable: tuple[str, ...] = (),
    size: tuple[int, int] = (40, 30),
) -> list[Pair]:
    """Fabricate images, pairs.jsonl and perturbations.jsonl under root; returns the pairs in order.

    Pair ids are "{split}.{i}" (with a dot, so keys must be made safe); every image is random
    noise of `size` (w, h); texts are distinct 6-word reports with Edema/Effusion labels.
    """
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    pairs, records = [], {}
    n = 0
    for split, count in splits.items():
        for i in range(count):
            pid = f"{split}.{i}"
            image = f"images/{split}_{i}.png"
            if pid in undecodable:
                (root / image).write_bytes(b"this is not an image")
            elif pid not in missing_image:
                Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(root / image)
            text = " ".join(WORDS[(n + j) % len(WORDS)] for j in range(6)) + f" case{n}."
            n += 1
            labels = {"Edema": float(i % 2), "Pleural Effusion": 1.0} if i % 3 else None
            pairs.append(
                Pair(pid, f"study{n // 2}", image, "Frontal", text.title(), split, labels, "fabricated")
            )
            if pid not in missing_perturbations:
                records[clean_text(text)] = perturbation_record(clean_text(text))
    write_pairs(root / "pairs.jsonl", pairs)
    (root / "perturbations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    return pairs


def pack_args(root: Path, out: Path, *, maxcount: int = 4, workers: int = 1, size: int = 32) -> list[str]:
    return ["pack", "--pairs", str(root / "pairs.jsonl"), "--perturbations", str(root / "perturbations.jsonl"),
            "--out", str(out), "--image-size", str(size), "--maxcount", str(maxcount), "--workers", str(workers)]  # fmt: skip


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, read with tarfile independently of pertvl's reader."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Train 10 (one image missing), val 3 (one perturbation record missing), test 3 (one
    undecodable image); 4 samples per shard at 32 px, packed through the CLI."""
    root = tmp_path_factory.mktemp("corpus")
    pairs = make_corpus(
        root,
        {"train": 10, "val": 3, "test": 3},
        missing_image=("train.4",),
        missing_perturbations=("val.1",),
        undecodable=("test.2",),
    )
    out = root / "shards" / "tiny"
    assert pertvl_main(pack_args(root, out)) == 0
    return root, out, pairs


def test_pack_counts_manifest_and_reconciliation(packed):
    root, out, pairs = packed
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "pertvl-shards/1" and m["pertvl_version"] == pertvl.__version__
    assert m["command"] == ["pertvl", *pack_args(root, out)]
    assert m["image_size"] == 32
    assert m["label_names"] == ["Edema", "Pleural Effusion"]
    assert m["perturbation_types"] == list(PERTURBATION_TYPES)  # each type available or unavailable somewhere
    assert {s: v["num_samples"] for s, v in m["splits"].items()} == {"train": 9, "val": 2, "test": 2}
    # shard k holds the good samples of pairs 4k..4k+3: train.4 (missing image) leaves shard 1 three
    assert [[e["name"], e["num_samples"]] for e in m["splits"]["train"]["shards"]] == [
        ["train-000000.tar", 4], ["train-000001.tar", 3], ["train-000002.tar", 2]]  # fmt: skip
    assert [(s["id"], s["reason"]) for s in m["skipped"]] == [
        ("train.4", "missing_image"), ("val.1", "missing_perturbations"), ("test.2", "undecodable_image")]  # fmt: skip
    assert m["pairs_in"] == len(pairs) == 13 + len(m["skipped"])
    assert m["skipped_counts"] == {"missing_image": 1, "missing_perturbations": 1, "undecodable_image": 1}

    on_disk = sorted(p.name for p in out.iterdir() if p.suffix == ".tar")
    listed = sorted(e["name"] for v in m["splits"].values() for e in v["shards"])
    assert on_disk == listed
    written_ids = []
    for split, info in m["splits"].items():
        for e in info["shards"]:
            path = out / e["name"]
            assert e["bytes"] == path.stat().st_size
            assert e["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            samples = tar_samples(path)
            assert len(samples) == e["num_samples"]
            for key, members in samples.items():
                assert set(members) == {"png", "json"} and "." not in key
                meta = json.loads(members["json"])
                assert list(sorted(meta)) == sorted(shards.META_FIELDS)
                assert meta["split"] == split and key == meta["id"].replace(".", "_")
                im = Image.open(io.BytesIO(members["png"]))
                assert (im.mode, im.size) == ("L", (32, 32))
                written_ids.append(meta["id"])
    skipped_ids = {s["id"] for s in m["skipped"]}
    assert sorted(written_ids) == sorted(p.id for p in pairs if p.id not in skipped_ids)


def test_sample_json_carries_cleaned_text_perturbations_and_labels(packed):
    root, out, pairs = packed
    samples = list(shards.iter_samples(out, "train"))
    by_id = {p.id: p for p in pairs}
    assert [s.meta["id"] for s in samples] == [
        p.id for p in pairs if p.split == "train" and p.id != "train.4"
    ]
    s = samples[1]
    pair = by_id[s.meta["id"]]
    record = perturbation_record(clean_text(pair.text))
    assert s.meta == {
        "id": pair.id, "study_id": pair.study_id, "projection": "Frontal", "split": "train",
        "labels": pair.labels, "text": clean_text(pair.text),
        "perturbations": record["perturbations"], "unavailable": record["unavailable"],
    }  # fmt: skip
    assert s.image.dtype == np.uint8 and s.image.shape == (32, 32)
    # The stored pixels are the source image resized once (40x30 -> shorter side 32 -> crop).
    src = Image.open(root / pair.image)
    expected = np.asarray(image.resize_center_crop(src, 32))
    np.testing.assert_array_equal(s.image, expected)


def test_resize_shorter_side_then_center_crop(tmp_path):
    wide = np.zeros((32, 96), np.uint8)
    wide[:, 32:64] = 200  # only the centre third survives the crop of a 96x32 image to 32x32
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = np.asarray(Image.open(io.BytesIO(image.encode_image_file(tmp_path / "wide.png", 32))))
    assert out.shape == (32, 32) and (out == 200).all()
    tall = np.zeros((128, 64, 3), np.uint8)  # RGB, 64 wide: halve to 32x64, keep rows 16..48 of it
    tall[24:104] = (255, 255, 255)  # black only in rows the crop removes
    Image.fromarray(tall).save(tmp_path / "tall.png")
    out = np.asarray(Image.open(io.BytesIO(image.encode_image_file(tmp_path / "tall.png", 32))))
    assert out.shape == (32, 32) and out.min() >= 250
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60 + 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")  # 16-bit: min-max scaled, not clipped
    im = Image.open(io.BytesIO(image.encode_image_file(tmp_path / "ramp16.png", 32)))
    arr = np.asarray(im)
    assert im.mode == "L" and arr.min() == 0 and arr.max() == 255 and len(np.unique(arr)) > 200


def test_jpeg_is_decoded_at_the_dct_scale_the_size_allows(tmp_path):
    """Rule 1 of pertvl.data.image: a JPEG is decoded at the smallest DCT scale (1/8 .. 1/1) whose
    shorter side is still >= size, then resized and cropped as any image; a PNG at full size."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:512, 0:256] / 256.0
    pixels = np.clip(128 + 80 * np.sin(6 * x) * np.cos(4 * y) + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cxr.jpg", quality=90)
    Image.fromarray(pixels).save(tmp_path / "cxr.png")

    def drafted(size: int) -> Image.Image:
        with Image.open(tmp_path / "cxr.jpg") as im:
            im.draft("L", (size, size))
            im.load()
            return im.copy()

    eighth = drafted(32)  # 256 // 32 = 8: decoded at 32 x 64, nothing left to resize
    assert eighth.size == (32, 64)
    np.testing.assert_array_equal(image.read_image(tmp_path / "cxr.jpg", 32), np.asarray(eighth)[16:48])
    quarter = drafted(48)  # 256 // 48 = 5 -> 1/4: 64 x 128, then resized to 48 x 96 and cropped
    assert quarter.size == (64, 128)
    got = image.read_image(tmp_path / "cxr.jpg", 48)
    np.testing.assert_array_equal(got, np.asarray(image.resize_center_crop(quarter, 48)))
    with Image.open(tmp_path / "cxr.jpg") as im:  # the full-size decode: close, not equal
        full = np.asarray(image.resize_center_crop(im, 48), dtype=np.int16)
    assert 0 < np.abs(full - got).mean() < 2
    with Image.open(tmp_path / "cxr.png") as im:
        np.testing.assert_array_equal(image.read_image(tmp_path / "cxr.png", 48),
                                      np.asarray(image.resize_center_crop(im, 48)))


def test_read_manifest_errors(tmp_path, packed):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        shards.read_shards_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        shards.read_shards_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="pertvl-shards/1"):
        shards.read_shards_manifest(tmp_path)
    with pytest.raises(ValueError, match=r"no split 'dev'.*'test', 'train', 'val'"):
        list(shards.iter_samples(packed[1], "dev"))


def test_bad_inputs_are_named(tmp_path):
    make_corpus(tmp_path, {"train": 2})
    bad = tmp_path / "perturbations.jsonl"
    bad.write_text(bad.read_text() + '{"text": "x", "perturbations": {"flip": "y"}, "unavailable": {}, "seed": 0}\n')
    with pytest.raises(ValueError, match=r"perturbations.jsonl:3: .*unknown: \['flip'\]"):
        shards.pack(tmp_path / "pairs.jsonl", bad, tmp_path / "out")
    make_corpus(tmp_path, {"train": 2})
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(ValueError, match="duplicate pair id 'train.0'"):
        shards.pack(tmp_path / "pairs.jsonl", tmp_path / "perturbations.jsonl", tmp_path / "out")


def test_crash_leaves_no_shard_and_rerun_resumes(tmp_path, monkeypatch):
    make_corpus(tmp_path, {"train": 10, "test": 3}, missing_image=("train.1",))
    clean = shards.pack(tmp_path / "pairs.jsonl", tmp_path / "perturbations.jsonl", tmp_path / "clean",
                        image_size=32, maxcount=4, workers=2)  # fmt: skip
    out = tmp_path / "crashed"

    calls = {"n": 0}
    real_member = packing._member

    def crash_in_second_shard(name, data):
        calls["n"] += 1
        if calls["n"] == 4 * 2 + 3:  # the 3rd member of shard 1 (2 members per sample)
            raise RuntimeError("simulated crash")
        return real_member(name, data)

    monkeypatch.setattr(packing, "_member", crash_in_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        shards.pack(tmp_path / "pairs.jsonl", tmp_path / "perturbations.jsonl", out, image_size=32, maxcount=4,
                    workers=1)  # fmt: skip
    monkeypatch.undo()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.partial.json", "train-000000.tar"]  # no half shard under any name
    with pytest.raises(FileNotFoundError, match="did not finish"):
        shards.read_shards_manifest(out)
    assert not shards.verify(out).ok
    # What a hard kill (no exception handler) would leave: a temp file holding part of a shard.
    leftover = out / ".train-000001.tar.tmp-99999"
    leftover.write_bytes((out / "train-000000.tar").read_bytes()[:3000])
    first = (out / "train-000000.tar").stat()

    result = shards.pack(tmp_path / "pairs.jsonl", tmp_path / "perturbations.jsonl", out, image_size=32, maxcount=4,
                         workers=1)  # fmt: skip
    assert result.shards_kept == 1 and result.shards_written == 3  # train-000001, -000002, test-000000
    again = (out / "train-000000.tar").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # kept, not rewritten
    assert not leftover.exists() and not (out / "manifest.partial.json").exists()
    assert shards.verify(out).ok
    # Resumed, one worker, equals the clean two-worker pack byte for byte; skips reconcile.
    for split in ("train", "test"):
        assert result.manifest["splits"][split] == clean.manifest["splits"][split]
    assert (
        result.skipped
        == clean.skipped
        == [
            {
                "id": "train.1",
                "split": "train",
                "reason": "missing_image",
                "detail": str(tmp_path / "images/train_1.png"),
            }
        ]
    )

    # A finished shard changed on disk is rebuilt from that shard on; the rest are kept.
    with open(out / "train-000001.tar", "r+b") as f:
        f.seek(2000)
        b = f.read(1)
        f.seek(2000)
        f.write(bytes([b[0] ^ 0xFF]))
    result = shards.pack(tmp_path / "pairs.jsonl", tmp_path / "perturbations.jsonl", out, image_size=32, maxcount=4,
                         workers=1)  # fmt: skip
    assert (result.shards_kept, result.shards_written) == (2, 2)  # train-000000 and test-000000 kept
    assert result.manifest["splits"]["train"] == clean.manifest["splits"]["train"]
    assert shards.verify(out).ok


def _flip_png_byte(path: Path, key: str) -> None:
    """Flip one byte inside the PNG data of `key` (the tar stays readable)."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(f"{key}.png").offset_data
    with open(path, "r+b") as f:
        f.seek(offset + 60)  # past the signature and IHDR: inside IDAT
        b = f.read(1)
        f.seek(offset + 60)
        f.write(bytes([b[0] ^ 0x55]))


def test_verify_passes_then_names_damaged_shards(tmp_path, capsys):
    make_corpus(tmp_path, {"train": 10})
    out = tmp_path / "shards"
    assert pertvl_main(pack_args(tmp_path, out)) == 0
    assert pertvl_main(["shards", "verify", str(out)]) == 0
    assert "10 sample(s) checked: OK" in capsys.readouterr().out

    _flip_png_byte(out / "train-000001.tar", "train_5")
    report = shards.verify(out)
    found = {(p.shard, p.key, p.message.split(" ")[0].rstrip(":")) for p in report.problems}
    assert found == {("train-000001.tar", None, "sha256"), ("train-000001.tar", "train_5", "corrupt_png")}
    assert pertvl_main(["shards", "verify", str(out)]) == 1
    assert "shard train-000001.tar key train_5: corrupt_png" in capsys.readouterr().err

    data = (out / "train-000000.tar").read_bytes()
    (out / "train-000000.tar").write_bytes(data[: len(data) // 2])
    (out / "train-000009.tar").write_bytes(data)
    messages = [str(p) for p in shards.verify(out).problems]
    assert any(m.startswith("shard train-000000.tar") and "size" in m for m in messages)
    assert any(m.startswith("shard train-000000.tar") and "damaged tar" in m for m in messages)
    assert any(m.startswith("shard train-000000.tar") and "samples, manifest says 4" in m for m in messages)
    assert "shard train-000009.tar: tar file in the folder but not in the manifest" in messages


@pytest.mark.parametrize("parts", [2, 3])
def test_packing_in_parts_then_merging_equals_one_pack(tmp_path, parts):
    """`pertvl pack --part I/N` for every I (a SLURM array), in one folder, then `pertvl shards merge`:
    the same shards, byte for byte, and the same manifest content as one pack (but its command and
    time); a shard never spans parts; merging refuses missing parts and damaged shards."""
    make_corpus(tmp_path, {"train": 13, "val": 3, "test": 5}, missing_image=("train.5",),
                undecodable=("test.1",), missing_perturbations=("val.2",))  # fmt: skip
    one, split = tmp_path / "one", tmp_path / "parts"
    assert pertvl_main(pack_args(tmp_path, one, maxcount=3)) == 0
    assert pertvl_main(["shards", "merge", str(split), "--if-complete"]) == 0  # nothing there yet: no-op
    for i in range(parts):
        assert pertvl_main([*pack_args(tmp_path, split, maxcount=3), "--part", f"{i}/{parts}"]) == 0
        if i < parts - 1:
            assert not (split / "manifest.json").exists()
            with pytest.raises(ValueError, match=rf"part\(s\) \[{i + 1}.*\] of {parts} are missing"):
                shards.merge_parts(split)
    assert pertvl_main(["shards", "merge", str(split)]) == 0
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (one, split))
    assert b["parts"] == parts and not list(split.glob("manifest.part-*"))
    for key in ("splits", "skipped", "skipped_counts", "pairs_in", "inputs", "image_size", "label_names",
                "perturbation_types"):  # fmt: skip
        assert a[key] == b[key], key
    tars = sorted(p.name for p in one.glob("*.tar"))
    assert tars == sorted(p.name for p in split.glob("*.tar")) and len(tars) == 5 + 1 + 2
    assert all((one / t).read_bytes() == (split / t).read_bytes() for t in tars)
    assert pertvl_main(["shards", "verify", str(split)]) == 0
    # damage: a part's shard that no longer matches its hash is named
    again = tmp_path / "again"
    for i in range(parts):
        assert pertvl_main([*pack_args(tmp_path, again, maxcount=3), "--part", f"{i}/{parts}"]) == 0
    (again / "train-000001.tar").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match=r"train-000001\.tar: missing, or not the shard"):
        shards.merge_parts(again)


def test_pack_with_counterfactuals_adds_them_and_without_keeps_the_bytes(tmp_path, packed):
    """--counterfactuals: every sample json gains `counterfactuals` and `cf_unavailable` (empty maps
    for a text without a record, counted in the manifest, not skipped); everything else is the
    same bytes as the pack without them, whose sample json has no new key (issue 13, §2)."""
    root, plain, pairs = packed
    texts = [clean_text(p.text) for p in pairs]
    recs = [{"text": t, "counterfactuals": {"cf_negation": f"no {t}"}, "unavailable": {"cf_laterality":
             "no_lateralized_finding"}, "seed": 0} for t in texts if t != texts[0]]  # train.0: no record
    cf_path = root / "counterfactuals.jsonl"
    cf_path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "with_cf"
    assert pertvl_main(pack_args(root, out) + ["--counterfactuals", str(cf_path)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    m_plain = json.loads((plain / "manifest.json").read_text())
    assert m["counterfactual_types"] == ["cf_laterality", "cf_negation"]
    assert m["counterfactuals_missing"] == {"train": 1, "val": 0, "test": 0}
    assert m["skipped"] == m_plain["skipped"]
    assert "counterfactual_types" not in m_plain and "counterfactuals" not in m_plain["inputs"]
    assert m["inputs"]["counterfactuals_sha256"] == hashlib.sha256(cf_path.read_bytes()).hexdigest()
    for split, info in m_plain["splits"].items():
        assert [s["num_samples"] for s in info["shards"]] == [s["num_samples"] for s in m["splits"][split]["shards"]]
        for shard in info["shards"]:
            a, b = tar_samples(plain / shard["name"]), tar_samples(out / shard["name"])
            assert a.keys() == b.keys()
            for key in a:
                assert a[key]["png"] == b[key]["png"]
                ja, jb = json.loads(a[key]["json"]), json.loads(b[key]["json"])
                assert "counterfactuals" not in ja and "cf_unavailable" not in ja
                cf, unav = jb.pop("counterfactuals"), jb.pop("cf_unavailable")
                assert ja == jb
                if ja["id"] == "train.0":
                    assert cf == {} and unav == {}
                else:
                    assert cf == {"cf_negation": f"no {ja['text']}"}
                    assert unav == {"cf_laterality": "no_lateralized_finding"}
    read = list(iter_samples(out, "test"))  # the reader takes the new keys along
    assert read and all("counterfactuals" in s.meta for s in read)
