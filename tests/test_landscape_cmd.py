"""``shortcut-ext landscape`` from the command line: the same losses and quadratic model as the
``shortcut_ext.curvature`` API, Theorem 1's orders at a 3-shortcut zero point, a resumed run equal bit for
bit to an uninterrupted one, checkpoints of other options or damaged rows, and refused flags.

Every call is in-process through ``shortcut_ext.cli.main`` at tiny sizes (under a second each)."""
from __future__ import annotations

import csv
import json

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from shortcut_ext.cli import main  # noqa: E402
from shortcut_ext.curvature import (HessianOperator, landscape, landscape_cmd, loss_slice, losses_at,  # noqa: E402
                                    random_directions)
from shortcut_ext.curvature.spectrum_cmd import load_data  # noqa: E402
from shortcut_ext.models import ShortcutNet  # noqa: E402

TINY = ["landscape", "--units", "5", "--width", "3", "--samples", "24", "--no-progress"]


def _strict(text: str):
    def bad(const):
        raise AssertionError(f"not strict JSON: {const}")

    return json.loads(text, parse_constant=bad)


def _result(out):
    return _strict((out / "landscape.json").read_text())


@pytest.mark.parametrize("plane", [False, True], ids=["line", "plane"])
def test_the_command_gives_the_apis_slice(tmp_path, plane):
    """The command's losses are loss_slice's on the same net, data and directions, bit for bit; its quadratic
    model is LossSlice.quadratic; the CSV and PNG are written."""
    out = tmp_path / "o"
    extra = ["--init", "small", "--scale", "0.3", "--mid", "tanh", "--span", "0.5", "--points", "7",
             "--direction-seed", "5"] + (["--plane"] if plane else [])
    assert main(TINY + extra + ["--out", str(out)]) == 0
    r = _result(out)
    X, Y = load_data("synthetic", 24, 3, 0, 0.1, torch.float64)
    net = ShortcutNet(3, 5, 2, "identity", "tanh", "identity", init="small", scale=0.3, seed=0, dtype=torch.float64)
    op = HessianOperator(net, (X, Y), "mse", backend="fused")
    V = random_directions(op, 2 if plane else 1, seed=5)
    ts = np.linspace(-0.5, 0.5, 7)
    sl = loss_slice(op, V, ts, ts if plane else None)
    assert np.array_equal(np.array(r["loss"]), sl.loss) and r["center"] == sl.center
    np.testing.assert_allclose(np.array(r["quadratic"]), sl.quadratic(), rtol=1e-12, atol=1e-15)
    assert r["ts"] == ts.tolist() and (r["ss"] == ts.tolist() if plane else r["ss"] is None)
    assert r["num_params"] == op.P and r["resumed_rows"] == 0 and len(r["direction_norms"]) == (2 if plane else 1)
    assert r["max_abs_model_error"] == pytest.approx(float(np.max(np.abs(sl.loss - sl.quadratic()))), rel=1e-9)
    rows = list(csv.DictReader(open(out / "landscape.csv")))
    assert len(rows) == (49 if plane else 7)
    assert [float(x["loss"]) for x in rows] == sl.loss.ravel().tolist()
    assert (out / "landscape.png").stat().st_size > 1000
    # a point set of the API's own: the same losses as the grid's
    pts = np.array([[t, s] for t in ts for s in ts]) if plane else ts
    assert np.array_equal(losses_at(op, V, pts), sl.loss.ravel())


def test_orders_at_a_three_shortcut_zero_point(tmp_path, capsys):
    """Theorem 1 on the plane of a 3-shortcut zero point: gradient and curvature vanish (a flat quadratic model),
    and the loss leaves as t^3 along both directions."""
    out = tmp_path / "o"
    assert main(TINY + ["--shortcut", "3", "--init", "zero", "--plane", "--order", "--points", "5",
                        "--out", str(out)]) == 0
    r = _result(out)
    assert r["grad_norm"] == 0 and np.all(np.array(r["curvature"]) == 0) and np.all(np.array(r["slopes"]) == 0)
    assert np.all(np.array(r["quadratic"]) == r["center"])
    assert [round(o["order"], 1) for o in r["orders"]] == [3.0, 3.0]
    assert "order along each direction: 3, 3" in capsys.readouterr().out


