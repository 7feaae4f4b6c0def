"""CryoEM PU data: synthetic generator, loader validation, hold-outs, split resume, P:U sampler."""
import logging
import math
import pickle

import numpy as np
import pytest
import torch

import datasets.cryoem_dataset_pu as cpd
from datasets.cryoem_dataset_pu import PUBatchSampler, load_pu_data
from datasets.synthetic_cryoem import generate_cryoem_demo
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import UserError

S = 16  # patch size of the hand-written files


def gen(out, **kw):
    args = dict(n_pos=30, n_unl=90, n_val=20, n_test=20, patch_size=24, seed=5)
    args.update(kw)
    return generate_cryoem_demo(out, **args)


def write(path, pos=4, unl=6, size=S, **extra):
    """A data file with ``pos`` / ``unl`` random patches (or the given objects)."""
    pos = torch.randn(pos, size, size) if isinstance(pos, int) else pos
    unl = torch.randn(unl, size, size) if isinstance(unl, int) else unl
    obj = {"patches": {"positive": pos, "unlabeled": unl}, "metadata": {"patch_size": size}}
    obj.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def labelled(n=6, size=S, labels=None):
    labels = torch.tensor([0., 1.] * (n // 2)) if labels is None else labels
    return {"patches": torch.randn(n, size, size), "labels": labels}


def auc(y, s):
    """Mann-Whitney AUC (no ties in continuous scores)."""
    y, s = np.asarray(y), np.asarray(s)
    ranks = np.argsort(np.argsort(s)) + 1
    n1 = y.sum()
    return (ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1))


# ----------------------------------------------------------------------------- generator
def test_generator_layout_determinism_and_chunks(tmp_path):
    a = torch.load(gen(tmp_path / "a") / "preprocessed_data.pt", weights_only=True)
    b = torch.load(gen(tmp_path / "b") / "preprocessed_data.pt", weights_only=True)
    c = torch.load(gen(tmp_path / "c", seed=6) / "preprocessed_data.pt", weights_only=True)
    for k in ("positive", "unlabeled"):
        assert torch.equal(a["patches"][k], b["patches"][k])
        assert not torch.equal(a["patches"][k], c["patches"][k])
    pos = a["patches"]["positive"]
    assert pos.shape == (30, 24, 24) and pos.dtype == torch.float16
    flat = pos.float().flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(30), atol=1e-2)
    assert torch.allclose(flat.std(1, correction=0), torch.ones(30), atol=1e-2)
    meta = a["metadata"]
    assert meta["patch_size"] == 24 and meta["prior"] == 0.3
    assert meta["normalization"] == "per_patch_standardized"
    assert meta["source_micrographs"] == ["synthetic"]
    assert int(a["unlabeled_true_labels"].sum()) == meta["n_unlabeled_true_positive"] == 27
    assert a["val"]["labels"].sum() == 6 and a["test"]["labels"].shape == (20,)

    d = gen(tmp_path / "a", chunk_size=25)  # rewrite in place: the single file must go
    names = sorted(p.name for p in d.iterdir())
    assert names == [f"chunk_{i:03d}.pt" for i in range(5)]
    chunks = [torch.load(d / n, weights_only=True) for n in names]
    assert all(len(ch["patches"]["positive"]) + len(ch["patches"]["unlabeled"]) <= 25 for ch in chunks)
    assert all(len(ch["patches"]["positive"]) > 0 for ch in chunks)  # P:U mixed in every chunk
    assert "val" in chunks[0] and all("val" not in ch for ch in chunks[1:])
    assert torch.equal(torch.cat([ch["patches"]["positive"] for ch in chunks]), pos)


def test_generator_is_separable_but_noisy(tmp_path):
    """A crude detector (smoothed energy near the centre) is well above chance, far from 1."""
    d = torch.load(gen(tmp_path, n_pos=2, n_unl=2, n_val=300, n_test=0, patch_size=64)
                   / "preprocessed_data.pt", weights_only=True)
    x, y = d["val"]["patches"].float(), d["val"]["labels"]
    sm = torch.nn.functional.avg_pool2d(x[:, None], 5, 1, 2)[:, 0]
    r = torch.hypot(*torch.meshgrid(torch.arange(64.) - 31.5, torch.arange(64.) - 31.5, indexing="ij"))
    score = (sm ** 2 * (r < 12)).sum((1, 2))
    assert 0.75 < auc(y.numpy(), score.numpy()) < 0.99


