"""Files and paths a colleague shares, or a damaged run leaves: clear errors or a fresh start, never code in a
report, an unbounded read, a traceback or a silently wrong resume."""
from __future__ import annotations

import gzip
import json
import tracemalloc

import pytest
import torch

from testing import unsigned_checkpoint

from shortcut_ext import data as data_mod
from shortcut_ext.experiments import report, reproduce, sweeps
from shortcut_ext.experiments.store import RunStore
from shortcut_ext.train import TrainConfig, TrainResult, train


def test_the_report_escapes_the_data_tag_and_notes(tmp_path):
    """An MNIST folder named `<img src=x onerror=alert(1)>` went into report.html as a live tag."""
    sec = report.Section(key="s", title="T", expected="e", notes="a <b>note</b> & more")
    path = report.write_report(tmp_path / "r.html", "title", [sec], {}, {}, {},
                               intro="Data: mnist(/d <img src=x onerror=alert(1)>)")
    text = path.read_text()
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "<b>note</b>" not in text and "a &lt;b&gt;note&lt;/b&gt; &amp; more" in text


def test_a_dollar_in_a_caption_is_text(tmp_path):
    """A `$` in the data's name (the caption) was parsed as math: `$\\foo$` stopped reproduce after every run."""
    from shortcut_ext.experiments import figures

    fig, ax = figures._subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1])
    p = figures._save(fig, tmp_path / "f.png", caption="data: /home/u/cost $\\foo$ x")
    assert p.stat().st_size > 1000


def test_an_idx_gzip_bomb_is_refused_without_reading_it_whole(tmp_path):
    """A 1 MB gzip file holding a 2-image header and 1 GiB of zeros was decompressed whole (2.4 GB peak)."""
    header = bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in (2, 4, 4))
    path = tmp_path / "bomb-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(32) + bytes(16 << 20)))  # 16 MiB past the header's 32 bytes
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="IDX file longer than its header says: shape \\[2, 4, 4\\] needs 32"):
            data_mod.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak
    path.write_bytes(gzip.compress(header + bytes(range(32))))
    assert data_mod.read_idx(path).reshape(-1).tolist() == list(range(32))


def test_mnist_runs_are_keyed_by_values_not_path_and_npz_case(tmp_path):
    """The tag held the resolved path: a byte-identical copy elsewhere was refused, and a private path went into
    every key and the report. `M.NPZ` was not recognised as an .npz file."""
    import numpy as np

    g = np.random.default_rng(0)
    arrays = dict(x_train=g.integers(0, 256, (60, 5, 5), dtype=np.uint8), y_train=np.arange(60) % 10)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "a" / "m.npz", **arrays)
    with open(tmp_path / "b" / "M.NPZ", "wb") as f:  # np.savez would append ".npz" to the name
        np.savez(f, **arrays)
    ta = sweeps.load_data("mnist", path=str(tmp_path / "a" / "m.npz"), d=4).tag
    tb = sweeps.load_data("mnist", path=str(tmp_path / "b" / "M.NPZ"), d=4).tag
    assert ta == tb and str(tmp_path) not in ta and "sha1=" in ta


def test_a_damaged_options_file_is_replaced(tmp_path):
    """options.json holding a list (valid JSON, not this program's) ended in an AttributeError traceback."""
    bundle = sweeps.load_data("synthetic", d=3, samples=20)
    for text in ("[1, 2]", '"hello"', '{"config": [1]}', "[" * 100000 + "]" * 100000):
        path = tmp_path / "results" / "options.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        reproduce._claim_out(tmp_path, reproduce.TINY, bundle, "torch")
        assert json.loads(path.read_text())["backend"] == "torch"


def test_damaged_store_lines_are_skipped(tmp_path):
    """A non-UTF-8 byte stopped every reproduce with a UnicodeDecodeError that named no file; a deeply nested line
    with a RecursionError traceback."""
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b'{"key":"a","record":{"v":1}}\n{"key":"b","record":{"v":"\xc3"}}\n' + b"[" * 100000
                     + b"\n" + b'{"key":"c","record":[1]}\n{"key":"d","record":{"v":4}}\n')
    s = RunStore(path)
    assert s.keys() == ["a", "d"] and s.skipped_lines == 3


