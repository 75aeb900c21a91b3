"""The training stream: equal batches per rank, disjoint coverage, exact resume, skips, no pickle."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_shards import make_corpus

from pertvl.data import shards
from pertvl.data.augment import AugmentConfig, AugmentParams, apply_augmentation, sample_params
from pertvl.data.records import PERTURBATION_TYPES
from pertvl.data.shards import Sample
from pertvl.data.stream import (
    build_train_stream,
    collate_samples,
    resolve_source,
)
from pertvl.data.tokenize import load_tokenizer

N_TRAIN = 32  # 8 shards of 4


@pytest.fixture(scope="module")
def tok(minilm_path):
    return load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("streamcorpus")
    make_corpus(root, {"train": N_TRAIN, "test": 4})
    shards.pack(
        root / "pairs.jsonl",
        root / "perturbations.jsonl",
        root / "shards",
        image_size=32,
        maxcount=4,
        workers=1,
    )
    return root / "shards"


def stream(folder, tok, **kw):
    kw = {"batch_size": 4, "num_workers": 2, "augment": False, "shuffle_buffer": 16} | kw
    return build_train_stream(folder, "train", tokenizer=tok, **kw)


def ids_of(batches) -> list[list[str]]:
    return [b.ids for b in batches]


def assert_same_batches(a, b):
    assert ids_of(a) == ids_of(b)
    for x, y in zip(a, b, strict=True):
        for name in ("images", "input_ids", "attention_mask", "word_ids", "pert_input_ids", "pert_valid"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_two_ranks_two_workers_disjoint_and_cover_the_split(folder, tok):
    all_ids = {f"train.{i}" for i in range(N_TRAIN)}
    per_rank = []
    for rank in (0, 1):
        s = stream(folder, tok, world_size=2, rank=rank)
        assert s.batches_per_epoch == len(s) == 4
        batches = list(s)
        assert len(batches) == 4
        b = batches[0]
        assert b.images.shape == (4, 1, 32, 32) and b.images.dtype == torch.float32
        assert 0.0 <= b.images.min() and b.images.max() <= 1.0
        assert b.pert_input_ids.shape[:2] == (4, len(PERTURBATION_TYPES))
        assert b.labels.shape == (4, 2)
        per_rank.append([i for ids in ids_of(batches) for i in ids])
    assert len(set(per_rank[0])) == len(per_rank[0]) == 16 == len(set(per_rank[1]))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == all_ids
    # Another epoch: another order, same coverage.
    s = stream(folder, tok, world_size=2, rank=0, epoch=1)
    other = [i for ids in ids_of(s) for i in ids]
    assert other != per_rank[0] and len(set(other)) == 16


def test_resume_at_epoch_and_batch_gives_the_same_remaining_batches(folder, tok):
    s = stream(folder, tok, augment=True, epoch=2, seed=7)
    full = list(s)
    assert len(full) == 8
    for start in (3, 6):  # odd and even: the worker that owns the first remaining batch changes
        resumed = list(stream(folder, tok, augment=True, epoch=2, seed=7, start_batch=start))
        assert_same_batches(resumed, full[start:])
    s.set_epoch(2, start_batch=5)
    assert len(s) == 3
    assert_same_batches(list(s), full[5:])
    assert len(s) == 8  # the resume position applied to one pass
    # Augmentation changed the pixels, and did so per sample, not per batch position.
    plain = list(stream(folder, tok, augment=False, epoch=2, seed=7))
    assert ids_of(plain) == ids_of(full)
    assert not torch.equal(plain[0].images, full[0].images)
    # Resampled mode resumes exactly as well.
    res = list(stream(folder, tok, resampled=True, num_workers=0, epoch=1))
    assert len(res) == 8
    assert_same_batches(
        list(stream(folder, tok, resampled=True, num_workers=0, epoch=1, start_batch=5)), res[5:]
    )


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _worker_processes(s) -> list:
    return list(s._loader._workers)


def test_one_set_of_workers_serves_consecutive_epochs_and_resumes(folder, tok):
    """Workers start once and run on from epoch to epoch (no start-up stall at an epoch boundary, no
    fork of a threaded rank every epoch): the batches equal fresh streams' epoch for epoch, also
    after an odd resume position, where the two workers have unequal counts (fillers keep the
    round-robin aligned into the next epoch)."""
    fresh = [list(stream(folder, tok, augment=True, seed=5, epoch=e)) for e in range(3)]
    s = stream(folder, tok, augment=True, seed=5)
    for e in range(3):
        s.set_epoch(e)
        assert_same_batches(list(s), fresh[e])
    assert s.workers_started == 1
    if Path("/proc").is_dir():  # started by a forkserver, not forked from this (threaded) process
        assert all(_parent_pid(p.pid) != os.getpid() for p in _worker_processes(s))
    resumed = stream(folder, tok, augment=True, seed=5, epoch=1, start_batch=3)
    assert_same_batches(list(resumed), fresh[1][3:])
    resumed.set_epoch(2)
    assert_same_batches(list(resumed), fresh[2])
    assert resumed.workers_started == 1
    resumed.close()
    # A pass abandoned half-way ends its workers; the next pass starts new ones.
    procs = _worker_processes(s)
    s.set_epoch(3)
    it = iter(s)
    first = next(it)
    it.close()
    assert s.workers_started == 1 and s._loader is None and not any(p.is_alive() for p in procs)
    s.set_epoch(3)
    again = list(s)
    assert s.workers_started == 2 and len(again) == 8
    assert_same_batches(again[:1], [first])
    # Another epoch than the one the workers are preparing: new workers as well.
    s.set_epoch(1)
    assert_same_batches(list(s), fresh[1])
    assert s.workers_started == 3
    s.close()


def test_a_failing_worker_raises_and_leaves_no_process(folder, tok, monkeypatch):
    from pertvl.faults import ENV_VAR, InjectedFault

    monkeypatch.setenv(ENV_VAR, "worker-raise:sample=9,worker=1")
    s = stream(folder, tok)
    with pytest.raises(InjectedFault, match="injected failure in rank 0 worker 1 sample 9"):
        list(s)
    assert s._loader is None  # closed on the way out: nothing is left to block the exit


def test_a_missing_worker_dependency_fails_before_the_first_batch(folder, tok, monkeypatch):
    import importlib

    from pertvl.data import stream as stream_module

    real = importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("kornia"):
            raise ModuleNotFoundError("No module named 'kornia'")
        return real(name, *a, **k)

    monkeypatch.setattr(stream_module.importlib, "import_module", fake)
    with pytest.raises(ImportError, match=r"needs kornia for augmentation .*data.augment=false"):
        stream(folder, tok, augment=True)
    stream(folder, tok, augment=False).close()  # without augmentation kornia is not needed


class _ShardServer:
    """A local HTTP server over a shard folder; paths in `failing` answer 500 and are counted."""

    def __init__(self, folder: Path, failing: tuple[str, ...] = ()):
        import functools
        import http.server
        import threading

        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                server.requests.append(self.path)
                if self.path.lstrip("/") in failing:
                    self.send_error(500, "injected failure")
                    return
                super().do_GET()

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_shards_stream_from_the_url_of_their_manifest(folder, tok):
    """data.shards = http://.../manifest.json: 2 ranks (2 workers each) stream the same batches as
    from the folder, each shard read from the server (streamed, not copied); a shard that keeps
    failing ends the stream with an error naming its URL after the bounded retries."""
    server = _ShardServer(folder)
    try:
        url = f"{server.url}/manifest.json"
        for rank in (0, 1):
            remote = stream(url, tok, world_size=2, rank=rank, epoch=1)
            assert all(u.startswith(server.url + "/train-") for u in remote.source.urls)
            assert_same_batches(list(remote), list(stream(folder, tok, world_size=2, rank=rank, epoch=1)))
            remote.close()
        assert sorted(set(server.requests)) == ["/manifest.json"] + [f"/train-{i:06d}.tar" for i in range(8)]
    finally:
        server.close()
    server = _ShardServer(folder, failing=("train-000003.tar",))
    try:
        s = stream(f"{server.url}/manifest.json", tok, num_workers=0, download_retries=2)
        with pytest.raises(OSError, match=r"/train-000003\.tar: download failed after 3 attempt\(s\): HTTPError: HTTP Error 500"):
            list(s)
        assert server.requests.count("/train-000003.tar") == 3  # 1 try + 2 retries, then the error
        with pytest.raises(OSError, match=r"/nothing/manifest\.json: download failed after 1 attempt\(s\): HTTPError: HTTP Error 404"):
            stream(f"{server.url}/nothing/manifest.json", tok, download_retries=0)
    finally:
        server.close()


def _rewrite_with_corrupt_png(path: Path, key: str) -> None:
    """Rewrite a shard with one PNG's IDAT byte flipped: a valid tar holding a corrupt image."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == f"{key}.png":
                data = data[:60] + bytes([data[60] ^ 0x55]) + data[61:]
            tar.addfile(m, io.BytesIO(data))