# ----------------------------------------------------------------------------- loading
def test_single_file_and_chunked_give_identical_items(tmp_path):
    one = load_pu_data(gen(tmp_path / "one"), seed=3)
    many = load_pu_data(gen(tmp_path / "many", chunk_size=17), seed=3, max_open_chunks=2)
    assert len(many.files) == 8 and not one.heldout and not many.heldout
    assert (one.n_pos, one.n_unl, one.patch_size) == (30, 90, 24)
    assert len(one.train) == 120 and one.train.is_positive.sum() == 30
    assert one.train.is_positive.dtype == torch.bool and one.train.is_positive[:30].all()
    for i in range(len(one.train)):
        x, p, j = one.train[i]
        x2, p2, j2 = many.train[i]
        assert torch.equal(x, x2) and p is p2 and j == j2 == i and p == (i < 30)
    assert x.shape == (1, 24, 24) and x.dtype == torch.float32
    for name in ("val", "test"):
        a, b = getattr(one, name), getattr(many, name)
        assert len(a) == 20 and torch.equal(a.labels, b.labels) and a.labels.dtype == torch.float32
        for i in range(20):
            xa, ya, ia = a[i]
            assert torch.equal(xa, b[i][0]) and ya == a.labels[i] and ia == i
            assert ya.dtype == torch.float32 and ya.dim() == 0 and xa.shape == (1, 24, 24)
    assert one.metadata["patch_size"] == 24
    with pytest.raises(IndexError):
        one.train[120]