def test_an_interrupted_run_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    args = TINY + ["--init", "small", "--scale", "0.5", "--plane", "--points", "6"]
    assert main(args + ["--out", str(whole)]) == 0
    real, calls = landscape.losses_at, []

    def stop_after_three(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(landscape, "losses_at", stop_after_three)
    assert main(args + ["--out", str(part)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; the finished rows of the grid (and points of a training path) are saved in" in err
    assert "resumes" in err
    assert len((part / landscape_cmd.CHECKPOINT).read_text().splitlines()) == 3
    assert not (part / "landscape.json").exists()
    monkeypatch.setattr(landscape, "losses_at", real)
    assert main(args + ["--out", str(part)]) == 0
    said = capsys.readouterr().out
    assert "resuming from the checkpoint" in said and "3 of 6 rows of the grid done" in said
    a, b = _result(whole), _result(part)
    assert b["resumed_rows"] == 3 and a["loss"] == b["loss"] and a["quadratic"] == b["quadratic"]
    # a finished run's rerun computes no row again
    # the grid's time adds what the first process spent on the rows it left (each row's record keeps its seconds)
    ck = part / landscape_cmd.CHECKPOINT
    secs = [json.loads(line)["record"]["seconds"] for line in ck.read_text().splitlines()]
    t = b["timings_s"]
    assert len(secs) == 6 and all(x > 0 for x in secs) and "resumed_rows_seconds_unknown" not in b
    assert t["grid"] == pytest.approx(t["grid_this_process"] + sum(secs[:3]), rel=1e-12)
    monkeypatch.setattr(landscape, "losses_at", lambda *a, **k: pytest.fail("a stored row was computed again"))
    assert main(args + ["--out", str(part)]) == 0
    c = _result(part)
    assert c["resumed_rows"] == 6 and c["loss"] == a["loss"]
    assert c["timings_s"]["grid"] == pytest.approx(c["timings_s"]["grid_this_process"] + sum(secs), rel=1e-12)
    # records of an older version, without their seconds: the grid's total is left out, and the count said
    lines = [json.loads(line) for line in ck.read_text().splitlines()]
    ck.write_text("".join(json.dumps({**x, "record": {"loss": x["record"]["loss"]}}) + "\n" for x in lines))
    assert main(args + ["--out", str(part)]) == 0
    c = _result(part)
    assert c["loss"] == a["loss"] and c["resumed_rows_seconds_unknown"] == 6 and "grid" not in c["timings_s"]
    assert c["timings_s"]["grid_this_process"] >= 0


def test_a_checkpoint_of_other_options_or_with_damaged_rows(tmp_path, capsys):
    out = tmp_path / "o"
    args = TINY + ["--init", "small", "--points", "5"]
    assert main(args + ["--out", str(out)]) == 0
    first = _result(out)
    capsys.readouterr()
    assert main(args + ["--span", "2", "--out", str(out)]) == 0
    assert "is of other options" in capsys.readouterr().out
    other = _result(out)
    assert other["ts"][0] == -2.0 and other["resumed_rows"] == 0
    ck = out / landscape_cmd.CHECKPOINT
    items = [json.loads(line) for line in ck.read_text().splitlines()]
    assert len(items) == 5 and all(k["key"].endswith(f"|row={i}") for i, k in enumerate(items))
    with open(ck, "a") as f:  # later lines win: rows of the wrong length, of lists, of text
        f.write(json.dumps({"key": items[1]["key"], "record": {"loss": [1.0, 2.0]}}) + "\n")
        f.write(json.dumps({"key": items[3]["key"], "record": {"loss": [[1.0]]}}) + "\n")
        f.write(json.dumps({"key": items[4]["key"], "record": {"loss": ["1.5"]}}) + "\n")
        f.write('{"key": "half a line')
    capsys.readouterr()
    assert main(args + ["--span", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out  # damaged rows were recomputed without a word
    assert "holds 3 damaged records (row=1 ...); computed again" in said and "1 unreadable line" in said
    again = _result(out)
    assert again["resumed_rows"] == 2 and again["loss"] == other["loss"]
    assert first["loss"] != other["loss"]
    # one record of other options among this run's threw all of them away ("is of other options")
    with open(ck, "a") as f:
        f.write(json.dumps({"key": "another-run|row=0", "record": {"loss": [1.0] * 5}}) + "\n")
    assert main(args + ["--span", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "is of other options" not in said and "also holds 1 record of other options" in said
    assert _result(out)["resumed_rows"] == 5 and _result(out)["loss"] == other["loss"]


@pytest.mark.parametrize("extra, flag", [
    (["--points", "1"], "--points"),
    (["--span", "0"], "--span"),
    (["--span", "nan"], "--span"),
    (["--range", "nan", "1"], "--range"),
    (["--range", "-1", "inf"], "--range"),
    (["--normalize", "sideways"], "--normalize"),
])
def test_bad_flags_are_named_by_argparse(tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit) as e:
        main(TINY + extra + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("extra, words", [
    (["--normalize", "layer"], "--normalize layer scales the directions like the weights, which are all 0"),
    (["--shortcut", "0", "--pre", "relu"], "--pre relu has no effect on a plain net"),
    (["--data", "digits", "--samples", "5000"], "--samples must be <= 1797"),
    (["--device", "tpu"], "--device must be a torch device"),
    (["--range", "1", "-1"], "--range: LO < HI, got 1 -1"),
    (["--range", "-1", "1", "0.5", "0.5", "--plane"], "--range: LO < HI, got 0.5 0.5"),
    (["--range", "-1", "1", "--span", "2"], "--span 2 and --range -1 1 both set the grid's ends"),
    (["--range", "-1", "1", "-1", "1"], "--range takes LO HI on a line (two pairs only with --plane), got 4 numbers"),
    (["--range", "1", "--plane"], "--range takes LO HI (or LO HI LO2 HI2, one pair a direction), got 1 number"),
    (["--range", "-1", "0", "1", "--plane"], "got 3 numbers"),
    (["--matrix", "ggn"], "--matrix ggn has no effect with --directions random"),
])
def test_refused_combinations_name_the_command_and_the_flag(tmp_path, extra, words):
    with pytest.raises(SystemExit) as e:
        main(TINY + extra + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2 and str(e.value).startswith("shortcut-ext landscape") and words in str(e.value)


@pytest.mark.parametrize("plane", [False, True], ids=["line", "plane"])
def test_range_sets_the_ends_of_each_direction(tmp_path, plane):
    """--range LO HI (a plane: one pair for both directions, or one each): the grid runs from LO to HI, and the
    losses are loss_slice's on those steps, bit for bit."""
    X, Y = load_data("synthetic", 24, 3, 0, 0.1, torch.float64)
    net = ShortcutNet(3, 5, 2, "identity", "tanh", "identity", init="small", scale=0.3, seed=0, dtype=torch.float64)
    op = HessianOperator(net, (X, Y), "mse", backend="fused")
    V = random_directions(op, 2 if plane else 1, seed=0)
    common = TINY + ["--init", "small", "--scale", "0.3", "--mid", "tanh", "--points", "5"] + (["--plane"] * plane)
    for rng in ([["-0.2", "0.6"]] + ([["-0.2", "0.6", "-1", "0.5"]] if plane else [])):
        out = tmp_path / ("o" + "_".join(rng))
        assert main(common + ["--range", *rng, "--out", str(out)]) == 0
        r = _result(out)
        lo, hi = float(rng[0]), float(rng[1])
        ts = np.linspace(lo, hi, 5)
        ss = np.linspace(float(rng[-2]), float(rng[-1]), 5) if plane else None
        sl = loss_slice(op, V, ts, ss)
        assert r["ts"] == ts.tolist() and r["ss"] == (None if ss is None else ss.tolist())
        assert np.array_equal(np.array(r["loss"]), sl.loss) and r["config"]["range"] == [float(x) for x in rng]
        np.testing.assert_allclose(np.array(r["quadratic"]), sl.quadratic(), rtol=1e-12, atol=1e-15)


def test_filter_normalised_directions_at_xavier_weights(tmp_path):
    """Away from the zero point the per-filter scaling applies: each row of a direction has the norm of that row
    of the weights, so the direction's norm is the weights' norm."""
    out = tmp_path / "o"
    assert main(TINY + ["--init", "xavier", "--normalize", "filter", "--points", "3", "--out", str(out)]) == 0
    net = ShortcutNet(3, 5, 2, init="xavier", seed=0, dtype=torch.float64)
    assert _result(out)["direction_norms"][0] == pytest.approx(float(net.weight.detach().double().norm()), rel=1e-12)


def test_points_where_the_loss_overflows_are_counted_and_kept_out_of_the_model_error(tmp_path, capsys):
    """A long step on a deep net overflows: those points are inf in strict JSON, named in the summary line, and
    the plane's contours are drawn from the finite ones."""
    out = tmp_path / "o"
    assert main(TINY + ["--units", "20", "--init", "small", "--plane", "--points", "5", "--span", "1e8",
                        "--out", str(out)]) == 0
    r = _result(out)
    loss = np.array([[float(v) for v in row] for row in r["loss"]])
    assert r["nonfinite_points"] == int((~np.isfinite(loss)).sum()) > 0 and np.isfinite(loss[2, 2])
    assert r["max_abs_model_error"] == 0.0  # the origin alone is finite here, where the model is exact
    assert "the loss is not finite at" in capsys.readouterr().out
    assert (out / "landscape.png").stat().st_size > 1000


def test_an_interrupt_before_the_first_row_says_nothing_is_saved(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(landscape, "losses_at", interrupted)
    assert main(TINY + ["--init", "small", "--out", str(tmp_path / "o")]) == 130
    assert "interrupted; no row of the grid (or point of a training path) had finished: a rerun starts over" in \
        capsys.readouterr().err


# ------------------------------------------------------------------ around a trained net (train --save-weights)
TRAIN = ["train", "--arch", "2-shortcut", "--act", "tanh-mid", "--depth", "4", "--width", "4", "--samples", "40",
         "--lr", "0.3", "--no-progress"]


def test_the_landscape_around_a_trained_net(tmp_path, capsys):
    """train --save-weights writes the trained net with what rebuilds it and its data; landscape --weights is
    centred there: its loss at the weights is the run's final loss, in the run's float32 or in float64."""
    from shortcut_ext.experiments.train_cmd import load_weights

    run = tmp_path / "run.json"
    assert main(TRAIN + ["--epochs", "20", "--dtype", "float32", "--save-weights", "--out", str(run)]) == 0
    assert "run.weights.pt" in capsys.readouterr().out
    final = json.loads(run.read_text())["final_loss"]
    w = tmp_path / "run.weights.pt"
    blob = torch.load(w, weights_only=True)
    net, bundle, info = load_weights(w)
    assert info["net"]["arch"] == "2-shortcut" and net.weight.dtype == torch.float32
    assert torch.equal(net.weight.detach(), blob["state_dict"]["weight"]) and bundle.tag == blob["data"]["tag"]
    for dtype, rel in (("float32", 1e-6), ("float64", 1e-6)):
        out = tmp_path / dtype
        assert main(["landscape", "--weights", str(w), "--dtype", dtype, "--points", "5", "--no-progress",
                     "--out", str(out)]) == 0
        r = _result(out)
        assert r["center"] == pytest.approx(final, rel=rel) and "trained 20 epochs on digits" in r["net"]
        assert r["grad_norm"] > 0 and r["num_params"] == 2 * 2 * 16
    # the loss is the one train minimised: at the initial weights it is the history's first loss
    assert main(TRAIN + ["--epochs", "0", "--save-weights", "--out", str(tmp_path / "init.json")]) == 0
    first = json.loads((tmp_path / "init.json").read_text())["history"]["loss"][0]
    assert main(["landscape", "--weights", str(tmp_path / "init.weights.pt"), "--points", "3", "--no-progress",
                 "--out", str(tmp_path / "i")]) == 0
    assert _result(tmp_path / "i")["center"] == pytest.approx(first, rel=1e-12)


def test_train_writes_no_weights_unless_asked(tmp_path, capsys):
    assert main(TRAIN + ["--epochs", "2", "--out", str(tmp_path / "run.json")]) == 0
    assert not (tmp_path / "run.weights.pt").exists() and ".weights.pt" not in capsys.readouterr().out


def test_a_checkpoint_belongs_to_the_weights_not_to_their_file_name(tmp_path, capsys):
    run, out = tmp_path / "run.json", tmp_path / "o"
    args = ["landscape", "--weights", str(tmp_path / "run.weights.pt"), "--points", "3", "--no-progress",
            "--out", str(out)]
    assert main(TRAIN + ["--epochs", "5", "--save-weights", "--out", str(run)]) == 0
    assert main(args) == 0
    a = _result(out)
    assert main(TRAIN + ["--epochs", "15", "--save-weights", "--out", str(run)]) == 0  # retrained into the same file
    capsys.readouterr()
    assert main(args) == 0
    assert "is of other options" in capsys.readouterr().out
    b = _result(out)
    assert b["resumed_rows"] == 0 and b["center"] == pytest.approx(json.loads(run.read_text())["final_loss"], rel=1e-9)
    assert b["center"] != a["center"]
    import shutil

    shutil.copy(tmp_path / "run.weights.pt", tmp_path / "moved.pt")  # the same weights under another name
    args[2] = str(tmp_path / "moved.pt")
    capsys.readouterr()
    assert main(args) == 0
    assert "other options" not in capsys.readouterr().out and _result(out)["resumed_rows"] == 3


def test_bad_weights_files_are_refused_with_what_is_wrong(tmp_path):
    from shortcut_ext.experiments.train_cmd import WEIGHTS_KIND

    run = tmp_path / "run.json"
    assert main(TRAIN + ["--epochs", "2", "--save-weights", "--out", str(run)]) == 0
    w = tmp_path / "run.weights.pt"
    blob = torch.load(w, weights_only=True)

    def refused(path, *extra):
        with pytest.raises(SystemExit) as e:
            main(["landscape", "--weights", str(path), "--no-progress", *extra, "--out", str(tmp_path / "o")])
        assert e.value.code == 2 and str(e.value).startswith(f"shortcut-ext landscape: ")
        return str(e.value)

    assert "--units, --seed have no effect with --weights" in refused(w, "--units", "3", "--seed", "4")
    assert "--data has no effect with --weights" in refused(w, "--data", "digits")
    assert "no such file" in refused(tmp_path / "none.pt")
    msg = refused(run)
    assert "torch.load cannot read it" in msg and f"the weights of the run {run} are in {w}" in msg
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert f"expected a dict with kind {WEIGHTS_KIND!r}, got Tensor" in refused(tmp_path / "tensor.pt")
    cases = {
        "format": ({**blob, "format": 99}, "written in format 99, this version reads 1"),
        "lacks": ({k: v for k, v in blob.items() if k != "net"}, "damaged, it lacks 'net'"),
        "data": ({**blob, "data": {**blob["data"], "tag": "digits(d=4,m=39,seed=0)"}},
                 "the data differ from those the run trained on"),
        "shape": ({**blob, "state_dict": {"weight": torch.zeros(1, 2, 4, 4, dtype=torch.float64)}},
                  "its weights do not fit the net it names"),
    }
    for name, (b, words) in cases.items():
        torch.save(b, tmp_path / f"{name}.pt")
        assert words in refused(tmp_path / f"{name}.pt"), name


def test_mini_batches_give_the_full_data_landscape(tmp_path):
    args = TINY + ["--init", "small", "--scale", "0.4", "--mid", "relu", "--points", "4", "--plane"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--batch-size", "7", "--out", str(tmp_path / "b")]) == 0
    a, b = _result(tmp_path / "a"), _result(tmp_path / "b")
    np.testing.assert_allclose(np.array(b["loss"]), np.array(a["loss"]), rtol=1e-12)
    np.testing.assert_allclose(np.array(b["curvature"]), np.array(a["curvature"]), rtol=1e-10, atol=1e-14)


def _train_stopping(epoch: int, saved: bool = True):
    """``train_cmd.train`` that raises KeyboardInterrupt at epoch ``epoch``'s update hook: after that epoch's
    weights along training were saved (``saved``) or before."""
    from shortcut_ext.experiments import train_cmd

    real = train_cmd.train

    def train(*a, on_update=None, **k):
        def stop(e):
            if saved:
                on_update(e)
            if e == epoch:
                raise KeyboardInterrupt
            if not saved:
                on_update(e)
        return real(*a, on_update=stop, **k)
    return train


def test_weights_along_training_are_the_uninterrupted_runs_after_a_resume(tmp_path, monkeypatch, capsys):
    """--save-weights-every: epoch 0 and every N epochs in run.weights/, each the weights after that many epochs
    (the last one is the final weights); a run interrupted and resumed keeps the same files, bit for bit; a
    landscape of one of them says which epoch it is."""
    from shortcut_ext.experiments import train_cmd

    def snaps(d):
        return {f.name: torch.load(f, weights_only=True) for f in sorted((d / "run.weights").glob("*.pt"))}

    args = TRAIN + ["--epochs", "6", "--save-weights-every", "2", "--checkpoint-every", "1", "--checkpoint-seconds",
                    "0"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(args + ["--out", str(whole / "run.json")]) == 0
    a = snaps(whole)
    assert sorted(a) == [f"epoch_{e:06d}.pt" for e in (0, 2, 4, 6)] and [b["epoch"] for b in a.values()] == [0, 2, 4, 6]
    final = torch.load(whole / "run.weights.pt", weights_only=True)
    assert torch.equal(final["state_dict"]["weight"], a["epoch_000006.pt"]["state_dict"]["weight"])
    assert final["loss"] == json.loads((whole / "run.json").read_text())["final_loss"]
    assert not torch.equal(a["epoch_000000.pt"]["state_dict"]["weight"], a["epoch_000002.pt"]["state_dict"]["weight"])

    real = train_cmd.train

    monkeypatch.setattr(train_cmd, "train", _train_stopping(3))
    assert main(args + ["--out", str(part / "run.json")]) == 130
    assert sorted(snaps(part)) == ["epoch_000000.pt", "epoch_000002.pt", "epoch_000004.pt"]
    monkeypatch.setattr(train_cmd, "train", real)
    assert main(args + ["--out", str(part / "run.json")]) == 0
    assert "resuming from epoch 3 of 6" in capsys.readouterr().out  # epoch 4's checkpoint follows its weights
    b = snaps(part)
    assert sorted(b) == sorted(a)
    assert all(torch.equal(a[k]["state_dict"]["weight"], b[k]["state_dict"]["weight"]) for k in a)
    # stopped after an epoch's update but before its weights were saved: the checkpoint of that epoch is not
    # written either (it once was, and the resumed run never wrote the epoch's weights: a file short, unsaid)
    cut = tmp_path / "cut"
    monkeypatch.setattr(train_cmd, "train", _train_stopping(3, saved=False))
    assert main(args + ["--out", str(cut / "run.json")]) == 130
    assert sorted(snaps(cut)) == ["epoch_000000.pt", "epoch_000002.pt"]
    monkeypatch.setattr(train_cmd, "train", real)
    capsys.readouterr()
    assert main(args + ["--out", str(cut / "run.json")]) == 0
    said = capsys.readouterr().out
    assert "resuming from epoch 3 of 6" in said and "missing" not in said
    c = snaps(cut)
    assert sorted(c) == sorted(a) and all(torch.equal(a[k]["state_dict"]["weight"], c[k]["state_dict"]["weight"])
                                          for k in a)
    out = tmp_path / "land"
    assert main(["landscape", "--weights", str(whole / "run.weights" / "epoch_000002.pt"), "--points", "3",
                 "--no-progress", "--out", str(out)]) == 0
    assert "after epoch 2 of 6 on digits" in _result(out)["net"]
    # a fresh run of other options into the same --out leaves only its own weights along training
    capsys.readouterr()
    assert main(TRAIN + ["--epochs", "2", "--lr", "0.2", "--save-weights-every", "2",
                         "--out", str(whole / "run.json")]) == 0
    assert "note: removed 4 files of weights along training" in capsys.readouterr().out
    c = snaps(whole)
    assert sorted(c) == ["epoch_000000.pt", "epoch_000002.pt"] and len({b["run"] for b in c.values()}) == 1
    assert c["epoch_000000.pt"]["run"] != a["epoch_000000.pt"]["run"] is not None


def test_weights_along_training_lost_while_stopped_are_named_on_resume(tmp_path, monkeypatch, capsys):
    """A file of weights along training that was damaged or removed while the run was stopped cannot be rewritten
    by the resumed run (the weights of past epochs are not kept): the damaged one is removed with a note that says
    so (not "another run's"), the run ends with a warning that names what is missing, and a killed writer's
    temporary is removed; a rerun of the finished command starts afresh and writes the full set."""
    from shortcut_ext.experiments import train_cmd

    args = TRAIN + ["--epochs", "6", "--save-weights-every", "2", "--checkpoint-every", "1", "--checkpoint-seconds",
                    "0", "--out", str(tmp_path / "run.json")]
    real = train_cmd.train
    monkeypatch.setattr(train_cmd, "train", _train_stopping(4))
    assert main(args) == 130
    monkeypatch.setattr(train_cmd, "train", real)
    snaps = tmp_path / "run.weights"
    (snaps / "epoch_000002.pt").write_bytes((snaps / "epoch_000002.pt").read_bytes()[:100])  # damaged
    dead = 4194304 + 12345  # above any Linux pid_max: no such process
    stale = snaps / f"epoch_000004.pt.{dead}-1.tmp"
    stale.write_bytes(b"half a file")
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "resuming from epoch 4 of 6" in said
    assert "removed 1 file of weights along training" in said and "that cannot be read (epoch_000002.pt)" in said
    assert "another run" not in said
    assert "warning: 1 file of the weights along training is missing" in said and "epoch_000002.pt" in said
    assert not stale.exists()
    assert sorted(f.name for f in snaps.iterdir()) == ["epoch_000000.pt", "epoch_000004.pt", "epoch_000006.pt"]
    assert main(args) == 0  # finished: the checkpoint is gone, so this run is fresh and complete
    said = capsys.readouterr().out
    assert "resuming" not in said and "missing" not in said
    assert sorted(f.name for f in snaps.iterdir()) == [f"epoch_{e:06d}.pt" for e in (0, 2, 4, 6)]


def _snapshots(folder, net):
    """The weights files of a folder as ``{epoch: [R, n, d, d] float64}``."""
    out = {}
    for f in sorted(folder.glob("epoch_*.pt")):
        b = torch.load(f, weights_only=True)
        out[b["epoch"]] = net.stack_weights(b["state_dict"]["weight"]).double()
    return out


def test_the_plane_of_the_training_path(tmp_path, capsys):
    """--directions pca: the plane of the path's principal directions through the final weights, the API's
    path_directions of the snapshot files; each point of the path at its own loss, which is the loss train
    recorded at that epoch; the grid spans the path; the path's CSV."""
    from shortcut_ext.experiments.train_cmd import load_weights

    run = tmp_path / "run.json"
    assert main(TRAIN + ["--epochs", "9", "--save-weights-every", "2", "--out", str(run)]) == 0
    hist = json.loads(run.read_text())["history"]["loss"]
    out = tmp_path / "o"
    assert main(["landscape", "--weights", str(tmp_path / "run.weights.pt"), "--directions", "pca", "--plane",
                 "--points", "5", "--no-progress", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "the training path (6 points, epochs 0..9): its principal directions explain" in said
    r = _result(out)
    net, bundle, _ = load_weights(tmp_path / "run.weights.pt")
    snaps = _snapshots(tmp_path / "run.weights", net)
    assert sorted(snaps) == [0, 2, 4, 6, 8]  # and the final weights, of epoch 9
    assert [p["epoch"] for p in r["path"]] == [0, 2, 4, 6, 8, 9]
    op = HessianOperator(net, (bundle.X, bundle.Y), "mse", backend="fused")
    pp = landscape.path_directions(op, [snaps[e] for e in (0, 2, 4, 6, 8)] + [op._W])
    assert np.array_equal(np.array([p["coords"] for p in r["path"]]), pp.coords)
    assert r["explained_variance"] == pp.explained.tolist() and sum(r["explained_variance"]) <= 1 + 1e-12
    # each point's own loss: train's loss at that epoch (the loss before the epoch's update), the final one last
    np.testing.assert_allclose([p["loss"] for p in r["path"][:-1]], [hist[e] for e in (0, 2, 4, 6, 8)], rtol=1e-12)
    assert r["path"][-1]["loss"] == r["center"] and r["path"][-1]["coords"] == [0.0, 0.0]
    # the grid: losses_at on the plane, reaching a little beyond the path along each direction
    for j, grid in enumerate((r["ts"], r["ss"])):
        reach = np.abs(pp.coords[:, j]).max()
        assert 1.2 * reach <= grid[-1] <= 1.2 * reach * 1.1 and grid[0] == -grid[-1]
    pts = np.array([[t, s] for t in r["ts"] for s in r["ss"]])
    assert np.array_equal(np.array(r["loss"]).ravel(), losses_at(op, pp.directions, pts))
    rows = list(csv.DictReader(open(out / "landscape.path.csv")))
    assert [int(x["epoch"]) for x in rows] == [0, 2, 4, 6, 8, 9]
    assert [float(x["loss"]) for x in rows] == [p["loss"] for p in r["path"]]
    assert (out / "landscape.png").stat().st_size > 1000
    # on a line: the first principal direction; around a snapshot inside the path, its folder is the path
    assert main(["landscape", "--weights", str(tmp_path / "run.weights" / "epoch_000004.pt"), "--directions", "pca",
                 "--points", "3", "--span", "0.5", "--no-progress", "--out", str(tmp_path / "mid")]) == 0
    m = _result(tmp_path / "mid")
    assert [p["epoch"] for p in m["path"]] == [0, 2, 4, 6, 8] and m["path"][2]["coords"] == [0.0]
    assert m["ts"] == [-0.5, 0.0, 0.5] and len(m["explained_variance"]) == 1
    assert m["center"] == pytest.approx(hist[4], rel=1e-12)
    # a float32 run's path, analysed in float64: the snapshots are exact in float64, the losses train's to rounding
    run32 = tmp_path / "f32.json"
    assert main(TRAIN + ["--epochs", "4", "--dtype", "float32", "--save-weights-every", "1", "--out", str(run32)]) == 0
    h32 = json.loads(run32.read_text())["history"]["loss"]
    assert main(["landscape", "--weights", str(tmp_path / "f32.weights.pt"), "--directions", "pca", "--plane",
                 "--points", "3", "--no-progress", "--out", str(tmp_path / "o32")]) == 0
    r32 = _result(tmp_path / "o32")
    np.testing.assert_allclose([p["loss"] for p in r32["path"][:-1]], h32[:4], rtol=1e-6)
    assert [p["epoch"] for p in r32["path"]] == [0, 1, 2, 3, 4] and r32["path"][-1]["coords"] == [0.0, 0.0]


def test_the_line_from_the_initial_to_the_trained_weights(tmp_path, capsys):
    """--directions init: t = 1 is the run's initial weights (the loss train began at), t = 0 the trained ones;
    the summary says whether the loss falls all the way; in float32 the init is the run's float32 init."""
    for dtype in ("float64", "float32"):
        run = tmp_path / f"{dtype}.json"
        assert main(TRAIN + ["--epochs", "12", "--dtype", dtype, "--save-weights", "--out", str(run)]) == 0
        rec = json.loads(run.read_text())
        out = tmp_path / f"i{dtype}"
        assert main(["landscape", "--weights", str(tmp_path / f"{dtype}.weights.pt"), "--directions", "init",
                     "--points", "9", "--span", "1", "--no-progress", "--out", str(out)]) == 0
        r = _result(out)
        rel = 1e-12 if dtype == "float64" else 1e-6
        assert [p["epoch"] for p in r["path"]] == [0, 12] and r["path"][0]["coords"] == [1.0]
        assert r["path"][0]["loss"] == pytest.approx(rec["history"]["loss"][0], rel=rel)
        assert r["loss"][-1] == pytest.approx(r["path"][0]["loss"], rel=1e-12)  # the grid's t = 1: the init again
        assert r["center"] == pytest.approx(rec["final_loss"], rel=rel) and r["loss"][4] == r["center"]
        between = [v for t, v in zip(r["ts"], r["loss"]) if 0 < t < 1]
        seq = [r["path"][0]["loss"]] + between[::-1] + [r["center"]]
        it = r["interpolation"]
        assert it["grid_points_between"] == 3 and it["monotonic"] == all(b <= a for a, b in zip(seq, seq[1:]))
        assert it["max_rise"] == max([0.0] + [b - a for a, b in zip(seq, seq[1:])])
        said = capsys.readouterr().out
        assert "L at the initial weights (t = 1) = " in said and ("falls monotonically" in said) == it["monotonic"]
    # the default grid runs from -0.5 to 1.5 in 41 steps: both ends of the line lie on it, 19 points between
    out = tmp_path / "idefault"
    assert main(["landscape", "--weights", str(tmp_path / "float64.weights.pt"), "--directions", "init",
                 "--no-progress", "--out", str(out)]) == 0
    r = _result(out)
    assert r["ts"] == np.linspace(-0.5, 1.5, 41).tolist() and r["ts"][10] == 0.0 and r["ts"][30] == 1.0
    assert r["loss"][10] == r["center"] and r["loss"][30] == pytest.approx(r["path"][0]["loss"], rel=1e-12)
    assert r["interpolation"]["grid_points_between"] == 19
    # a path that rises on the way: the summary says by how much (a made-up grid, through the helper)
    it = landscape_cmd._interpolation(np.array([0.0, 0.25, 0.5, 0.75, 1.0]), np.array([1, 1.5, 3.0, 2.5, 9]), 2.0,
                                      1.0)
    assert it == {"monotonic": False, "max_rise": 0.5, "barrier": 1.0, "grid_points_between": 3}


def test_a_training_path_resumes_and_follows_its_snapshots(tmp_path, monkeypatch, capsys):
    """A pca landscape interrupted mid-grid resumes to the same numbers; other snapshots (the run trained
    again) start afresh."""
    run = tmp_path / "run.json"
    assert main(TRAIN + ["--epochs", "6", "--save-weights-every", "1", "--out", str(run)]) == 0
    args = ["landscape", "--weights", str(tmp_path / "run.weights.pt"), "--directions", "pca", "--plane",
            "--points", "4", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    real, calls = landscape.losses_at, []

    def stop_after_two(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(landscape, "losses_at", stop_after_two)
    assert main(args + ["--out", str(tmp_path / "part")]) == 130
    monkeypatch.setattr(landscape, "losses_at", real)
    ck = tmp_path / "part" / landscape_cmd.CHECKPOINT
    keys = [json.loads(x)["key"].split("|")[1] for x in ck.read_text().splitlines()]
    assert keys == [f"path={e}" for e in range(6)] + ["row=0", "row=1"]  # epoch 6 is the centre's, not stored
    assert main(args + ["--out", str(tmp_path / "part")]) == 0
    a, b = _result(tmp_path / "whole"), _result(tmp_path / "part")
    assert b["resumed_rows"] == 2 and a["loss"] == b["loss"] and a["path"] == b["path"]
    # interrupted among the path's own losses: the finished ones are kept, each computed once
    real_loss, n = landscape._loss, []

    def stop_at_the_fourth_loss(*a_, **k):  # the centre's, two points of the path, then Ctrl-C
        n.append(1)
        if len(n) == 4:
            raise KeyboardInterrupt
        return real_loss(*a_, **k)

    monkeypatch.setattr(landscape, "_loss", stop_at_the_fourth_loss)
    assert main(args + ["--out", str(tmp_path / "p2")]) == 130
    ck2 = tmp_path / "p2" / landscape_cmd.CHECKPOINT
    assert [json.loads(x)["key"].split("|")[1] for x in ck2.read_text().splitlines()] == ["path=0", "path=1"]
    assert "interrupted; the finished rows of the grid (and points of a training path) are saved in" in \
        capsys.readouterr().err
    monkeypatch.setattr(landscape, "_loss", real_loss)
    assert main(args + ["--out", str(tmp_path / "p2")]) == 0
    keys = [json.loads(x)["key"].split("|")[1] for x in ck2.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 6 + 4 and _result(tmp_path / "p2") == {**a, **{
        k: _result(tmp_path / "p2")[k] for k in ("config", "timings_s", "environment")}}
    assert main(TRAIN + ["--epochs", "6", "--lr", "0.2", "--save-weights-every", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "part")]) == 0
    assert "is of other options" in capsys.readouterr().out and _result(tmp_path / "part")["path"] != a["path"]


def test_training_path_refusals_name_what_is_wrong(tmp_path):
    run = tmp_path / "run.json"
    assert main(TRAIN + ["--epochs", "4", "--save-weights-every", "2", "--out", str(run)]) == 0
    w = tmp_path / "run.weights.pt"

    def refused(*extra):
        with pytest.raises(SystemExit) as e:
            main(["landscape", *extra, "--no-progress", "--out", str(tmp_path / "o")])
        assert str(e.value).startswith("shortcut-ext landscape: ")
        return str(e.value)

    assert "--directions pca needs --weights" in refused("--directions", "pca")
    assert "--directions init needs --weights" in refused("--directions", "init")
    assert "--normalize has no effect with --directions pca" in refused("--weights", str(w), "--directions", "pca",
                                                                         "--normalize", "layer")
    assert "--direction-seed has no effect with --directions init" in refused("--weights", str(w), "--directions",
                                                                               "init", "--direction-seed", "3")
    assert "--directions init is one direction, a line" in refused("--weights", str(w), "--directions", "init",
                                                                   "--plane")
    assert "--trajectory has no effect with --directions random" in refused("--trajectory", str(tmp_path))
    # 0, 2 and 4 (the final weights): three points, a plane; two are a line only
    assert "at least k + 1 = 3 points" in refused("--weights", str(tmp_path / "run.weights" / "epoch_000002.pt"),
                                                  "--directions", "pca", "--plane",
                                                  "--trajectory", str(_only(tmp_path, "two", [0, 2])))
    assert main(TRAIN + ["--epochs", "4", "--save-weights", "--out", str(tmp_path / "alone.json")]) == 0
    msg = refused("--weights", str(tmp_path / "alone.weights.pt"), "--directions", "pca")
    assert "no folder of weights along training at" in msg and "--save-weights-every N" in msg
    (tmp_path / "empty").mkdir()
    assert "holds no epoch_NNNNNN.pt files" in refused("--weights", str(w), "--directions", "pca", "--trajectory",
                                                       str(tmp_path / "empty"))
    # a snapshot of another run: another seed (another net), or the same net trained otherwise at the same epoch
    assert main(TRAIN + ["--epochs", "4", "--seed", "1", "--save-weights-every", "2", "--out",
                         str(tmp_path / "s1.json")]) == 0
    mixed = _only(tmp_path, "mixed", [0, 2])
    import shutil

    shutil.copy(tmp_path / "s1.weights" / "epoch_000004.pt", mixed / "epoch_000004.pt")
    assert "is of another run than --weights" in refused("--weights", str(w), "--directions", "pca",
                                                         "--trajectory", str(mixed))
    assert main(TRAIN + ["--epochs", "4", "--lr", "0.1", "--save-weights-every", "2", "--out",
                         str(tmp_path / "lr.json")]) == 0
    shutil.copy(tmp_path / "lr.weights" / "epoch_000004.pt", mixed / "epoch_000004.pt")
    assert "is of another training run than --weights" in refused("--weights", str(w), "--directions", "pca",
                                                                  "--trajectory", str(mixed))
    blob = torch.load(mixed / "epoch_000004.pt", weights_only=True)
    torch.save({**blob, "run": None}, mixed / "epoch_000004.pt")  # no run id (as an older version wrote them)
    assert "the weights of epoch 4 in" in refused("--weights", str(w), "--directions", "pca", "--trajectory",
                                                  str(mixed))
    assert main(TRAIN + ["--epochs", "0", "--save-weights", "--out", str(tmp_path / "e0.json")]) == 0
    assert "are the run's initial weights (epoch 0)" in refused("--weights", str(tmp_path / "e0.weights.pt"),
                                                                 "--directions", "init")
    (mixed / "epoch_000004.pt").write_bytes(b"not a weights file")
    assert "cannot be read" in refused("--weights", str(w), "--directions", "pca", "--trajectory", str(mixed))


def _only(tmp_path, name, epochs):
    """A folder with the run's snapshots of these epochs only."""
    import shutil

    d = tmp_path / name
    d.mkdir()
    for e in epochs:
        shutil.copy(tmp_path / "run.weights" / f"epoch_{e:06d}.pt", d / f"epoch_{e:06d}.pt")
    return d


def test_the_plane_of_the_hessians_extreme_eigenvectors(tmp_path, capsys):
    """--directions hessian: the eigenvectors of the dense Hessian's largest and smallest eigenvalues (up to
    sign, and their eigenvalues), so the quadratic model's curvature is diag(lambda max, lambda min); at a
    2-shortcut zero point a saddle with lambda min = -lambda max; a zero Hessian (3-shortcut) is refused."""
    out = tmp_path / "o"
    extra = ["--init", "small", "--scale", "0.4", "--mid", "tanh", "--points", "5", "--span", "0.3"]
    assert main(TINY + extra + ["--directions", "hessian", "--plane", "--out", str(out)]) == 0
    r = _result(out)
    X, Y = load_data("synthetic", 24, 3, 0, 0.1, torch.float64)
    net = ShortcutNet(3, 5, 2, "identity", "tanh", "identity", init="small", scale=0.4, seed=0, dtype=torch.float64)
    op = HessianOperator(net, (X, Y), "mse", backend="fused")
    lam, U = torch.linalg.eigh(op.to_dense())
    assert r["eigen"]["eigenvalues"] == pytest.approx([float(lam[-1]), float(lam[0])], rel=1e-9)
    assert r["eigen"]["converged"] and "lambda min = " in capsys.readouterr().out
    np.testing.assert_allclose(np.array(r["curvature"]), np.diag(r["eigen"]["eigenvalues"]), rtol=1e-8, atol=1e-9)
    V = torch.stack([U[:, -1], U[:, 0]], dim=1)
    V = V * torch.sign(V.gather(0, V.abs().argmax(dim=0, keepdim=True)))  # the command's sign: largest entry > 0
    pts = np.array([[t, s] for t in r["ts"] for s in r["ss"]])
    np.testing.assert_allclose(np.array(r["loss"]).ravel(), losses_at(op, V, pts), rtol=1e-9)
    # a line: the top eigenvector alone
    assert main(TINY + extra + ["--directions", "hessian", "--out", str(tmp_path / "line")]) == 0
    line = _result(tmp_path / "line")
    assert line["eigen"]["eigenvalues"] == pytest.approx([float(lam[-1])], rel=1e-9)
    np.testing.assert_allclose(line["loss"], np.array(r["loss"])[:, 2], rtol=1e-9)
    # the 2-shortcut zero point: a saddle, its spectrum symmetric
    z = tmp_path / "z"
    assert main(TINY + ["--init", "zero", "--directions", "hessian", "--plane", "--points", "3", "--span", "0.2",
                        "--out", str(z)]) == 0
    rz = _result(z)
    top, bottom = rz["eigen"]["eigenvalues"]
    assert top > 0 and bottom == pytest.approx(-top, rel=1e-8)
    L = np.array(rz["loss"])
    assert L[0, 1] > rz["center"] and L[2, 1] > rz["center"] and L[1, 0] < rz["center"] and L[1, 2] < rz["center"]
    with pytest.raises(SystemExit, match="the Hessian is 0 at these weights"):
        main(TINY + ["--shortcut", "3", "--init", "zero", "--directions", "hessian", "--out", str(tmp_path / "3")])
    with pytest.raises(SystemExit, match="--normalize has no effect with --directions hessian"):
        main(TINY + ["--init", "small", "--directions", "hessian", "--normalize", "layer", "--out", str(tmp_path / "n")])


def test_the_eigenvectors_of_the_hessians_parts(tmp_path, capsys):
    """--directions hessian --matrix ggn | functional | empirical_fisher: the two largest eigenvectors of G or of the
    empirical Fisher (positive semi-definite: their smallest are a null space) or the extreme ones of F = H - G (the dense references', up to sign), while the grid's quadratic model stays the Hessian's (u^T H v on those directions);
    a zero G (the 2-shortcut zero point) is refused, naming --matrix hessian; the default keeps the fingerprint of
    earlier versions."""
    from shortcut_ext.curvature import dense_empirical_fisher_func, dense_ggn_func, dense_hessian_func

    extra = ["--init", "small", "--scale", "0.4", "--mid", "tanh", "--points", "5", "--span", "0.3", "--plane",
             "--directions", "hessian"]
    X, Y = load_data("synthetic", 24, 3, 0, 0.1, torch.float64)
    net = ShortcutNet(3, 5, 2, "identity", "tanh", "identity", init="small", scale=0.4, seed=0, dtype=torch.float64)
    H, G = dense_hessian_func(net, (X, Y)), dense_ggn_func(net, (X, Y))
    for m, D in (("ggn", G), ("functional", H - G), ("empirical_fisher", dense_empirical_fisher_func(net, (X, Y)))):
        out = tmp_path / m
        assert main(TINY + extra + ["--matrix", m, "--out", str(out)]) == 0
        r = _result(out)
        lam, U = torch.linalg.eigh(D)
        j = 0 if m == "functional" else -2  # G is positive semi-definite: its plane is its two largest eigenvectors'
        assert r["eigen"]["matrix"] == m
        assert r["eigen"]["eigenvalues"] == pytest.approx([float(lam[-1]), float(lam[j])], rel=1e-7, abs=1e-9)
        V = torch.stack([U[:, -1], U[:, j]], dim=1)
        V = V * torch.sign(V.gather(0, V.abs().argmax(dim=0, keepdim=True)))
        np.testing.assert_allclose(np.array(r["curvature"]), (V.T @ H @ V).numpy(), rtol=1e-6, atol=1e-8)
        words = {"ggn": "Gauss-Newton part's", "functional": "functional part's (H - G)",
                 "empirical_fisher": "empirical Fisher's"}[m]
        assert f"the directions are the {words} eigenvectors" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"the Gauss-Newton part is 0 at these weights .*use --matrix hessian"):
        main(TINY + ["--init", "zero", "--directions", "hessian", "--matrix", "ggn", "--out", str(tmp_path / "z")])
    with pytest.raises(SystemExit, match=r"the empirical Fisher is 0 at these weights .*use --matrix hessian"):
        main(TINY + ["--init", "zero", "--directions", "hessian", "--matrix", "empirical_fisher", "--out",
                     str(tmp_path / "z")])
    from shortcut_ext.cli import build_parser
    from shortcut_ext.curvature import landscape_cmd

    a = build_parser().parse_args(TINY + ["--directions", "hessian", "--out", "x"])
    delattr(a, "matrix")  # as parsed by a version before --matrix
    assert landscape_cmd._fingerprint(build_parser().parse_args(TINY + ["--directions", "hessian", "--out", "x"])) \
        == landscape_cmd._fingerprint(a)


def test_the_line_between_two_trained_nets(tmp_path, capsys):
    """--directions between: t = 0 is --weights, t = 1 --other (its own final loss); the barrier is how far the
    loss on the grid between them rises above the higher end.  Nets from other seeds need no frozen projections
    (at the data's width); other nets, data or projections, the same weights, and misplaced flags are refused."""
    def run(name, *extra):
        assert main(TRAIN + ["--epochs", "15", "--save-weights", *extra, "--out", str(tmp_path / f"{name}.json")]) == 0
        return tmp_path / f"{name}.weights.pt", json.loads((tmp_path / f"{name}.json").read_text())["final_loss"]

    a, la = run("a")
    b, lb = run("b", "--lr", "0.1")
    out = tmp_path / "ab"
    assert main(["landscape", "--weights", str(a), "--directions", "between", "--other", str(b), "--points", "9",
                 "--span", "1", "--no-progress", "--out", str(out)]) == 0
    r = _result(out)
    assert r["center"] == pytest.approx(la, rel=1e-12) and r["path"][0]["loss"] == pytest.approx(lb, rel=1e-12)
    assert r["path"][0]["coords"] == [1.0] and r["path"][0]["epoch"] == 15 and r["other"] == str(b)
    assert r["loss"][-1] == pytest.approx(lb, rel=1e-9) and r["loss"][4] == r["center"]
    seq = [r["path"][0]["loss"]] + r["loss"][5:8][::-1] + [r["center"]]
    assert r["interpolation"]["barrier"] == max(0.0, max(seq) - max(seq[0], seq[-1]))
    assert "L at --other (t = 1) = " in capsys.readouterr().out
    # two seeds at the data's width (10 digits components, 10 classes): no frozen projections, a line between them
    w10 = ["--width", "10", "--epochs", "10"]
    s0, _ = run("s0", *w10)
    s1, l1 = run("s1", *w10, "--seed", "1")
    assert main(["landscape", "--weights", str(s0), "--directions", "between", "--other", str(s1), "--points", "3",
                 "--span", "1", "--no-progress", "--out", str(tmp_path / "seeds")]) == 0
    assert _result(tmp_path / "seeds")["path"][0]["loss"] == pytest.approx(l1, rel=1e-12)

    def refused(*extra):
        with pytest.raises(SystemExit) as e:
            main(["landscape", *extra, "--no-progress", "--out", str(tmp_path / "x")])
        return str(e.value)

    c, _ = run("c", "--seed", "1")  # width 4: a frozen read-out drawn from seed 1
    assert "its frozen projections (readout) differ" in refused("--weights", str(a), "--directions", "between",
                                                                "--other", str(c))
    d, _ = run("d", "--depth", "6")
    assert "is of another net or data than --weights" in refused("--weights", str(a), "--directions", "between",
                                                                 "--other", str(d))
    assert "holds the same weights as --weights" in refused("--weights", str(a), "--directions", "between",
                                                            "--other", str(a))
    assert "--directions between needs --other FILE" in refused("--weights", str(a), "--directions", "between")
    assert "--other has no effect with --directions init" in refused("--weights", str(a), "--directions", "init",
                                                                     "--other", str(b))
    assert "--directions between is one direction, a line" in refused("--weights", str(a), "--directions",
                                                                      "between", "--other", str(b), "--plane")
    assert ", or --curve STEPS for the plane of a curve" in refused("--weights", str(a), "--directions", "between",
                                                                    "--other", str(b), "--plane")
    assert "--directions between needs --weights" in refused("--directions", "between", "--other", str(b))


@pytest.mark.parametrize("arch", ["2-shortcut", "3-shortcut", "plain-xavier"])
def test_the_line_between_two_seeds_after_weight_matching(tmp_path, capsys, arch):
    """--align: --other's hidden units are permuted to match --weights' (align_hidden_units on the two files'
    weights) before the line is drawn. --other's own loss does not change (its function is the same), the
    line is shorter by the distance the alignment reports, and the summary says so."""
    from shortcut_ext.curvature import align_hidden_units
    from shortcut_ext.experiments.train_cmd import load_weights

    base = ["train", "--arch", arch, "--act", "tanh-mid", "--depth", "6" if arch == "3-shortcut" else "4",
            "--width", "10", "--samples", "40", "--lr", "0.3", "--epochs", "10", "--save-weights", "--no-progress"]
    files = []
    for seed in ("0", "1"):
        assert main(base + ["--seed", seed, "--out", str(tmp_path / f"s{seed}.json")]) == 0
        files.append(str(tmp_path / f"s{seed}.weights.pt"))
    line = ["landscape", "--weights", files[0], "--directions", "between", "--other", files[1], "--points", "5",
            "--no-progress", "--no-plots"]
    assert main(line + ["--out", str(tmp_path / "plain")]) == 0
    assert main(line + ["--align", "--out", str(tmp_path / "aligned")]) == 0
    said = capsys.readouterr().out
    u, a = _result(tmp_path / "plain"), _result(tmp_path / "aligned")
    assert "alignment" not in u and a["config"]["align"] is True
    assert a["path"][0]["loss"] == pytest.approx(u["path"][0]["loss"], rel=1e-12)  # the same function at t = 1
    assert a["center"] == u["center"] and a["loss"][1] == a["center"]  # t = 0 (grid -0.5, 0, 0.5, 1, 1.5)
    assert a["loss"][3] == pytest.approx(a["path"][0]["loss"], rel=1e-9)
    al = a["alignment"]
    nets = [load_weights(f, "test")[0] for f in files]
    want = align_hidden_units(nets[0].stack_weights().detach(), nets[1].stack_weights().detach())
    assert al["distance_before"] == pytest.approx(u["direction_norms"][0], rel=1e-12)
    assert al["distance_after"] == pytest.approx(a["direction_norms"][0], rel=1e-12)
    assert al["distance_after"] == pytest.approx(want.distance_after, rel=1e-12) and al["converged"]
    assert al["distance_after"] < al["distance_before"] and al["moved_units"] >= 1
    assert f"hidden units aligned to --weights' (weight matching: distance {al['distance_before']:.4g} -> " in said
    with pytest.raises(SystemExit, match="--align has no effect with --directions init"):
        main(["landscape", "--weights", files[0], "--directions", "init", "--align", "--out", str(tmp_path / "x")])


def _two_seeds(tmp_path, epochs="10"):
    base = ["train", "--arch", "2-shortcut", "--act", "tanh-mid", "--depth", "4", "--width", "10", "--samples", "40",
            "--lr", "0.3", "--epochs", epochs, "--save-weights", "--no-progress"]
    for seed in ("0", "1"):
        assert main(base + ["--seed", seed, "--out", str(tmp_path / f"s{seed}.json")]) == 0
    return [str(tmp_path / f"s{seed}.weights.pt") for seed in ("0", "1")]


def test_a_bezier_curve_between_two_seeds(tmp_path, capsys):
    """--curve STEPS: the control point of fit_bezier_curve (the run's own learning rate, saved in --out), the
    loss at 21 points of the curve (its ends: the two nets' losses), its barrier, and the CSV; a rerun takes the
    saved control point and computes no step again."""
    from shortcut_ext.curvature import HessianOperator, bezier_point, fit_bezier_curve
    from shortcut_ext.curvature.landscape import _loss
    from shortcut_ext.experiments.train_cmd import load_weights

    files = _two_seeds(tmp_path)
    out = tmp_path / "c"
    line = ["landscape", "--weights", files[0], "--directions", "between", "--other", files[1], "--points", "5",
            "--no-progress", "--curve", "30", "--out", str(out)]
    assert main(line) == 0
    said = capsys.readouterr().out
    r = _result(out)
    c = r["curve"]
    assert r["timings_s"]["curve"] > 0 and c["steps"] == 30 and c["lr"] == 0.3 and c["samples_per_step"] == 4 and c["resumed_steps"] == 0
    assert c["ts"] == np.linspace(0, 1, 21).tolist() and len(c["objective"]) == 30
    assert c["objective"][-1] < c["objective"][0] and c["bend_offset"] > 0
    assert c["loss"][0] == r["center"] and c["loss"][-1] == pytest.approx(r["path"][0]["loss"], rel=1e-12)
    assert c["barrier"] == max(0.0, max(c["loss"]) - max(c["loss"][0], c["loss"][-1]))
    assert "along a Bezier curve fitted in 30 steps it " in said
    # the API on the same net, data and ends gives the same control point and losses, bit for bit
    net, bundle, _ = load_weights(files[0], "test")
    other = load_weights(files[1], "test")[0].stack_weights().detach()
    op = HessianOperator(net, (bundle.X, bundle.Y), "mse")
    fit = fit_bezier_curve(op, op._W, other, steps=30, lr=0.3, samples=4)
    assert fit.objective == c["objective"]
    assert [_loss(op, bezier_point(op._W, fit.bend, other, float(t))) for t in c["ts"]] == c["loss"]
    rows = list(csv.DictReader(open(out / "landscape.curve.csv")))
    assert [float(x["loss"]) for x in rows] == c["loss"]
    # --plane: the plane of the two nets and the control point, with the curve in it
    assert main(line[:-2] + ["--plane", "--no-plots", "--out", str(tmp_path / "p")]) == 0
    p = _result(tmp_path / "p")
    pc = p["curve"]
    assert pc["loss"] == c["loss"] and pc["coords"][0] == [0.0, 0.0] and pc["coords"][-1] == [1.0, 0.0]
    a = pc["bend_coords"][0]
    assert pc["bend_coords"][1] == 1.0 and pc["coords"][10] == pytest.approx([0.5 * a + 0.25, 0.5], rel=1e-15)
    u = other - op._W
    b = fit.bend - op._W
    V = torch.stack([u.reshape(-1), (b - (b * u).sum() / (u * u).sum() * u).reshape(-1)], dim=1)
    assert float((b * u).sum() / (u * u).sum()) == pytest.approx(a, rel=1e-12)
    from shortcut_ext.curvature import losses_at
    np.testing.assert_allclose(losses_at(op, V, np.array(pc["coords"])), pc["loss"], rtol=1e-10)
    grid = np.array(p["loss"])  # t and s: -0.5, 0, 0.5, 1, 1.5; the line is the row s = 0
    assert grid.shape == (5, 5) and grid[1, 1] == p["center"]
    assert grid[3, 1] == pytest.approx(p["path"][0]["loss"], rel=1e-9) and p["path"][0]["coords"] == [1.0, 0.0]
    assert p["interpolation"]["grid_points_between"] == 1
    # a rerun (the checkpoint gone) takes the saved control point
    (out / landscape_cmd.CHECKPOINT).unlink()
    assert main(line) == 0
    assert "the curve's control point after 30 of 30 steps is the one saved in" in capsys.readouterr().out
    again = _result(out)["curve"]
    assert again["loss"] == c["loss"] and again["resumed_steps"] == 30 and again["objective"] == c["objective"]


def test_an_interrupted_curve_goes_on_to_the_same_numbers(tmp_path, monkeypatch, capsys):
    from shortcut_ext.curvature import landscape

    files = _two_seeds(tmp_path)
    line = ["landscape", "--weights", files[0], "--directions", "between", "--other", files[1], "--points", "3",
            "--no-progress", "--no-plots", "--curve", "12", "--curve-lr", "0.2"]
    assert main(line + ["--out", str(tmp_path / "whole")]) == 0
    real = landscape.fit_bezier_curve

    def stopped(*a, callback=None, **k):
        def cb(step, *rest):
            callback(step, *rest)
            if step == 5:
                raise KeyboardInterrupt
        return real(*a, callback=cb, **k)

    monkeypatch.setattr(landscape, "fit_bezier_curve", stopped)
    assert main(line + ["--out", str(tmp_path / "part")]) == 130
    assert "the Bezier curve's control point and its steps so far are saved in" in capsys.readouterr().err
    monkeypatch.setattr(landscape, "fit_bezier_curve", real)
    assert main(line + ["--out", str(tmp_path / "part")]) == 0
    assert "after 5 of 12 steps is the one saved in" in capsys.readouterr().out
    a, b = _result(tmp_path / "whole")["curve"], _result(tmp_path / "part")["curve"]
    assert b["resumed_steps"] == 5 and a["loss"] == b["loss"] and a["objective"] == b["objective"]
    assert a["lr"] == b["lr"] == 0.2
    # a longer curve (and another grid) goes on from a shorter one's point, to the longer one's numbers
    short = line[:line.index("--curve") + 1] + ["7"] + line[line.index("--curve") + 2:]
    assert main(short + ["--out", str(tmp_path / "grow")]) == 0
    capsys.readouterr()
    assert main(line + ["--points", "5", "--out", str(tmp_path / "grow")]) == 0
    assert "after 7 of 12 steps is the one saved in" in capsys.readouterr().out
    g = _result(tmp_path / "grow")["curve"]
    assert g["resumed_steps"] == 7 and g["loss"] == a["loss"] and g["objective"] == a["objective"]


def test_curve_refusals(tmp_path):
    files = _two_seeds(tmp_path, epochs="2")

    def refused(*extra):
        with pytest.raises(SystemExit) as e:
            main(["landscape", "--weights", files[0], *extra, "--no-progress", "--out", str(tmp_path / "x")])
        return str(e.value)

    assert "--curve has no effect with --directions init" in refused("--directions", "init", "--curve", "3")
    assert "--curve-lr has no effect without --curve" in refused("--directions", "between", "--other", files[1],
                                                                 "--curve-lr", "0.1")
    assert "the loss along the curve is not finite at step" in refused("--directions", "between", "--other",
                                                                       files[1], "--curve", "20", "--curve-lr", "1e30")
    blob = torch.load(files[1], weights_only=True)  # a weights file of an earlier version: no learning rate
    del blob["train"]
    torch.save(blob, tmp_path / "old.weights.pt")
    old = ["landscape", "--weights", str(tmp_path / "old.weights.pt"), "--directions", "between", "--other", files[0],
           "--curve", "3", "--no-progress", "--out", str(tmp_path / "y")]
    with pytest.raises(SystemExit, match="does not record its learning rate .* give --curve-lr"):
        main(old)
    assert main(old + ["--curve-lr", "0.1", "--no-plots"]) == 0


def test_align_refuses_a_net_without_hidden_units(tmp_path):
    """A 1-shortcut unit is one layer: nothing inside it to permute (the shortcut pins the residual stream)."""
    base = ["train", "--arch", "1-shortcut", "--act", "relu-pre", "--depth", "3", "--width", "10", "--samples", "40",
            "--epochs", "3", "--save-weights", "--no-progress"]
    for seed in ("0", "1"):
        assert main(base + ["--seed", seed, "--out", str(tmp_path / f"s{seed}.json")]) == 0
    with pytest.raises(SystemExit, match="--align: a unit of this net has one layer"):
        main(["landscape", "--weights", str(tmp_path / "s0.weights.pt"), "--directions", "between", "--other",
              str(tmp_path / "s1.weights.pt"), "--align", "--no-progress", "--out", str(tmp_path / "x")])


def test_the_hessians_eigenvectors_are_saved_for_a_rerun(tmp_path, monkeypatch, capsys):
    """--directions hessian saves its eigenvectors beside the checkpoint: a rerun of the same options takes them
    (no Lanczos) and ends with the same numbers; other options, or a damaged file, compute them again; and along
    the top eigenvector of a 2-shortcut zero point the loss rises as t^2 with coefficient lambda max / 2."""
    import importlib

    lanczos_mod = importlib.import_module("shortcut_ext.curvature.lanczos")

    out = tmp_path / "o"
    args = TINY + ["--init", "zero", "--directions", "hessian", "--points", "5", "--span", "0.2", "--order"]
    assert main(args + ["--out", str(out)]) == 0
    first = _result(out)
    o = first["orders"][0]
    assert round(o["order"], 2) == 2 and o["coefficient"] == pytest.approx(first["eigen"]["eigenvalues"][0] / 2,
                                                                           rel=1e-4)
    saved = out / landscape_cmd.DIRECTIONS_FILE
    fp = torch.load(saved, weights_only=True)["fingerprint"]
    monkeypatch.setattr(lanczos_mod, "lanczos", lambda *a, **k: pytest.fail("Lanczos ran again"))
    capsys.readouterr()
    assert main(args + ["--out", str(out)]) == 0
    assert "the Hessian's eigenvectors are those saved in" in capsys.readouterr().out
    again = _result(out)
    assert again["loss"] == first["loss"] and again["eigen"] == first["eigen"] and again["resumed_rows"] == 5
    monkeypatch.undo()
    saved.write_bytes(b"damaged")
    assert main(args + ["--out", str(out)]) == 0
    assert _result(out)["loss"] == first["loss"]
    assert torch.load(saved, weights_only=True)["fingerprint"] == fp  # rewritten
    capsys.readouterr()
    assert main(args[:-3] + ["--points", "3", "--out", str(out)]) == 0  # another grid: the same vectors, not
    assert "the Hessian's eigenvectors are those saved in" in capsys.readouterr().out  # computed again
    assert main(args + ["--direction-seed", "1", "--out", str(out)]) == 0  # another start: computed again, replaced
    blob = torch.load(saved, weights_only=True)
    assert blob["fingerprint"] != fp and "saved in" not in capsys.readouterr().out


def test_order_along_the_training_paths_directions(tmp_path):
    """--order along a training path's principal directions: the trained weights are no stationary point, so
    the loss changes as c t with c = g.u (the JSON's slopes) along each direction."""
    run = tmp_path / "run.json"
    assert main(TRAIN + ["--epochs", "6", "--save-weights-every", "2", "--out", str(run)]) == 0
    out = tmp_path / "o"
    assert main(["landscape", "--weights", str(tmp_path / "run.weights.pt"), "--directions", "pca", "--plane",
                 "--points", "3", "--order", "--no-progress", "--no-plots", "--out", str(out)]) == 0
    r = _result(out)
    assert r["grad_norm"] > 1e-3 and len(r["orders"]) == 2
    for o, g in zip(r["orders"], r["slopes"]):
        assert abs(g) > 1e-6 and round(o["order"], 2) == 1
        assert o["coefficient"] == pytest.approx(g, rel=1e-3)