def test_corrupt_png_and_truncated_shard_are_skipped_and_counted(folder, tok, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    _rewrite_with_corrupt_png(bad / "train-000002.tar", "train_9")
    with tarfile.open(bad / "train-000005.tar") as tar:
        cut = tar.getmember("train_21.png").offset_data + 100  # inside the 2nd sample of the shard
    (bad / "train-000005.tar").write_bytes((bad / "train-000005.tar").read_bytes()[:cut])
    lost = {"train.9", "train.21", "train.22", "train.23"}

    totals: dict[str, int] = {}
    for rank in (0, 1):
        s = stream(bad, tok, world_size=2, rank=rank)
        batches = list(s)
        assert len(batches) == s.batches_per_epoch == 4  # equal on both ranks despite the damage
        assert all(len(b) == 4 for b in batches)
        assert not {i for ids in ids_of(batches) for i in ids} & lost
        for k, v in s.skipped.items():
            totals[k] = totals.get(k, 0) + v
    assert totals["corrupt_png"] >= 1 and totals["truncated_shard"] >= 1

    with caplog.at_level(logging.WARNING, logger="pertvl.data.stream"):
        s = stream(bad, tok, num_workers=0, batch_size=4)
        batches = list(s)
    assert len(batches) == 8 and s.skipped == {"corrupt_png": 1, "truncated_shard": 1}
    text = caplog.text
    assert "skipping sample train_9 in shard train-000002.tar: corrupt_png" in text
    assert "shard train-000005.tar is damaged: unreadable after key train_20" in text
    assert "epoch 0 rank 0: 8 batches" in text


def test_too_few_shards_fail_at_start_with_the_number_needed(folder, tok):
    with pytest.raises(
        ValueError, match=r"has 8 shard\(s\), but 4 rank\(s\) x 4 worker\(s\) need at least 16.*--maxcount"
    ):
        stream(folder, tok, world_size=4, rank=0, num_workers=4)
    with pytest.raises(ValueError, match=r"fewer than one batch of 16"):
        stream(folder, tok, batch_size=16, num_workers=2, world_size=2)
    # Resampled mode has no shard requirement: 16 ranks over 8 shards, one batch each.
    s = stream(folder, tok, world_size=16, rank=11, num_workers=0, batch_size=2, resampled=True)
    assert len(list(s)) == s.batches_per_epoch == 1


class _Exploit:
    """Unpickling this creates a marker folder: evidence that something unpickled data."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_decoding_never_unpickles(folder, tok, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Exploit(str(marker)))
    evil = tmp_path / "evil"
    shutil.copytree(folder, evil)
    path = evil / "train-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
            if m.name.endswith(".json"):
                for ext in ("pyd", "pickle"):
                    info = tarfile.TarInfo(m.name.replace(".json", f".{ext}"))
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))

    with open(path, "rb") as f:
        raw = next(shards.iter_raw_samples(f, path.name))
    assert set(raw.members) == {"png", "json"} and raw.ignored == ("pyd", "pickle")
    s = stream(evil, tok, num_workers=0)
    seen = {i for b in s for i in b.ids}
    assert len(seen) == N_TRAIN and s.skipped == {"ignored_members": 8}
    assert not marker.exists()


def test_pert_valid_masks_and_word_ids_by_hand(tok):
    img = np.zeros((32, 32), np.uint8)
    long = "the lungs are clear there is no acute disease in the chest"  # 12 one-piece words
    samples = [
        Sample("a", img, {"id": "a", "study_id": "s", "text": "no pneumothorax seen", "labels": {"Edema": 1.0},
                          "perturbations": {"shuffle_all": "seen no pneumothorax", "reverse": "seen pneumothorax no"},
                          "unavailable": {t: "short" for t in PERTURBATION_TYPES[3:]}}),
        Sample("b", img, {"id": "b", "study_id": "s", "text": long, "labels": None,
                          "perturbations": {"swap_adjacent": long.replace("the chest", "chest the"),
                                            "shuffle_all": "lungs " + long.replace("lungs ", "")},
                          "unavailable": {}}),
    ]  # fmt: skip
    batch, counts = collate_samples(samples, tok, max_length=10, label_names=("Edema", "Pneumothorax"))
    expected_valid = np.zeros((2, 9), bool)
    expected_valid[0, [0, 2]] = True  # shuffle_all, reverse; swap_adjacent and the rest are unavailable
    expected_valid[1, 0] = True  # shuffle_all differs within 10 tokens; swap_adjacent only after them
    np.testing.assert_array_equal(batch.pert_valid.numpy(), expected_valid)
    assert counts == {"unavailable_perturbations": 9 - 2 + 9 - 2, "identical_perturbations": 1}
    # "no pneumothorax seen" -> [CLS] no p ##ne ##um ##otho ##ra ##x seen [SEP]
    assert batch.word_ids[0].tolist() == [-1, 0, 1, 1, 1, 1, 1, 1, 2, -1]
    assert tok.id_to_token(int(batch.input_ids[0, 2])) == "p" and int(batch.attention_mask[0].sum()) == 10
    assert batch.word_ids[1].tolist() == [-1, 0, 1, 2, 3, 4, 5, 6, 7, -1]  # truncated to 8 words
    np.testing.assert_array_equal(
        batch.labels.numpy(), np.array([[1.0, np.nan], [np.nan, np.nan]], np.float32)
    )
    assert batch.images.shape == (2, 1, 32, 32) and batch.ids == ["a", "b"] and batch.texts[1] == long


def test_brace_pattern_and_pipe_sources(folder, tok):
    reference = ids_of(stream(folder, tok, num_workers=0, seed=3))
    pattern = str(folder / "train-{000000..000007}.tar")
    assert ids_of(stream(pattern, tok, num_workers=0, seed=3)) == reference  # manifest found beside the files
    pipe = f"pipe:cat {pattern}"
    with pytest.raises(ValueError, match="no manifest.json beside these shards.*manifest= or num_samples="):
        resolve_source(pipe)
    assert resolve_source(pipe, manifest=folder).shard_counts == (4,) * 8
    assert ids_of(build_train_stream(pipe, tokenizer=tok, batch_size=4, num_workers=0, augment=False,
                                     shuffle_buffer=16, seed=3, manifest=folder)) == reference  # fmt: skip
    assert len(build_train_stream(pipe, tokenizer=tok, batch_size=4, num_workers=0, num_samples=20)) == 5
    # A pipe: command that names a remote URL itself (`pipe:aws s3 cp s3://...`) is still run by
    # webdataset's pipe opener, not fetched as a URL: here the URL is a shell comment.
    commented = f"pipe:cat {pattern} # s3://bucket/train.tar"
    assert ids_of(build_train_stream(commented, tokenizer=tok, batch_size=4, num_workers=0, augment=False,
                                     shuffle_buffer=16, seed=3, manifest=folder)) == reference  # fmt: skip


def test_augmentation_is_per_key_deterministic_and_never_flips():
    cfg = AugmentConfig()
    keys = [f"k{i}" for i in range(200)]
    p = sample_params(keys, seed=1, epoch=0, config=cfg)
    assert p.angle_deg.abs().max() <= 5 and p.translate.abs().max() <= 0.04
    assert 0.9 <= p.scale.min() and p.scale.max() <= 1.1 and p.brightness.abs().max() <= 0.1
    assert p.angle_deg.std() > 2  # spread over the range, not constant
    again = sample_params(keys[::-1], seed=1, epoch=0, config=cfg)  # order/batch position does not matter
    assert torch.equal(again.angle_deg.flip(0), p.angle_deg)
    assert not torch.equal(sample_params(keys, seed=1, epoch=1, config=cfg).angle_deg, p.angle_deg)

    x = torch.zeros(200, 1, 32, 32)
    x[..., :12] = 0.9  # bright left side, like a report that says "left"
    y = apply_augmentation(x, p)
    assert (y[..., 4:10].mean(dim=(1, 2, 3)) > y[..., 22:28].mean(dim=(1, 2, 3)) + 0.5).all()
    ident = AugmentParams(torch.zeros(2), torch.ones(2), torch.zeros(2, 2), torch.zeros(2), torch.ones(2))
    z = torch.rand(2, 1, 32, 32)
    assert torch.allclose(apply_augmentation(z, ident), z, atol=1e-4)


def test_packed_counterfactuals_leave_the_training_batches_unchanged(folder, tok, tmp_path):
    """Counterfactuals are not trained on by default (issue 13): a pack with --counterfactuals streams
    the same training batches, bit for bit (collate reads text, perturbations, labels and ids only),
    unless counterfactual types are asked for (loss.pert_types): then they are columns after the nine."""
    root = folder.parent
    texts = [json.loads(line)["text"] for line in (root / "perturbations.jsonl").read_text().splitlines()]
    (root / "cf.jsonl").write_text("".join(json.dumps({"text": t, "counterfactuals": {"cf_negation": f"no {t}"},
                                                       "unavailable": {}, "seed": 0}) + "\n" for t in texts))
    with_cf = tmp_path / "with_cf"
    shards.pack(root / "pairs.jsonl", root / "perturbations.jsonl", with_cf, image_size=32, maxcount=4, workers=1,
                counterfactuals_path=root / "cf.jsonl")
    a = list(stream(folder, tok, augment=True, epoch=1, seed=3, num_workers=0))
    b = list(stream(with_cf, tok, augment=True, epoch=1, seed=3, num_workers=0))
    assert_same_batches(a, b)
    assert [x.texts for x in a] == [y.texts for y in b]
    for x, y in zip(a, b, strict=True):
        assert (x.labels is None) == (y.labels is None)
        if x.labels is not None:
            assert torch.equal(torch.nan_to_num(x.labels, nan=-1.0), torch.nan_to_num(y.labels, nan=-1.0))
    assert all(x.pert_types == PERTURBATION_TYPES for x in b)
    c = list(stream(with_cf, tok, augment=True, epoch=1, seed=3, num_workers=0, pert_types=(*PERTURBATION_TYPES, "cf_negation")))
    assert ids_of(c) == ids_of(a)
    k = len(PERTURBATION_TYPES)
    for x, z in zip(a, c, strict=True):
        assert z.pert_types == (*PERTURBATION_TYPES, "cf_negation") and z.pert_valid.shape == (len(x), k + 1)
        assert torch.equal(z.pert_valid[:, :k], x.pert_valid) and z.pert_valid[:, k].all()
        lp = x.pert_input_ids.shape[2]
        assert torch.equal(z.pert_input_ids[:, :k, :lp], x.pert_input_ids)
    with pytest.raises(ValueError, match="carry no counterfactuals"):
        stream(folder, tok, num_workers=0, pert_types=(*PERTURBATION_TYPES, "cf_negation"))


def test_a_damaged_shard_ends_the_stream_naming_it_unless_allowed(folder, tok, tmp_path):
    from pertvl.errors import DamagedDataError

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    victim = bad / "train-000004.tar"
    victim.write_bytes(os.urandom(victim.stat().st_size))  # the right size: only reading finds it
    for workers in (0, 2):  # in this process, and from loader workers (one line, no worker traceback)
        s = stream(bad, tok, num_workers=workers, batch_size=2, max_damaged_shards=0, verify="size")
        with pytest.raises(DamagedDataError) as caught:
            list(s)
        assert str(caught.value).startswith(
            f"shard train-000004.tar of {bad} [train] is damaged: unreadable at its first sample (no sample "
            "could be read)")  # fmt: skip
        assert "data.max_damaged_shards=N" in str(caught.value) and "Traceback" not in str(caught.value)
    s = stream(bad, tok, num_workers=0, batch_size=2, max_damaged_shards=1)
    assert len(list(s)) == s.batches_per_epoch and s.skipped == {"truncated_shard": 1}