def test_stored_runs_of_the_wrong_types_are_not_records():
    """A record with every field but strings for numbers was read as a finished run (or failed far from the
    file with "could not convert string to float")."""
    X = torch.randn(8, 3, dtype=torch.float64)
    from shortcut_ext.models import ShortcutNet

    good = train(ShortcutNet(width=3, units=2, shortcut=2, dtype=torch.float64), (X, X), TrainConfig(epochs=2,
                 lr=0.01)).to_dict()
    assert TrainResult.is_record(good)
    for field, bad in (("final_loss", "abc"), ("lr", "x"), ("status", 5), ("epochs", "many"), ("probes", {}),
                       ("history", {**good["history"], "loss": ["a"] * len(good["history"]["loss"])})):
        assert not TrainResult.is_record({**good, field: bad}), field
    with pytest.raises(ValueError, match="another type"):
        TrainResult.from_dict({**good, "lr": "x"})


def test_a_damaged_train_checkpoint_starts_afresh(tmp_path):
    """A checkpoint with its fingerprint intact and a one-element weight was copied into all the weights (and
    resumed); without its history it ended in a KeyError traceback."""
    from shortcut_ext.models import ShortcutNet

    X = torch.randn(16, 3, dtype=torch.float64)
    cfg, ck = TrainConfig(epochs=6, lr=0.01), tmp_path / "c.ckpt.pt"

    def net():
        return ShortcutNet(width=3, units=2, shortcut=2, init="xavier", dtype=torch.float64)

    def stop(epoch):
        if epoch == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(net(), (X, X), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, on_epoch=stop)
    good = unsigned_checkpoint(ck)  # its entries are damaged below: no checksum (as an earlier version wrote)
    ref = train(net(), (X, X), cfg)
    for damage in ({"weight": torch.tensor([0.5], dtype=torch.float64)}, {"epoch": "5"}, {"history": None}):
        torch.save({**good, **damage}, ck)
        notes = []
        res = train(net(), (X, X), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, log=notes.append)
        assert len(notes) == 1 and "holds damaged entries" in notes[0], notes
        assert res.final_loss == ref.final_loss


@pytest.mark.parametrize("where", ["weight", "optimizer", "generator"])
def test_a_train_checkpoint_damaged_inside_a_tensor_starts_afresh(tmp_path, where):
    """Bytes changed inside a tensor of a checkpoint (a disk or copy error: the zip format checks no tensor data
    on reading) were resumed silently: other weights, another final loss.  The checksum written with the
    values finds it; the run starts afresh and ends with the uninterrupted run's numbers."""
    from shortcut_ext.models import ShortcutNet

    X = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg, ck = TrainConfig(epochs=6, lr=0.01, optimizer="adam"), tmp_path / "c.ckpt.pt"

    def net():
        return ShortcutNet(width=3, units=2, shortcut=2, init="xavier", seed=0, dtype=torch.float64)

    def stop(epoch):
        if epoch == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(net(), (X, X), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, on_epoch=stop)
    state = torch.load(ck, weights_only=True)
    tensor = {"weight": state["weight"], "generator": state["generator"],
              "optimizer": state["optimizer"]["state"][0]["exp_avg"]}[where]
    raw = bytearray(ck.read_bytes())
    at = raw.find(tensor.numpy().tobytes())
    assert at > 0 and raw.find(tensor.numpy().tobytes(), at + 1) < 0
    raw[at + 8: at + 16] = bytes(8)  # one value zeroed (a float64 of the tensor, 8 bytes of the generator)
    ck.write_bytes(bytes(raw))
    assert not torch.equal({"weight": lambda s: s["weight"], "generator": lambda s: s["generator"],
                            "optimizer": lambda s: s["optimizer"]["state"][0]["exp_avg"]}[where](
                                torch.load(ck, weights_only=True)), tensor)  # it still loads, with other values
    ref = train(net(), (X, X), cfg)
    notes = []
    res = train(net(), (X, X), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, log=notes.append)
    assert len(notes) == 1 and "is damaged (its values do not match the checksum" in notes[0], notes
    assert res.final_loss == ref.final_loss and res.history == ref.history