def test_chunked_access_is_lazy_and_bounded(tmp_path, monkeypatch):
    data = load_pu_data(gen(tmp_path, chunk_size=17), max_open_chunks=2)
    calls = []
    real = torch.load

    def counting(path, *args, **kwargs):
        calls.append((path, kwargs.get("mmap")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cpd.torch, "load", counting)
    store = data.train.store
    assert store.n_open == 0  # validation released every file
    # items are sorted by file within positives and within unlabelled: one open per chunk
    with_pos = sum(n > 0 for n in data.split["n_positive"])
    with_unl = sum(n > 0 for n in data.split["n_unlabeled"])
    assert len(data.files) == 8 and with_pos == 7 and with_unl == 8
    for i in range(len(data.train)):
        data.train[i]
        assert store.n_open <= 2
        if i == data.n_pos - 1:
            assert len(calls) == with_pos
    assert len(calls) == with_pos + with_unl and all(mmap is True for _, mmap in calls)
    data.train[0]  # chunk 0 was evicted (LRU of 2): opened again
    assert len(calls) == with_pos + with_unl + 1 and store.n_open == 2
    copy = pickle.loads(pickle.dumps(data.train))  # what a DataLoader worker receives
    assert copy.store.n_open == 0 and torch.equal(copy[5][0], data.train[5][0])


def test_uint8_and_channel_dim_are_accepted(tmp_path):
    pos = torch.randint(0, 256, (3, S, S), dtype=torch.uint8)
    write(tmp_path / "preprocessed_data.pt", pos=pos, unl=torch.randn(5, 1, S, S),
          val=labelled(), test=labelled())
    data = load_pu_data(tmp_path)
    x, is_pos, _ = data.train[0]
    assert torch.allclose(x[0], pos[0].float() / 255) and is_pos is True
    assert data.train[3][0].shape == (1, S, S)


def test_heldout_split_and_warning(tmp_path, caplog):
    gen(tmp_path, n_val=0, n_test=0)
    with caplog.at_level(logging.WARNING):
        data = load_pu_data(tmp_path, val_fraction=0.1, test_fraction=0.2, seed=1)
    assert data.heldout and data.val.heldout and data.test.heldout
    assert "underestimate the true AUC" in caplog.text
    # round(0.1 * 30) = 3 and round(0.1 * 90) = 9 to val; 6 and 18 to test; the rest trains
    assert (data.n_pos, data.n_unl) == (21, 63)
    assert data.val.labels.tolist() == [1.0] * 3 + [0.0] * 9
    assert data.test.labels.tolist() == [1.0] * 6 + [0.0] * 18
    raw = torch.load(tmp_path / "preprocessed_data.pt", weights_only=True)["patches"]
    s = data.split
    seen = torch.cat([s["train_pos"], s["val_pos"], s["test_pos"]]).sort().values
    assert torch.equal(seen, torch.arange(30))
    assert torch.equal(data.val[0][0][0], raw["positive"][s["val_pos"][0]].float())
    assert torch.equal(data.test[6][0][0], raw["unlabeled"][s["test_unl"][0]].float())
    assert torch.equal(data.train[21][0][0], raw["unlabeled"][s["train_unl"][0]].float())
    other = load_pu_data(tmp_path, val_fraction=0.1, test_fraction=0.2, seed=2)
    assert not torch.equal(other.split["val_unl"], s["val_unl"])


def test_labelled_side_file_with_heldout_test(tmp_path, caplog):
    write(tmp_path / "preprocessed_data.pt", pos=10, unl=20)
    side = labelled(4, labels=torch.ones(4))
    torch.save(side, tmp_path / "val.pt")
    with caplog.at_level(logging.WARNING):
        data = load_pu_data(tmp_path, val_fraction=0.5, test_fraction=0.2)
    assert "only label 1" in caplog.text and "no labelled test set" in caplog.text
    assert not data.val.heldout and data.test.heldout and data.heldout
    assert len(data.val) == 4 and torch.equal(data.val[2][0][0], side["patches"][2])
    assert (data.n_pos, data.n_unl, len(data.test)) == (8, 16, 6)  # val_fraction unused


def test_split_round_trip_and_changed_data(tmp_path):
    d = gen(tmp_path / "d", n_val=0, n_test=0, chunk_size=40)
    first = load_pu_data(d, seed=7)
    save_checkpoint({"split": first.split}, tmp_path / "ck.pt")
    split = load_checkpoint(tmp_path / "ck.pt")["split"]  # weights_only round trip
    again = load_pu_data(d, seed=99, val_fraction=0.3, split=split)
    for k in ("train_pos", "train_unl", "val_pos", "val_unl", "test_pos", "test_unl"):
        assert torch.equal(again.split[k], first.split[k])
    assert torch.equal(again.train[40][0], first.train[40][0])
    assert torch.equal(again.val.labels, first.val.labels)

    gen(d, n_val=0, n_test=0, chunk_size=40, seed=6)  # same sizes, other content
    with pytest.raises(UserError, match=r"changed since the run started: .*chunk_000\.pt.*checksum"):
        load_pu_data(d, split=split)
    gen(d, n_val=0, n_test=0, n_pos=31, n_unl=89, chunk_size=40)
    with pytest.raises(UserError, match=r"run started: chunk_001\.pt held 10 positive patches then, 11 now$"):
        load_pu_data(d, split=split)
    gen(d, n_val=0, n_test=0)  # single file now
    with pytest.raises(UserError, match="changed since the run started: files"):
        load_pu_data(d, split=split)
    with pytest.raises(UserError, match="malformed"):
        load_pu_data(d, split={"version": 1})


# ----------------------------------------------------------------------------- sampler
def pos_count(b, bs, p, u):
    return (b + 1) * bs * p // (p + u) - b * bs * p // (p + u)


@pytest.mark.parametrize("n_pos,n_unl,bs,ratio", [(50, 1000, 32, (1, 4)), (7, 333, 16, (2, 3)),
                                                   (40, 100, 10, (1, 1))])
def test_sampler_counts_every_batch(n_pos, n_unl, bs, ratio):
    sampler = PUBatchSampler(n_pos, n_unl, bs, ratio=ratio, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    p, u = ratio
    for b, batch in enumerate(batches):
        assert len(batch) == bs
        assert sum(i < n_pos for i in batch) == pos_count(b, bs, p, u)
        assert all(0 <= i < n_pos + n_unl for i in batch)
    k = len(batches)
    total_pos = sum(sum(i < n_pos for i in batch) for batch in batches)
    assert total_pos == k * bs * p // (p + u)
    unl = [i for batch in batches for i in batch if i >= n_pos]
    assert set(unl) == set(range(n_pos, n_pos + n_unl))  # one full pass over U ...
    assert len(unl) - n_unl < bs - pos_count(k - 1, bs, p, u) + 1  # ... plus the wrap
    assert (k - 1) * bs - (k - 1) * bs * p // (p + u) < n_unl  # K is the smallest
    pos = [i for batch in batches for i in batch if i < n_pos]
    full = len(pos) // n_pos * n_pos  # whole permutations of the positives first
    assert all(sorted(pos[j:j + n_pos]) == list(range(n_pos)) for j in range(0, full, n_pos))


def test_sampler_b32_ratio_1_4():
    sampler = PUBatchSampler(100, 1000, 32, ratio=[1, 4])
    counts = [sum(i < 100 for i in batch) for batch in sampler]
    assert set(counts) == {6, 7} and counts[:5] == [6, 6, 7, 6, 7]
    assert len(counts) == 40 and sum(counts) == math.floor(40 * 32 / 5) == 256


def test_sampler_determinism_per_epoch():
    a, b = PUBatchSampler(20, 200, 32, seed=1), PUBatchSampler(20, 200, 32, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(PUBatchSampler(20, 200, 32, seed=2)) != first


@pytest.mark.parametrize("bs,ratio,smallest", [(4, [1, 4], 5), (4, [4, 1], 5), (9, [1, 9], 10),
                                               (1, [1, 1], 2)])
def test_sampler_batch_too_small(bs, ratio, smallest):
    with pytest.raises(UserError, match=rf"batch_size {bs} with batch_ratio \{ratio}.*"
                                        rf"use batch_size >= {smallest}$"):
        PUBatchSampler(10, 100, bs, ratio=ratio)
    PUBatchSampler(10, 100, smallest, ratio=ratio)


def test_sampler_bad_ratio():
    with pytest.raises(UserError, match="batch_ratio"):
        PUBatchSampler(10, 100, 32, ratio=[0, 4])


# ----------------------------------------------------------------------------- bad input
def _bad_cases(tmp):
    """name -> (setup writing into ``tmp``, expected message regex, load kwargs)."""
    f = tmp / "preprocessed_data.pt"
    c0, c1 = tmp / "chunk_000.pt", tmp / "chunk_001.pt"
    return {
        "missing_dir": (lambda: None, r"nothing does not exist", {"data_dir": tmp / "nothing"}),
        "not_dir": (lambda: f.write_bytes(b"x"), r"preprocessed_data\.pt is not a directory",
                    {"data_dir": f}),
        "empty_dir": (lambda: None, r"looked for preprocessed_data\.pt or chunk_\*\.pt", {}),
        "both_layouts": (lambda: (write(f), write(c0)), r"both preprocessed_data\.pt and 1", {}),
        "unreadable": (lambda: f.write_bytes(b"not a torch file"),
                       r"preprocessed_data\.pt cannot be read \(\w+", {}),
        "not_dict": (lambda: torch.save([1, 2], f), r"preprocessed_data\.pt holds a list", {}),
        "no_patches": (lambda: torch.save({"metadata": {}}, f), r"missing key 'patches'$", {}),
        "patches_not_dict": (lambda: torch.save({"patches": torch.zeros(2)}, f),
                             r"'patches' is a Tensor", {}),
        "no_positive": (lambda: torch.save({"patches": {"unlabeled": torch.zeros(2, S, S)}}, f),
                        r"preprocessed_data\.pt: missing key 'patches\.positive'", {}),
        "no_unlabeled": (lambda: torch.save({"patches": {"positive": torch.zeros(2, S, S)}}, f),
                         r"missing key 'patches\.unlabeled'", {}),
        "not_tensor": (lambda: write(f, pos=[[1.0]]), r"'patches\.positive' is a list", {}),
        "ndim": (lambda: write(f, unl=torch.zeros(3, S)),
                 r"'patches\.unlabeled' has shape \[3, 16\], expected \[N, S, S\]", {}),
        "two_channels": (lambda: write(f, pos=torch.zeros(3, 2, S, S)),
                         r"'patches\.positive' has shape \[3, 2, 16, 16\]", {}),
        "non_square": (lambda: write(f, pos=torch.zeros(3, S, S + 1)),
                       r"'patches\.positive' has non-square patches 16x17", {}),
        "size_pos_unl": (lambda: write(f, unl=torch.zeros(3, 8, 8)),
                         r"'patches\.unlabeled' has 8 px patches, other data have 16 px", {}),
        "size_between_files": (lambda: (write(c0), write(c1, size=8)),
                               r"chunk_001\.pt: 'patches\.positive' has 8 px", {}),
        "size_val": (lambda: write(f, val=labelled(size=8)), r"'val\.patches' has 8 px", {}),
        "meta_size": (lambda: write(f, metadata={"patch_size": 128}),
                      r"'metadata\.patch_size' is 128 but the patches are 16 px", {}),
        "dtype": (lambda: write(f, unl=torch.zeros(3, S, S, dtype=torch.int64)),
                  r"'patches\.unlabeled' has dtype int64", {}),
        "nan": (lambda: write(f, pos=torch.zeros(3, S, S).index_put_(
                    (torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0])),
                    torch.tensor([float("nan"), float("inf"), -float("inf")]))),
                r"'patches\.positive' holds 3 NaN/inf values", {}),
        "no_positives": (lambda: (write(c0, pos=0), write(c1, pos=torch.zeros(0, S, S))),
                         r"holds no positive patches", {}),
        "no_unlabelled": (lambda: write(f, unl=0), r"holds no unlabelled patches", {}),
        "labels_length": (lambda: write(f, val=labelled(labels=torch.zeros(5))),
                          r"'val\.labels' has shape \[5\], expected \[6\]", {}),
        "labels_values": (lambda: write(f, test=labelled(labels=torch.tensor([0, 1, 2, 0, 1, 0]))),
                          r"'test\.labels' holds values other than 0 and 1", {}),
        "side_file_labels": (lambda: (write(f), torch.save({"patches": torch.zeros(2, S, S)},
                                                           tmp / "test.pt")),
                             r"test\.pt: missing key 'labels'", {}),
        "val_fraction": (lambda: write(f), r"val_fraction must be a number in \[0, 1\), got 1\.0",
                         {"val_fraction": 1.0}),
        "neg_fraction": (lambda: write(f), r"test_fraction must be .* got -0\.1",
                         {"test_fraction": -0.1}),
        "fraction_sum": (lambda: write(f), r"val_fraction \+ test_fraction must be < 1",
                         {"val_fraction": 0.5, "test_fraction": 0.5}),
        "zero_fraction": (lambda: write(f), r"no labelled val set and val_fraction is 0",
                          {"val_fraction": 0.0}),
        "too_few_pos": (lambda: write(f, pos=2), r"has only 2 positive patches: holding out 1 for val and 1 for test \(val_fraction="
                        r"0\.1, test_fraction=0\.1; >= 1 each\) leaves none for training",
                        {}),
        "too_few_unl": (lambda: write(f, unl=1, val=labelled()),
                        r"has only 1 unlabelled patches: holding out 1 for test \(", {}),
        "max_open": (lambda: write(f), r"max_open_chunks must be an integer >= 1, got 0",
                     {"max_open_chunks": 0}),
    }


BAD = sorted(_bad_cases(__import__("pathlib").Path(".")))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_user_error(tmp_path, case):
    setup, pattern, kwargs = _bad_cases(tmp_path)[case]
    setup()
    kwargs = {"data_dir": tmp_path, **kwargs}
    with pytest.raises(UserError, match=pattern) as info:
        load_pu_data(**kwargs)
    assert "\n" not in str(info.value)


def test_single_class_labelled_set_is_allowed(tmp_path, caplog):
    write(tmp_path / "preprocessed_data.pt", val=labelled(labels=torch.zeros(6)),
          test=labelled())
    with caplog.at_level(logging.WARNING):
        data = load_pu_data(tmp_path)
    assert "labelled val set" in caplog.text and "only label 0" in caplog.text
    assert not data.heldout and len(data.val) == 6


# ------------------------------------------------------------------ make_demo_data.py --family cryoem

def test_make_demo_data_cryoem_family(tmp_path, capsys):
    import make_demo_data

    argv = ["--out", str(tmp_path), "--family", "cryoem", "--nPositive", "20", "--nUnlabeled", "60",
            "--nEval", "20", "--patchSize", "32", "--prior", "0.25"]
    out = make_demo_data.main(argv)
    assert out == tmp_path / "cryoem" and (out / ".cryoem_demo").is_file()
    data = load_pu_data(out, seed=0)
    assert (data.n_pos, data.n_unl, data.patch_size) == (20, 60, 32)
    assert not data.heldout and len(data.val) == len(data.test) == 20
    assert data.val.labels.sum().item() == 5  # round(0.25 * 20) particles in the labelled sets
    mtime = (out / "preprocessed_data.pt").stat().st_mtime_ns
    capsys.readouterr()
    make_demo_data.main(argv)  # same arguments: nothing rewritten
    assert "already there" in capsys.readouterr().out
    assert (out / "preprocessed_data.pt").stat().st_mtime_ns == mtime
    make_demo_data.main(argv + ["--chunkSize", "30"])  # other arguments: rebuilt as chunks
    assert sorted(p.name for p in out.glob("*.pt")) == ["chunk_000.pt", "chunk_001.pt", "chunk_002.pt"]


def test_make_demo_data_cryoem_refuses_foreign_data(tmp_path, capsys):
    import make_demo_data

    foreign = tmp_path / "cryoem" / "preprocessed_data.pt"
    foreign.parent.mkdir()
    foreign.write_bytes(b"mine")
    with pytest.raises(SystemExit) as exc:
        make_demo_data.main(["--out", str(tmp_path), "--family", "cryoem", "--patchSize", "32"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and str(foreign) in err and "--force" in err
    assert foreign.read_bytes() == b"mine"