def test_a_damaged_spectrum_checkpoint_starts_afresh(tmp_path, capsys):
    """A spectrum checkpoint whose options matched but whose entries were damaged failed every rerun
    (strings in the recurrence, negative step counts) or resumed silently into nan / inf (NaN Ritz values)."""
    from shortcut_ext.cli import main

    out = tmp_path / "o"
    args = ["spectrum", "--units", "4", "--width", "3", "--samples", "24", "--probes", "2", "--steps", "8", "--top",
            "2", "--init", "small", "--no-progress", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    want = json.loads((out / "spectrum.json").read_text())["condition"]
    ck_path = out / "spectrum.checkpoint.json"
    good = json.loads(ck_path.read_text())

    def damaged(fn):
        ck = json.loads(json.dumps(good))
        fn(ck)
        return ck

    cases = [lambda c: c["slq"]["0"].__setitem__(0, ["a"] * len(c["slq"]["0"][0])),
             lambda c: c["slq"]["0"].__setitem__(2, -3),
             lambda c: c["slq"].__setitem__("9", c["slq"]["0"]),
             lambda c: c["lanczos"].__setitem__("largest", ["NaN"] * len(c["lanczos"]["largest"])),
             # resumed into index 0 and a null lam_max, "converged", with no warning:
             lambda c: [c["lanczos"].__setitem__(k, []) for k in ("largest", "smallest", "largest_residuals",
                                                                  "smallest_residuals")],
             lambda c: c["lanczos"].__setitem__("num_vectors", 10**400)]
    for fn in cases:
        ck_path.write_text(json.dumps(damaged(fn)))
        capsys.readouterr()
        assert main(args) == 0
        assert "holds damaged entries" in capsys.readouterr().err
        got = json.loads((out / "spectrum.json").read_text())
        assert got["resumed"]["lanczos"] is False and got["condition"] == pytest.approx(want)
    ck_path.write_text("null")  # JSON, but no checkpoint: replaced with a notice, as any other non-checkpoint
    capsys.readouterr()
    assert main(args) == 0
    assert "is not a spectrum checkpoint; starting afresh" in capsys.readouterr().err


def test_an_empty_out_and_a_csv_path_that_is_a_folder_are_refused(tmp_path, monkeypatch):
    """`--out ""` (an unset $OUT) wrote the spectrum into the current folder; a folder at run.csv was found
    only after the whole run had trained."""
    from shortcut_ext.cli import main

    monkeypatch.chdir(tmp_path)  # where an empty --out used to write

    with pytest.raises(SystemExit, match="--out must name a folder, got an empty string"):
        main(["spectrum", "--units", "2", "--width", "3", "--out", ""])
    (tmp_path / "run.csv").mkdir()
    with pytest.raises(SystemExit, match="the history CSV path .*run.csv .* is a folder"):
        main(["train", "--depth", "2", "--width", "3", "--epochs", "1", "--out", str(tmp_path / "run.json")])


def test_an_idx_header_claiming_terabytes_says_truncated(tmp_path):
    """The bounded reader allocated what the header claimed (MemoryError with a hint about --units, or an
    OverflowError traceback) where the old one said "truncated"."""
    for dims in ((1 << 16, 1 << 16, 1 << 8), (0xFFFFFFFF,) * 3):
        raw = bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in dims) + bytes(10)
        for gz in (False, True):
            path = tmp_path / ("i-images-idx3-ubyte" + (".gz" if gz else ""))
            path.write_bytes(gzip.compress(raw) if gz else raw)
            with pytest.raises(ValueError, match="truncated IDX data, header says shape"):
                data_mod.read_idx(path)


def test_train_checkpoints_damaged_inside_start_afresh_and_keep_the_model(tmp_path):
    """Entries damaged below the top level: an empty history (KeyError), a history cut short (resumed into a
    6-epoch history for 9), a generator or optimizer state of another size (the failed call had already
    overwritten the model's weights)."""
    from shortcut_ext.models import ShortcutNet

    X = torch.randn(16, 3, dtype=torch.float64)
    cfg, ck = TrainConfig(epochs=6, lr=0.01, optimizer="adam"), tmp_path / "c.ckpt.pt"

    def net():
        return ShortcutNet(width=3, units=2, shortcut=2, init="xavier", dtype=torch.float64)

    from test_train import _interrupt_at

    _interrupt_at(4, net(), (X, X), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0)
    good = unsigned_checkpoint(ck)
    ref = train(net(), (X, X), cfg)
    cut = {k: v[:1] for k, v in good["history"].items()}
    for damage in ({"history": {}}, {"history": cut}, {"generator": torch.zeros(3, dtype=torch.uint8)},
                   {"optimizer": None}, {"seconds": "x"}, {"probes": [1]}):
        torch.save({**good, **damage}, ck)
        notes, model = [], net()
        w0 = model.weight.detach().clone()
        res = train(model, (X, X), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, log=notes.append)
        assert len(notes) == 1 and "holds damaged entries" in notes[0], (damage.keys(), notes)
        assert res.final_loss == ref.final_loss and len(res.history["epoch"]) == len(ref.history["epoch"])
        assert not torch.equal(model.weight, w0)  # trained from its own start, as the reference
    folder = tmp_path / "ckdir"
    folder.mkdir()
    with pytest.raises(ValueError, match="checkpoint .*ckdir is a folder"):
        train(net(), (X, X), cfg, checkpoint=folder)


def test_a_noise_free_teachers_data_rounded_differently_resumes(tmp_path):
    """L_min of a noise-free teacher is rounding itself (1.8e-31 against 3.6e-31 after a 1-ulp change of X):
    compared relative to itself it restarted the run, naming l_min."""
    from shortcut_ext.data import best_linear_loss, synthetic_teacher
    from shortcut_ext.models import ShortcutNet
    from test_train import _interrupt_at

    X, Y = synthetic_teacher(64, 4, seed=0, noise=0.0)
    cfg, ck = TrainConfig(epochs=8, lr=0.05), tmp_path / "t.ckpt.pt"

    def net():
        return ShortcutNet(width=4, units=2, shortcut=2, init="small", dtype=torch.float64)

    _interrupt_at(5, net(), (X, Y), cfg, l_min=best_linear_loss(X, Y), checkpoint=ck, checkpoint_every=1,
                  checkpoint_every_s=0)
    X2 = X * (1 + 2e-16 * torch.randn(X.shape, generator=torch.Generator().manual_seed(3), dtype=X.dtype))
    notes = []
    train(net(), (X2, Y), cfg, l_min=best_linear_loss(X2, Y), checkpoint=ck, checkpoint_every=1,
          checkpoint_every_s=0, log=notes.append)
    assert "to rounding only" in notes[0] and notes[1].startswith("resuming from epoch"), notes


def test_more_damaged_state_files(tmp_path, capsys):
    """A spectrum probe key "²" (isdigit, not int) failed the command; a folder at the checkpoint path failed after
    the whole Lanczos phase; an emptied options.json was called other options; an l_min of "inf" was not decoded;
    a folder of the previous tag format (path and hash) got no hint."""
    from shortcut_ext.cli import main

    out = tmp_path / "o"
    args = ["spectrum", "--units", "4", "--width", "3", "--samples", "24", "--probes", "2", "--steps", "8", "--top",
            "2", "--init", "small", "--no-progress", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    ck = json.loads((out / "spectrum.checkpoint.json").read_text())
    ck["slq"]["\u00b2"] = ck["slq"].pop("1")
    (out / "spectrum.checkpoint.json").write_text(json.dumps(ck))
    capsys.readouterr()
    assert main(args) == 0 and "holds damaged entries" in capsys.readouterr().err
    other = tmp_path / "p"
    (other / "spectrum.checkpoint.json").mkdir(parents=True)
    with pytest.raises(SystemExit, match="checkpoint path .* is a folder"):
        main(args[:-1] + [str(other)])
    bundle = sweeps.load_data("synthetic", d=3, samples=20)
    path = tmp_path / "r" / "results" / "options.json"
    path.parent.mkdir(parents=True)
    for text in ("{}", '{"config": {}}'):
        path.write_text(text)
        reproduce._claim_out(tmp_path / "r", reproduce.TINY, bundle, "torch")
        assert json.loads(path.read_text())["backend"] == "torch"
    opts = json.loads(path.read_text())
    path.write_text(json.dumps({**opts, "data": "mnist(/home/u/m.npz,sha1=0123456789abcdef,d=3,m=20,seed=0)"}))
    with pytest.raises(ValueError, match="made by an earlier version of shortcut_ext"):
        reproduce._claim_out(tmp_path / "r", reproduce.TINY, bundle, "torch")
    from shortcut_ext.models import ShortcutNet

    X = torch.randn(8, 3, dtype=torch.float64)
    rec = train(ShortcutNet(width=3, units=2, shortcut=2, dtype=torch.float64), (X, X),
                TrainConfig(epochs=1, lr=0.01)).to_dict()
    assert TrainResult.from_dict({**rec, "l_min": "inf"}).l_min == float("inf")


def test_train_checkpoints_with_other_l_min_or_bad_numbers_or_buffers(tmp_path):
    """Review 4: another l_min set by the caller (the data unchanged) resumed as "rounding only" and mixed two
    excess series; a limit of nan turned divergence detection off; optimizer buffers of another size crashed the
    first step after "resuming"; strings in the history failed only in to_dict; a checkpoint under a file
    failed at the first save."""
    from shortcut_ext.data import best_linear_loss, synthetic_teacher
    from shortcut_ext.models import ShortcutNet
    from test_train import _interrupt_at

    X, Y = synthetic_teacher(64, 4, seed=0, noise=1e-3)
    ck = tmp_path / "c.ckpt.pt"

    def net():
        return ShortcutNet(width=4, units=2, shortcut=2, init="xavier", dtype=torch.float64)

    cfg = TrainConfig(epochs=8, lr=0.05, optimizer="adam")
    _interrupt_at(4, net(), (X, Y), cfg, l_min=0.0, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0)
    notes = []
    res = train(net(), (X, Y), cfg, l_min=best_linear_loss(X, Y), checkpoint=ck, checkpoint_every=1,
                checkpoint_every_s=0, log=notes.append)
    assert "is of another run (it differs in: l_min)" in notes[0], notes
    assert res.history["excess"][0] == pytest.approx(res.history["loss"][0] - best_linear_loss(X, Y))
    _interrupt_at(4, net(), (X, Y), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0)
    good = unsigned_checkpoint(ck)
    ref = train(net(), (X, Y), cfg)
    bad_opt = {**good["optimizer"], "state": {k: {**v, "exp_avg": torch.zeros(5, dtype=torch.float64)}
                                               for k, v in good["optimizer"]["state"].items()}}
    bad_hist = {**good["history"], "loss": ["x"] * len(good["history"]["loss"])}
    for damage in ({"limit": float("nan")}, {"seconds": -5.0}, {"optimizer": bad_opt}, {"history": bad_hist}):
        torch.save({**good, **damage}, ck)
        notes = []
        res = train(net(), (X, Y), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, log=notes.append)
        assert len(notes) == 1 and "holds damaged entries" in notes[0], (list(damage), notes)
        assert res.final_loss == ref.final_loss
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="lies under .*afile, which is a file"):
        train(net(), (X, Y), cfg, checkpoint=tmp_path / "afile" / "ck.pt")


# --------------------------------------------------------------------------- QA 12 mutation survivors (experiments)
def test_a_run_saved_after_an_interrupted_write_is_kept(tmp_path):
    """Not pinned: a store whose last line was cut by an interrupted write (no newline) gets the next run on a
    line of its own; appended to the partial line, that run was skipped with it at the next resume."""
    path = tmp_path / "runs.jsonl"
    RunStore(path).put("a", {"v": 1})
    with open(path, "a") as f:
        f.write('{"key":"b","rec')  # killed mid-write
    s = RunStore(path)
    assert s.keys() == ["a"] and s.skipped_lines == 1
    s.put("c", {"v": 3})
    s.put("d", {"v": 4})
    back = RunStore(path)
    assert back.keys() == ["a", "c", "d"] and back.get("c") == {"v": 3} and back.skipped_lines == 1
    assert path.read_text().splitlines()[1] == '{"key":"b","rec'  # the partial line alone on its line


def _ck_net():
    from shortcut_ext.models import ShortcutNet

    return ShortcutNet(width=4, units=2, shortcut=2, init="xavier", dtype=torch.float64)


def test_train_checkpoints_of_data_changed_beyond_rounding_or_of_another_l_min_start_afresh(tmp_path):
    """Not pinned: how close data must be to the checkpoint's to count as "rounded differently" (1e-5 of their
    norm): data scaled by 1 + 5e-5 (the same L_min) resumed under a 10x looser tolerance; and an l_min the caller
    changed by 1e-7 relative on the same data (the data hash equal) is another run, not rounding, however small."""
    from shortcut_ext.data import best_linear_loss, synthetic_teacher
    from test_train import _interrupt_at

    X, Y = synthetic_teacher(64, 4, seed=0, noise=0.1)
    lm = best_linear_loss(X, Y)
    cfg, ck = TrainConfig(epochs=8, lr=0.05), tmp_path / "c.ckpt.pt"
    kw = dict(checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0)
    assert best_linear_loss(X * (1 + 5e-5), Y) == pytest.approx(lm, rel=1e-9)  # scaling X keeps L_min
    for X2, lm2, what in ((X * (1 + 5e-5), lm, "data or probe data"), (X, lm * (1 + 1e-7), "l_min")):
        ck.unlink(missing_ok=True)
        _interrupt_at(5, _ck_net(), (X, Y), cfg, l_min=lm, **kw)
        notes = []
        res = train(_ck_net(), (X2, Y), cfg, l_min=lm2, log=notes.append, **kw)
        assert len(notes) == 1 and f"is of another run (it differs in: {what})" in notes[0], notes
        fresh = train(_ck_net(), (X2, Y), cfg, l_min=lm2)
        assert res.history["loss"] == fresh.history["loss"] and res.history["excess"] == fresh.history["excess"]
    # within the tolerance (5e-7 of the norm) it is the same data, rounded differently: resumed, with the note
    ck.unlink(missing_ok=True)
    _interrupt_at(5, _ck_net(), (X, Y), cfg, l_min=lm, **kw)
    notes = []
    train(_ck_net(), (X * (1 + 5e-7), Y), cfg, l_min=lm, log=notes.append, **kw)
    assert "to rounding only" in notes[0] and notes[1].startswith("resuming from epoch 6 of 8"), notes


def test_train_checkpoints_beyond_the_last_epoch_or_with_other_history_epochs_start_afresh(tmp_path):
    """Not pinned: a checkpoint (fingerprint intact) at epoch 15 of a 10-epoch run, or whose history holds the
    right number of epochs but not epochs 0 to e-1, is damaged: the run starts afresh, as an uninterrupted one."""
    from test_train import _interrupt_at

    X = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg, ck = TrainConfig(epochs=10, lr=0.01), tmp_path / "c.ckpt.pt"
    kw = dict(checkpoint_every=1, checkpoint_every_s=0)
    _interrupt_at(4, _ck_net(), (X, X), cfg, checkpoint=ck, **kw)
    good = unsigned_checkpoint(ck)
    assert good["epoch"] == 5 and good["history"]["epoch"] == [0, 1, 2, 3, 4]
    longer = tmp_path / "l.ckpt.pt"  # a 20-epoch run's state at epoch 15, under this run's fingerprint
    _interrupt_at(14, _ck_net(), (X, X), TrainConfig(epochs=20, lr=0.01), checkpoint=longer, **kw)
    late = unsigned_checkpoint(longer)
    assert late["epoch"] == 15 and late["history"]["epoch"] == list(range(15))
    ref = train(_ck_net(), (X, X), cfg)
    shifted = {**good["history"], "epoch": [1, 2, 3, 4, 5]}
    for state, why in (({**late, "fingerprint": good["fingerprint"]}, "epoch 15 is not an integer in [0, 10]"),
                       ({**good, "history": shifted}, "its history does not hold epochs 0 to 4")):
        torch.save(state, ck)
        notes = []
        res = train(_ck_net(), (X, X), cfg, checkpoint=ck, log=notes.append, **kw)
        assert len(notes) == 1 and f"holds damaged entries ({why})" in notes[0], notes
        assert res.status == "ok" and res.final_loss == ref.final_loss and res.history == ref.history


def test_a_spectrum_checkpoint_damaged_in_its_segments_or_seconds_starts_afresh(tmp_path, capsys):
    """The checks above looked at the recurrence and the Ritz values only: a `seconds` entry that was not an
    object escaped main() as an AttributeError, a Lanczos segment that was not [start, end, reason] failed every
    rerun ("'int' object is not iterable") or was resumed as ["a", "b"], a string max_vectors or a numeric
    stop_reason went into spectrum.json unchecked, and an integer beyond float's range (JSON allows one) raised an
    OverflowError out of main() from math.isfinite. A seconds entry of non-finite, negative or boolean values
    leaves that phase's earlier time unknown."""
    from shortcut_ext.cli import main

    out = tmp_path / "o"
    args = ["spectrum", "--units", "4", "--width", "3", "--samples", "24", "--probes", "2", "--steps", "8", "--top",
            "2", "--init", "small", "--no-progress", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    want = json.loads((out / "spectrum.json").read_text())
    ck_path = out / "spectrum.checkpoint.json"
    good = json.loads(ck_path.read_text())
    assert good["lanczos"]["segments"] and isinstance(good["seconds"], dict)

    def edit(section, key, value):
        ck = json.loads(json.dumps(good))
        (ck if section is None else ck[section])[key] = value
        return ck

    huge = json.loads("1" + "0" * 400)  # an integer literal beyond float's range: math.isfinite overflows
    for section, key, value in (("lanczos", "segments", [5]), ("lanczos", "segments", ["ab"]),
                                ("lanczos", "segments", [[3, 1, "converged"]]), ("lanczos", "segments", [[0, 6]]),
                                ("lanczos", "segments", [[0, 6, 7]]), ("lanczos", "segments", [[0, "x", "c"]]),
                                ("lanczos", "max_vectors", "x"), ("lanczos", "basis_bytes", -1),
                                ("lanczos", "stop_reason", 7), ("lanczos", "norm_estimate", huge),
                                ("lanczos", "largest", [huge] * len(good["lanczos"]["largest"]))):
        ck_path.write_text(json.dumps(edit(section, key, value)))
        capsys.readouterr()
        assert main(args) == 0, (key, value)
        assert "holds damaged entries" in capsys.readouterr().err, (key, value)
        got = json.loads((out / "spectrum.json").read_text())
        assert got["resumed"]["lanczos"] is False and got["lanczos"]["segments"] == want["lanczos"]["segments"]
        assert got["condition"] == pytest.approx(want["condition"])
    assert good["seconds"]["lanczos"] >= 0 and good["seconds"]["slq"] >= 0
    for seconds, unknown in ((5, ["lanczos", "slq"]), ("abc", ["lanczos", "slq"]), ([1], ["lanczos", "slq"]),
                             ({"lanczos": "x", "slq": float("inf")}, ["lanczos", "slq"]),
                             ({"lanczos": True, "slq": huge}, ["lanczos", "slq"]),
                             ({"lanczos": -3.0, "slq": 1.0}, ["lanczos"]), ({"lanczos": 2.0, "slq": 0}, [])):
        ck_path.write_text(json.dumps(edit(None, "seconds", seconds)))
        capsys.readouterr()
        assert main(args) == 0, seconds  # resumed: the earlier time is unknown, as for an older checkpoint
        got = json.loads((out / "spectrum.json").read_text())
        assert got["resumed"]["lanczos"] is True and got["condition"] == pytest.approx(want["condition"]), seconds
        assert got["resumed"]["seconds_unknown"] == unknown, (seconds, got["resumed"])
        assert ("lanczos" in got["timings_s"]) == ("lanczos" not in unknown), (seconds, got["timings_s"])


def test_a_stored_run_with_an_integer_beyond_float_range_is_run_again():
    """JSON allows integer literals of any size: a runs.jsonl record whose final loss or history held 1e400
    written as an integer counted as a finished run, and its number overflowed wherever it was used."""
    from shortcut_ext.models import ShortcutNet

    X = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    good = train(ShortcutNet(3, 1, init="small", dtype=torch.float64), (X, X), TrainConfig(epochs=2)).to_dict()
    assert TrainResult.is_record(good)
    huge = json.loads("1" + "0" * 400)
    assert not TrainResult.is_record({**good, "final_loss": huge})
    assert not TrainResult.is_record({**good, "lr": huge})
    assert not TrainResult.is_record({**good, "history": {**good["history"], "loss": [huge] * 3}})
    assert TrainResult.is_record({**good, "final_loss": 10**300, "lr": 1})  # large but a float: fine


def test_a_stored_curvature_record_with_a_non_number_is_computed_again():
    """A stored initial-curvature record with ``"lam_max": "abc"`` was reused, and the string reached
    fig5_init_condition.csv; numbers as json_safe writes them (nan as null, inf as a string) stay usable."""
    good = {"lam_max": 2.5, "lam_q10": None, "index": 0.0, "cond": "inf", "cond_q10": 7, "method": "exact"}
    assert sweeps._is_probe_record(good)
    for field, bad in (("lam_max", "abc"), ("index", True), ("cond_q10", [1.0]), ("method", 3), ("cond", "-nan")):
        assert not sweeps._is_probe_record({**good, field: bad}), field
