"""``shortcut-ext train`` and ``shortcut-ext demo`` from the command line: options checked up front with
errors that name the flag, and ``train``'s checkpoint / resume (same numbers as an uninterrupted run)."""
import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from shortcut_ext.cli import build_parser, main
from shortcut_ext.experiments import train_cmd

TINY = ["--depth", "4", "--epochs", "3", "--width", "4", "--samples", "40"]


def _train(tmp_path, *extra, out="run.json"):
    return main(["train", *TINY, *extra, "--out", str(tmp_path / out)])


def _no_work(monkeypatch):
    """Fail the test if the command gets as far as loading data or building the net."""
    def boom(*a, **k):
        raise AssertionError("the command started working before it checked its options")

    monkeypatch.setattr(train_cmd, "load_data", boom)
    monkeypatch.setattr(train_cmd, "build_model", boom)


# --------------------------------------------------------------------------- 1. ignored options
def test_1shortcut_refuses_mid_activations(tmp_path, monkeypatch):
    _no_work(monkeypatch)
    with pytest.raises(SystemExit, match=r"shortcut-ext train: --arch 1-shortcut does not support --act relu-mid"):
        _train(tmp_path, "--arch", "1-shortcut", "--act", "relu-mid")
    assert not (tmp_path / "run.json").exists()


@pytest.mark.parametrize("extra, msg", [
    (["--momentum", "0.9"], r"--momentum needs --optimizer sgd .*got --momentum 0.9 with --optimizer gd"),
    (["--batch-size", "8"], r"--batch-size needs --optimizer sgd or adam .*got --batch-size 8 with --optimizer gd"),
    (["--optimizer", "adam", "--momentum", "0.5"], r"--momentum needs --optimizer sgd .*with --optimizer adam"),
    (["--probe-parts", "ggn"], r"--probe-parts ggn needs --probe-every N .*got no --probe-every"),
])
def test_ignored_optimizer_options_are_refused(tmp_path, monkeypatch, extra, msg):
    _no_work(monkeypatch)
    with pytest.raises(SystemExit, match="shortcut-ext train: " + msg):
        _train(tmp_path, *extra)


def test_sgd_takes_momentum_and_batch_size(tmp_path, capsys):
    assert _train(tmp_path, "--optimizer", "sgd", "--momentum", "0.9", "--batch-size", "8", "--lr", "0.01") == 0
    rec = json.loads((tmp_path / "run.json").read_text())
    assert rec["config"]["momentum"] == 0.9 and rec["config"]["batch_size"] == 8
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    assert "momentum of --optimizer sgd" in " ".join(capsys.readouterr().out.split())


def test_a_narrow_read_out_names_the_nets_floor(tmp_path, capsys):
    """width 4 < 10 digit classes: the frozen read-out keeps the net above L_min, and the run says so
    (a converged run reported "loss - L_min 0.0711" and nothing else)."""
    assert main(["train", "--arch", "2-shortcut", "--depth", "2", "--width", "4", "--lr", "0.3", "--epochs", "3000",
                 "--no-progress", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["l_min_net"] > rec["l_min"] + 0.05 and rec["final_loss"] == pytest.approx(rec["l_min_net"], rel=1e-6)
    assert "note: width 4 < 10 targets" in out and f"{rec['l_min_net']:.6g}" in out
    # a nonlinear net can go below the linear floor (and below L_min): no floor for it
    assert main(["train", "--arch", "2-shortcut", "--act", "relu-mid", "--depth", "2", "--width", "4", "--lr", "0.3",
                 "--epochs", "3", "--no-progress", "--out", str(tmp_path / "n.json")]) == 0
    rec = json.loads((tmp_path / "n.json").read_text())
    assert "note:" not in capsys.readouterr().out and rec["l_min_net"] == rec["l_min"]
    assert main(["train", "--arch", "2-shortcut", "--depth", "2", "--width", "10", "--lr", "0.3", "--epochs", "3",
                 "--no-progress", "--out", str(tmp_path / "w.json")]) == 0
    rec = json.loads((tmp_path / "w.json").read_text())
    assert "note:" not in capsys.readouterr().out and rec["l_min_net"] == rec["l_min"]


# --------------------------------------------------------------------------- 2. --out checked first
def test_out_checked_before_any_work(tmp_path, monkeypatch):
    _no_work(monkeypatch)
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(SystemExit, match=r"shortcut-ext train: --out .*folder.json is a folder"):
        _train(tmp_path, out="folder.json")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"shortcut-ext train: the folder .*file of --out .*file/run.json must be a "
                                         r"folder, but .*file is a file"):  # names the --out as given
        _train(tmp_path, out="file/run.json")
    with pytest.raises(SystemExit, match=r"shortcut-ext train: --out must name a \.json file, got .*run\.csv"):
        _train(tmp_path, out="run.csv")  # the CSV history would overwrite the JSON


# --------------------------------------------------------------------------- 3. depth messages
_MULT = r"--depth of a {a} net must be a positive multiple of {n} \(its shortcut depth\), got {d}"


@pytest.mark.parametrize("arch, depth, msg", [
    ("plain-xavier", "0", r"--depth must be >= 1, got 0"),
    ("1-shortcut", "-1", r"--depth must be >= 1, got -1"),
    ("2-shortcut", "0", _MULT.format(a="2-shortcut", n=2, d=0)),
    ("2-shortcut", "-4", _MULT.format(a="2-shortcut", n=2, d=-4)),
    ("3-shortcut", "4", _MULT.format(a="3-shortcut", n=3, d=4)),
])
def test_depth_messages(tmp_path, monkeypatch, arch, depth, msg):
    _no_work(monkeypatch)
    with pytest.raises(SystemExit, match="^shortcut-ext train: " + msg + "$"):
        _train(tmp_path, "--arch", arch, "--depth", depth)


# --------------------------------------------------------------------------- 4. bad values
@pytest.mark.parametrize("flag, value", [
    ("--width", "0"), ("--samples", "0"), ("--lr", "0"), ("--lr", "-0.1"), ("--lr", "inf"), ("--lr", "nan"),
    ("--epochs", "-1"), ("--probe-every", "-1"), ("--batch-size", "0"), ("--momentum", "-0.5"),
    ("--momentum", "inf"), ("--seed", "-1"), ("--seed", str(2**63)), ("--exact-max-params", "-1"),
    ("--checkpoint-every", "-1"), ("--checkpoint-seconds", "nan"), ("--sharpness-every", "-1"),
    ("--sharpness-every", "1.5"),
])
def test_bad_values_name_the_flag(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, f"{flag}={value}")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, msg", [
    (["--width", "65"], r"--width 65 does not fit --data digits: .*64"),
    (["--samples", "5000"], r"--samples 5000 does not fit --data digits: .*1797"),
    (["--samples", "4"], r"--samples 4 / --width 4 does not fit --data digits"),
    (["--data", "mnist"], r"--data mnist needs a PATH"),
    (["--data", "cifar"], r"--data must be 'digits', 'synthetic' or 'mnist PATH', got 'cifar'"),
])
def test_data_limits_name_the_flag(tmp_path, extra, msg):
    with pytest.raises(SystemExit, match="^shortcut-ext train: " + msg):
        _train(tmp_path, *extra)


def test_bad_mnist_paths_name_the_flag(tmp_path):
    with pytest.raises(SystemExit, match=r"^shortcut-ext train: --data mnist PATH: .*nowhere does not exist"):
        _train(tmp_path, "--data", "mnist", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^shortcut-ext train: --data mnist .*empty: MNIST train images not found"):
        _train(tmp_path, "--data", "mnist", str(tmp_path / "empty"))
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(SystemExit, match=r"^shortcut-ext train: --data mnist .*bad.npz: "):
        _train(tmp_path, "--data", "mnist", str(tmp_path / "bad.npz"))


@pytest.mark.parametrize("flag, value", [("--width", "0"), ("--epochs", "-1"), ("--depth", "3"), ("--depth", "0"),
                                         ("--depth", "x"), ("--seed", "-1")])
def test_demo_bad_values_name_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["demo", f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected" in err and "Traceback" not in err
    if flag == "--depth":
        assert "even integer >= 2" in err


def test_demo_prints_each_epoch_once_and_claims_its_real_time(capsys):
    for epochs in ("0", "10"):
        assert main(["demo", "--epochs", epochs, "--depth", "4", "--width", "4"]) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if "best lr" in ln]
        assert len(lines) == 2
        for ln in lines:
            assert ln.count("epoch 0:") == 1 and ln.count(f"epoch {epochs}:") == 1, ln
    text = build_parser().format_help()
    assert "20 s" not in text and "~3 s" in text


# --------------------------------------------------------------------------- 5. absurd sizes
def test_absurd_sizes_refused_before_allocating(tmp_path, monkeypatch):
    _no_work(monkeypatch)
    with pytest.raises(SystemExit, match=r"^shortcut-ext train: --depth 200000000 --width 16 is too large: .*GiB.*"
                                         r"lower --depth, --width, --samples or --batch-size"):
        main(["train", "--depth", "200000000", "--width", "16", "--out", str(tmp_path / "run.json")])
    # weights that fit, but not the unit inputs the backward keeps (it crashed in the kernel with a traceback)
    from shortcut_ext.experiments import train_cmd

    monkeypatch.setattr(train_cmd, "device_memory", lambda device: (16 * 2**30, "this machine's"))
    with pytest.raises(SystemExit, match=r"unit inputs the backward keeps \(1000000 units x 1500 rows\) 44.7 GiB"):
        main(["train", "--act", "tanh-mid", "--depth", "2000000", "--width", "4", "--data", "synthetic", "--samples",
              "1500", "--dtype", "float64", "--out", str(tmp_path / "run.json")])


def test_memory_check_counts_what_the_run_holds(monkeypatch):
    """The activation bound counts the rows a run really holds: linear nets train on the second-moment
    compression (a 200000-sample linear run needing 0.5 GB was refused), a rank its share; a plain net's
    backward recomputes its layers in per-thread scratch (a plain net was counted as one unit input)."""
    from argparse import Namespace

    from shortcut_ext.experiments import train_cmd

    monkeypatch.setattr(train_cmd, "device_memory", lambda device: (16 * 2**30, "this machine's"))
    base = dict(dtype="float32", optimizer="gd", momentum=0.0, batch_size=None, no_compress=False, distributed=False)
    train_cmd._check_memory(Namespace(**base, act="linear", depth=4000, width=16, samples=200000), "cpu", 2)
    with pytest.raises(SystemExit, match="unit inputs the backward keeps \\(2000 units x 200000 rows\\)"):
        train_cmd._check_memory(Namespace(**dict(base, no_compress=True), act="linear", depth=4000, width=16,
                                          samples=200000), "cpu", 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with pytest.raises(SystemExit, match="per-thread gradient sums"):  # each CPU thread sums a plain net's gradient
        train_cmd._check_memory(Namespace(**base, act="relu-mid", depth=500_000, width=64, samples=64), "cpu", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)  # a shortcut net's sums are chunked: 1.7 GB at 64
    train_cmd._check_memory(Namespace(**base, act="tanh-mid", depth=6000, width=128, samples=32), "cpu", 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with pytest.raises(SystemExit, match="data 23.8 GiB"):  # the data every rank loads
        train_cmd._check_memory(Namespace(**base, act="relu-mid", depth=10, width=16, samples=200_000_000), "cpu", 0)
    # ranks on one machine share its memory: a run that fits one process does not fit two local ranks
    one = Namespace(**base, act="relu-mid", depth=150_000, width=64, samples=64)
    train_cmd._check_memory(one, "cpu", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="x 2 ranks on this machine"):
        train_cmd._check_memory(Namespace(**dict(vars(one), distributed=True)), "cpu", 0)
    monkeypatch.setattr(train_cmd, "device_memory", lambda device: (16 * 2**30, "cuda:0's"))
    train_cmd._check_memory(Namespace(**base, act="relu-mid", depth=500_000, width=64, samples=64), "cuda:0", 0)


# --------------------------------------------------------------------------- 6. checkpoint / resume
RESUME = ["--epochs", "6", "--checkpoint-every", "1", "--checkpoint-seconds", "0", "--probe-every", "2"]


def _interrupt_at(monkeypatch, stop_epoch):
    """Make the next ``train`` of the command raise KeyboardInterrupt after epoch ``stop_epoch``."""
    real = train_cmd.train

    def stop(epoch):
        if epoch == stop_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "train", lambda *a, **k: real(*a, on_epoch=stop, **k))
    return real


def _numbers(path):
    rec = json.loads(path.read_text())
    return rec["final_loss"], rec["history"], rec["probes"], rec["status"]


@pytest.mark.parametrize("extra", [
    [],  # gd on the compressed rows
    ["--act", "relu-mid", "--optimizer", "sgd", "--batch-size", "7", "--momentum", "0.9", "--lr", "0.05"],
    ["--act", "tanh-pre", "--optimizer", "adam", "--batch-size", "16", "--lr", "0.01", "--data", "synthetic"],
])
def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, monkeypatch, capsys, extra):
    assert _train(tmp_path, *RESUME, *extra, out="full.json") == 0
    ckpt = tmp_path / "run.ckpt.pt"
    real = _interrupt_at(monkeypatch, 2)
    assert _train(tmp_path, *RESUME, *extra) == 130  # the CLI's KeyboardInterrupt exit
    assert ckpt.exists() and not (tmp_path / "run.json").exists()
    assert "is saved: rerun the same command to resume from it" in capsys.readouterr().err
    assert torch.load(ckpt, weights_only=True)["epoch"] == 3
    monkeypatch.setattr(train_cmd, "train", real)
    assert _train(tmp_path, *RESUME, *extra) == 0
    assert "resuming from epoch 3 of 6" in capsys.readouterr().out
    assert _numbers(tmp_path / "run.json") == _numbers(tmp_path / "full.json")  # bit for bit
    assert (tmp_path / "run.csv").read_text() == (tmp_path / "full.csv").read_text()
    assert not ckpt.exists() and not (tmp_path / "full.ckpt.pt").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_sigterm_ends_a_run_like_ctrl_c_and_it_resumes(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM (time limit, preemption) used to kill the process where it stood.  It now
    ends the command as Ctrl-C does: status 143, a line saying the checkpoint is saved, the rerun
    resumes to the same numbers; the default handler is put back afterwards."""
    import signal
    import time

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("something else handles SIGTERM in this process")
    assert _train(tmp_path, *RESUME, out="full.json") == 0
    real = train_cmd.train

    def term(epoch):
        if epoch == 2:
            # unhandled, SIGTERM would end this test process: fail instead
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL, "the command leaves SIGTERM unhandled"
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises here

    monkeypatch.setattr(train_cmd, "train", lambda *a, **k: real(*a, on_epoch=term, **k))
    assert _train(tmp_path, *RESUME) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM); the checkpoint" in err and "is saved: rerun the same command" in err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert torch.load(tmp_path / "run.ckpt.pt", weights_only=True)["epoch"] == 3
    monkeypatch.setattr(train_cmd, "train", real)
    assert _train(tmp_path, *RESUME) == 0
    assert "resuming from epoch 3 of 6" in capsys.readouterr().out
    assert _numbers(tmp_path / "run.json") == _numbers(tmp_path / "full.json")


def test_checkpoint_of_other_options_is_replaced(tmp_path, monkeypatch, capsys):
    assert _train(tmp_path, *RESUME, "--lr", "0.2", out="full.json") == 0
    real = _interrupt_at(monkeypatch, 3)
    assert _train(tmp_path, *RESUME, "--lr", "0.1") == 130
    monkeypatch.setattr(train_cmd, "train", real)
    capsys.readouterr()
    assert _train(tmp_path, *RESUME, "--lr", "0.2") == 0
    out = capsys.readouterr().out
    assert "is of another run" in out and "resuming" not in out
    assert _numbers(tmp_path / "run.json") == _numbers(tmp_path / "full.json")
    # an unreadable checkpoint (e.g. another file) is replaced too
    (tmp_path / "run.ckpt.pt").write_bytes(b"garbage")
    assert _train(tmp_path, *RESUME, "--lr", "0.2") == 0
    assert "cannot read the checkpoint" in capsys.readouterr().out
    assert _numbers(tmp_path / "run.json") == _numbers(tmp_path / "full.json")
    assert not (tmp_path / "run.ckpt.pt").exists()


def test_train_checkpoint_api(tmp_path):
    """``train(checkpoint=...)``: written every ``checkpoint_every`` epochs, resumed bit for bit; without it
    nothing is written (backward compatible)."""
    from shortcut_ext.models import ShortcutNet
    from shortcut_ext.train import TrainConfig, train

    def problem():
        net = ShortcutNet(4, 2, 2, "identity", "relu", "identity", init="small", scale=0.3, seed=1,
                          dtype=torch.float64)
        g = torch.Generator().manual_seed(2)
        return net, (torch.randn(30, 4, generator=g, dtype=torch.float64),
                     torch.randn(30, 4, generator=g, dtype=torch.float64))

    cfg = TrainConfig(epochs=5, lr=0.05, optimizer="sgd", batch_size=8, momentum=0.5, seed=3)
    lm = 0.1  # (without l_min the excess is NaN, which never compares equal)
    net, data = problem()
    full = train(net, data, cfg, l_min=lm)
    assert os.listdir(tmp_path) == []
    path = tmp_path / "ck.pt"
    seen = []

    def watch(epoch):
        seen.append(torch.load(path, weights_only=True)["epoch"] if path.exists() else None)
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(*problem(), cfg, l_min=lm, checkpoint=path, checkpoint_every=2, checkpoint_every_s=0, on_epoch=watch)
    assert seen == [None, 2, 2, 4]
    notes = []
    net2, data2 = problem()
    res = train(net2, data2, cfg, l_min=lm, checkpoint=path, checkpoint_every=2, checkpoint_every_s=0,
                log=notes.append)
    assert notes == [f"resuming from epoch 4 of 5 ({path})"]
    assert res.history == full.history and res.final_loss == full.final_loss
    assert torch.equal(net2.weight, net.weight)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        train(*problem(), cfg, checkpoint=path, checkpoint_every=0)
    # checkpoint_every_s: a long interval writes nothing in a short run
    path.unlink()
    train(*problem(), cfg, l_min=lm, checkpoint=path, checkpoint_every=1, checkpoint_every_s=3600)
    assert not path.exists()


_DIST_WORKER = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    from shortcut_ext.models import ShortcutNet
    from shortcut_ext.train import TrainConfig, train
    dist.init_process_group("gloo")
    r, out = dist.get_rank(), sys.argv[1]
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64)
    shard = (X[r::2], Y[r::2])
    net = lambda: ShortcutNet(4, 2, 2, "identity", "tanh", "identity", init="small", scale=0.3, seed=1,
                              dtype=torch.float64)
    cfg = TrainConfig(epochs=5, lr=0.1, probe_every=2)
    full = train(net(), shard, cfg, l_min=0.1, distributed=True)
    ck = os.path.join(out, "ck.pt")
    def stop(e):
        if e == 2:
            raise KeyboardInterrupt
    try:
        train(net(), shard, cfg, l_min=0.1, distributed=True, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0,
              on_epoch=stop)
    except KeyboardInterrupt:
        pass
    notes = []
    res = train(net(), shard, cfg, l_min=0.1, distributed=True, checkpoint=ck, checkpoint_every=1,
                checkpoint_every_s=0, log=notes.append)
    torch.save({"full": (full.history, full.probes), "res": (res.history, res.probes), "notes": notes},
               os.path.join(out, f"rank{r}.pt"))
    dist.barrier()
    dist.destroy_process_group()
''')


def test_distributed_train_resumes(tmp_path):
    """Rank 0 writes the checkpoint, every rank reads it, and the resumed run matches bit for bit."""
    script = tmp_path / "worker.py"
    script.write_text(_DIST_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):
        d = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert d["res"] == d["full"]
        assert d["notes"] == [f"resuming from epoch 3 of 5 ({tmp_path / 'ck.pt'})"]


# --------------------------------------------------------------------------- one run per output
@pytest.mark.parametrize("command", ["train", "spectrum", "landscape", "reproduce"])
def test_a_second_run_into_the_same_output_is_refused(tmp_path, command):
    """Two processes on one --out used to crash on each other's temporary files (train, spectrum) or
    compute every run twice (reproduce); the second is now refused, and the lock goes with the first."""
    from shortcut_ext._cli_args import out_lock

    if command == "train":
        lock, args = tmp_path / ".run.json.lock", ["train", *TINY, "--out", str(tmp_path / "run.json")]
    elif command == "spectrum":
        lock = tmp_path / "sp" / ".shortcut-ext.lock"
        args = ["spectrum", "--units", "3", "--width", "3", "--samples", "16", "--probes", "2", "--steps", "4",
                "--top", "1", "--no-progress", "--no-plots", "--out", str(tmp_path / "sp")]
    elif command == "landscape":
        lock = tmp_path / "ls" / ".shortcut-ext.lock"
        args = ["landscape", "--units", "3", "--width", "3", "--samples", "16", "--points", "3", "--no-progress",
                "--no-plots", "--out", str(tmp_path / "ls")]
    else:
        lock = tmp_path / "rp" / ".shortcut-ext.lock"
        args = ["reproduce", "--tiny", "--only", "fig5", "--no-progress", "--out", str(tmp_path / "rp")]
    with out_lock(lock, command):  # another run holds the output (flock: a second open conflicts)
        with pytest.raises(SystemExit, match=rf"another run \(shortcut-ext {command}, pid {os.getpid()}\) is writing"):
            main(args)
    if command == "train":
        assert main(args) == 0 and (tmp_path / "run.json").exists()


def test_a_file_system_without_flock_runs_unlocked(tmp_path, monkeypatch):
    """flock unsupported (some network mounts): the run goes on with a warning, not a refusal, and no
    descriptor is left open."""
    import fcntl

    from shortcut_ext._cli_args import out_lock

    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(3):
        with pytest.warns(UserWarning, match="running without the one-run-per-output check"):
            with out_lock(tmp_path / ".lock", "train"):
                pass
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds
    with pytest.warns(UserWarning, match="cannot lock"):
        assert main(["train", *TINY, "--out", str(tmp_path / "run.json")]) == 0


def test_no_progress_leaves_logs_clean(tmp_path, capsys):
    """train had no --no-progress (spectrum and reproduce do): long runs' logs filled with bar frames."""
    assert main(["train", *TINY, "--out", str(tmp_path / "a.json")]) == 0
    assert "train:" in capsys.readouterr().err  # the bar
    assert main(["train", *TINY, "--no-progress", "--out", str(tmp_path / "b.json")]) == 0
    assert "train:" not in capsys.readouterr().err


def test_interrupt_message_says_whether_a_checkpoint_exists(tmp_path, monkeypatch, capsys):
    """Ctrl-C said 'finished results are saved' even with no checkpoint written (--checkpoint-every 0, or
    in the first 30 s), and described spectrum and reproduce to a train user."""
    from shortcut_ext.experiments import train_cmd

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "train", interrupted)
    assert main(["train", *TINY, "--out", str(tmp_path / "run.json")]) == 130
    err = capsys.readouterr().err
    assert "interrupted; no checkpoint was written yet" in err and "spectrum" not in err
    (tmp_path / "run.ckpt.pt").write_bytes(b"x")
    assert main(["train", *TINY, "--out", str(tmp_path / "run.json")]) == 130
    assert f"the checkpoint {tmp_path / 'run.ckpt.pt'} is saved: rerun the same command" in capsys.readouterr().err
    assert main(["train", *TINY, "--checkpoint-every", "0", "--out", str(tmp_path / "run.json")]) == 130
    assert "no checkpoint was written yet" in capsys.readouterr().err  # a stale file it would not resume


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    """Ctrl-C in the first second, while the parser imports the commands' modules, printed a traceback."""
    from shortcut_ext import cli

    def importing(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", importing)
    assert main(["train", *TINY]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "shortcut-ext: interrupted (before it started)"


def test_outputs_record_the_environment(tmp_path):
    """run.json and spectrum.json carry what a reviewer needs to reproduce them: the shortcut_ext and
    torch versions, the build, the thread count (run.json had none of these, spectrum.json no
    shortcut_ext version)."""
    import shortcut_ext

    assert _train(tmp_path, "--epochs", "2") == 0
    env = json.loads((tmp_path / "run.json").read_text())["environment"]
    assert env["shortcut_ext_version"] == shortcut_ext.__version__ and env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads() and "shortcut_ext_build_info" in env
    assert main(["spectrum", "--units", "3", "--width", "3", "--samples", "16", "--probes", "2", "--steps", "6",
                 "--no-plots", "--no-progress", "--out", str(tmp_path / "s")]) == 0
    env = json.loads((tmp_path / "s" / "spectrum.json").read_text())["environment"]
    assert env["shortcut_ext_version"] == shortcut_ext.__version__ and env["torch"] == torch.__version__


def test_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    """A write that fails (here fsync with ENOSPC, as on a full disk) used to end in a bare
    "[Errno 28] No space left on device" and leave its .tmp holding the space, so the rerun failed
    the same way; now the message names the file and the temporary file is gone."""
    import errno

    from shortcut_ext import _io

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.os, "fsync", full)
    assert _train(tmp_path, *RESUME) == 1  # the machine failed the run, not its input: not bad input's 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run.ckpt.pt" in err and "failed:" in err, err
    assert "rerun" in err, err  # says what a rerun does
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    monkeypatch.undo()
    assert _train(tmp_path, *RESUME) == 0


def test_two_writers_of_one_file_do_not_take_each_others_temporary(tmp_path):
    """Every writer used path + '.tmp': of two writers of one checkpoint (a duplicated sweep job), one
    renamed the other's temporary away, which then failed with a bare FileNotFoundError."""
    import threading

    from shortcut_ext._io import atomic_open

    path, errors, go = tmp_path / "run.ckpt.pt", [], threading.Barrier(4)

    def write(i):
        try:
            go.wait(10)
            for _ in range(50):
                with atomic_open(path, "w") as f:
                    f.write(str(i) * 1000)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    text = path.read_text()
    assert len(text) == 1000 and len(set(text)) == 1  # one writer's whole file
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    """Temporaries are named by writer; one left by a writer that was killed (no cleanup ran) would stay,
    a checkpoint's worth of disk per kill: the next write of the file removes those of dead processes."""
    import subprocess
    import sys

    from shortcut_ext._io import atomic_open

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    path = tmp_path / "run.ckpt.pt"
    stale = tmp_path / f"run.ckpt.pt.{dead}-1234.tmp"
    alive = tmp_path / f"run.ckpt.pt.{os.getppid()}-1234.tmp"  # a live writer's: kept
    stale.write_text("x" * 100)
    alive.write_text("y")
    with atomic_open(path, "w") as f:
        f.write("ok")
    assert path.read_text() == "ok" and not stale.exists() and alive.exists()


def test_a_figure_that_cannot_be_written_names_its_file(tmp_path):
    """Figures were written by savefig straight onto their path: a full disk (`ulimit -f`) gave "[Errno 27]
    File too large" without the file's name, and left a truncated PNG."""
    import errno

    from matplotlib.figure import Figure

    from shortcut_ext._io import save_figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    path = tmp_path / "density.png"
    save_figure(fig, path, dpi=50)
    good = path.read_bytes()
    assert good.startswith(b"\x89PNG")

    def full_disk(f, **kw):
        f.write(b"\x89PNG partial")
        raise OSError(errno.EFBIG, "File too large")

    fig.savefig = full_disk
    with pytest.raises(OSError, match="File too large.*density.png"):
        save_figure(fig, path, dpi=50)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["density.png"]


def test_info_json_is_one_json_object_with_the_build_version_and_path(capsys):
    """Not tested: ``shortcut-ext info --json``.  It must print one valid JSON object (nothing else on stdout)
    holding what the README says info tells (how the extension was built, its version and path) and the
    environment: compared with ``shortcut_ext.build_info()``, ``__version__``, the package's folder, torch's
    version and thread count; the text form lists the same keys."""
    import shortcut_ext

    assert main(["info", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert isinstance(env, dict)
    assert env["shortcut_ext_version"] == shortcut_ext.__version__
    assert os.path.samefile(env["shortcut_ext_path"], os.path.dirname(shortcut_ext.__file__))
    assert env["shortcut_ext_build_info"] == json.loads(json.dumps(shortcut_ext.build_info(), default=str))
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["cuda_available"] == torch.cuda.is_available() and env["python"] == sys.version.split()[0]
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert all(line.split()[0].rstrip(":") in env for line in text.splitlines() if not line.startswith(" "))


def test_an_os_error_of_the_input_is_one_line_exit_2_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Not tested: an OSError that is not the machine's failure (here a file name longer than the file system
    allows, ENAMETOOLONG) is bad input: one line naming it, exit 2, nothing written; a machine failure
    (ENOSPC) with SHORTCUT_EXT_TRACEBACK=1 is raised; a RuntimeError that is neither out-of-memory nor a
    floating-point failure is a bug and keeps its traceback (raised, not exit 1)."""
    import errno

    monkeypatch.chdir(tmp_path)
    name = "x" * 300 + ".json"
    assert main(["train", "--depth", "2", "--width", "3", "--epochs", "1", "--data", "synthetic",
                 "--out", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shortcut-ext train: error: [Errno 36] File name too long") and err.count("\n") == 1
    assert "(OSError; SHORTCUT_EXT_TRACEBACK=1 shows the traceback)" in err
    assert list(tmp_path.iterdir()) == []

    def fail(exc):
        def run(args):
            raise exc
        return run

    monkeypatch.setattr(train_cmd, "main", fail(OSError(errno.ENOSPC, "No space left on device")))
    argv = ["train", "--data", "synthetic", "--out", "r.json"]
    assert main(argv) == 1 and "failed: [Errno 28] No space left on device" in capsys.readouterr().err
    monkeypatch.setenv("SHORTCUT_EXT_TRACEBACK", "1")
    with pytest.raises(OSError, match="No space left"):
        main(argv)
    monkeypatch.delenv("SHORTCUT_EXT_TRACEBACK")
    monkeypatch.setattr(train_cmd, "main", fail(RuntimeError("index 3 is out of bounds")))
    with pytest.raises(RuntimeError, match="index 3 is out of bounds"):
        main(argv)
    monkeypatch.setattr(train_cmd, "main", fail(RuntimeError("DefaultCPUAllocator: not enough memory")))
    assert main(argv) == 1 and "the run needs more memory than there is" in capsys.readouterr().err


def test_traceback_0_is_the_same_as_unset_for_bad_input(tmp_path, monkeypatch, capsys):
    """Not pinned: SHORTCUT_EXT_TRACEBACK=0 means off, like unset: a subcommand's ValueError (bad input) is
    one line and exit status 2, not a traceback; =1 raises it."""
    monkeypatch.chdir(tmp_path)

    def bad(args):
        raise ValueError("bad input")

    monkeypatch.setattr(train_cmd, "main", bad)
    monkeypatch.setenv("SHORTCUT_EXT_TRACEBACK", "0")
    assert main(["train", "--out", "run.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shortcut-ext train: error: bad input (ValueError;") and err.count("\n") == 1
    monkeypatch.setenv("SHORTCUT_EXT_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad input"):
        main(["train", "--out", "run.json"])


def test_a_subcommand_refusal_exits_with_status_2(tmp_path, monkeypatch, capsys):
    """Not pinned: a subcommand's own refusal (SystemExit with a message, here --depth 3 for a 2-shortcut
    net) exits with status 2 like argparse's, not 1 (which scripts read as a failed run)."""
    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(["train", "--arch", "2-shortcut", "--depth", "3", "--out", "run.json"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("shortcut-ext train:")
    assert list(tmp_path.iterdir()) == []


def test_a_blank_out_folder_is_refused(tmp_path, monkeypatch):
    """Not pinned: an --out of blanks (an unset $OUT padded by a script) is refused like an empty one, not
    made a folder named '  ' in the current folder."""
    from shortcut_ext.curvature import spectrum_cmd

    monkeypatch.chdir(tmp_path)

    def boom(*a, **k):
        raise AssertionError("spectrum started working with a blank --out")

    monkeypatch.setattr(spectrum_cmd, "_run", boom)
    for out in ("", "  "):
        with pytest.raises(SystemExit, match="--out must name a folder, got an empty string"):
            main(["spectrum", "--units", "3", "--width", "3", "--samples", "16", "--no-plots", "--no-progress",
                  "--out", out])
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_every_0_writes_no_checkpoint(tmp_path, monkeypatch, capsys):
    """Not pinned: --checkpoint-every 0 writes no checkpoint at all (not even with --checkpoint-seconds 0):
    interrupted after an epoch, there is no run.ckpt.pt, and the message says a rerun starts over."""
    monkeypatch.chdir(tmp_path)
    _interrupt_at(monkeypatch, 1)
    assert main(["train", *TINY, "--checkpoint-every", "0", "--checkpoint-seconds", "0", "--no-progress",
                 "--out", "run.json"]) == 130
    assert "no checkpoint was written yet" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if ".ckpt" in p]


def test_probe_parts_are_saved_beside_the_hessians_probes_and_resume(tmp_path, capsys):
    """--probe-parts ggn functional: each probe adds the parts' numbers under prefixed keys; the Gauss-Newton part
    has no negative eigenvalue; the flag is part of the checkpoint's options only where given (a run without it
    keeps the fingerprint of earlier versions) and of the JSON's config."""
    args = ("--arch", "2-shortcut", "--act", "tanh-mid", "--depth", "4", "--epochs", "6", "--lr", "0.3",
            "--probe-every", "3")
    assert _train(tmp_path, *args, "--probe-parts", "functional", "ggn") == 0
    rec = json.loads((tmp_path / "run.json").read_text())
    assert rec["config"]["probe_parts"] == ["ggn", "functional"]
    assert [p["epoch"] for p in rec["probes"]] == [0, 3, 6]
    for p in rec["probes"]:
        assert p["ggn_index"] == 0 and p["ggn_method"] == p["functional_method"] == "exact"
        assert p["functional_lam_max"] > 0 and p["lam_max"] <= p["ggn_lam_max"] + p["functional_lam_max"] + 1e-12
    assert _train(tmp_path, *args, out="plain.json") == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert "probe_parts" not in plain["config"] and not any(k.startswith("ggn_") for k in plain["probes"][0])
    assert [p["lam_max"] for p in plain["probes"]] == [p["lam_max"] for p in rec["probes"]]
    # the sharpness (the largest eigenvalue, signed) against gradient descent's threshold, in the closing line
    top = plain["probes"][-1]["lam_top"]
    assert 0 < top <= plain["probes"][-1]["lam_max"]
    assert f"lr * lambda_top / 2 {0.3 * top / 2:.3g} (gradient descent's threshold: 1)" in capsys.readouterr().out
    assert _train(tmp_path, *args, "--optimizer", "adam", out="adam.json") == 0  # 2 / lr is plain gd's threshold
    assert "lambda_top" not in capsys.readouterr().out


def test_the_sharpness_along_training(tmp_path, capsys):
    """--sharpness-every 2: the history CSV's sharpness column (nan between), the closing line's last
    value and its largest against gradient descent's threshold, the flag in the JSON's config and the checkpoint's
    options only where given."""
    args = ("--arch", "2-shortcut", "--act", "tanh-mid", "--depth", "4", "--epochs", "5", "--lr", "0.3")
    assert _train(tmp_path, *args, "--sharpness-every", "2") == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "run.csv").open()))
    sh = [float(r["sharpness"]) for r in rows]
    assert len(sh) == 6 and all(math.isnan(v) for v in sh[1::2]) and all(v > 0 for v in sh[::2])
    assert (f"sharpness at epoch 4: {sh[4]:.4g} (lr * sharpness / 2 {0.3 * sh[4] / 2:.3g}; most "
            f"{0.3 * max(sh[::2]) / 2:.3g} over the run)") in out
    rec = json.loads((tmp_path / "run.json").read_text())
    assert rec["history"]["sharpness"][1] is None and rec["history"]["sharpness"][2] == sh[2]
    assert rec["config"]["sharpness_every"] == 2
    assert _train(tmp_path, *args, out="plain.json") == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert "sharpness" not in plain["history"] and "sharpness_every" not in plain["config"]
    assert "sharpness at" not in capsys.readouterr().out
    from types import SimpleNamespace

    from shortcut_ext.cli import build_parser

    def fingerprint(*extra):
        a = build_parser().parse_args(["train", *TINY, *args, *extra, "--out", "x.json"])
        return train_cmd._fingerprint(a, SimpleNamespace(backend="fused"), SimpleNamespace(tag="t"), "cpu", 1, False)

    assert "probe_parts" not in fingerprint()
    assert fingerprint("--probe-parts", "ggn")["probe_parts"] == ["ggn"]
    assert fingerprint("--probe-parts", "empirical_fisher", "ggn")["probe_parts"] == ["empirical_fisher", "ggn"]
    assert "sharpness_every" not in fingerprint() and fingerprint("--sharpness-every", "3")["sharpness_every"] == 3


def test_the_sharpness_against_heavy_ball_momentums_threshold(tmp_path, capsys):
    """--optimizer sgd --momentum 0.5 on full batches: the closing line sets the sharpness and the probe's lambda_top
    against heavy-ball momentum's threshold (2 + 2 momentum) / lr; plain sgd (momentum 0) is gradient descent;
    mini-batches have no such threshold, so the line gives the sharpness alone."""
    args = ("--arch", "2-shortcut", "--act", "tanh-mid", "--depth", "4", "--epochs", "4", "--lr", "0.3",
            "--sharpness-every", "2", "--probe-every", "4", "--optimizer", "sgd")
    assert _train(tmp_path, *args, "--momentum", "0.5") == 0
    out = capsys.readouterr().out
    rec = json.loads((tmp_path / "run.json").read_text())
    sh = [v for v in rec["history"]["sharpness"] if v is not None]
    top = rec["probes"][-1]["lam_top"]
    assert (f"sharpness at epoch 4: {sh[-1]:.4g} (lr * sharpness / (2 + 2 * 0.5) {0.3 * sh[-1] / 3:.3g}; most "
            f"{0.3 * max(sh) / 3:.3g} over the run)") in out
    assert f"lr * lambda_top / (2 + 2 * 0.5) {0.3 * top / 3:.3g} (heavy-ball momentum's threshold: 1)" in out
    assert _train(tmp_path, *args, out="plain_sgd.json") == 0
    out = capsys.readouterr().out
    sh0 = [v for v in json.loads((tmp_path / "plain_sgd.json").read_text())["history"]["sharpness"] if v is not None]
    assert f"(lr * sharpness / 2 {0.3 * sh0[-1] / 2:.3g};" in out and "(gradient descent's threshold: 1)" in out
    assert _train(tmp_path, *args, "--momentum", "0.5", "--batch-size", "16", out="mini.json") == 0
    out = capsys.readouterr().out
    assert "sharpness at epoch 4: " in out and "lr * sharpness" not in out and "lambda_top /" not in out


def test_the_empirical_fishers_probes_of_a_linear_net_take_every_sample(tmp_path, capsys):
    """A linear net under gd trains on the second-moment compression of its rows, which keeps the loss, gradient,
    Hessian and G exact but not the per-sample gradients the empirical Fisher sums: a probe of it there would be
    another matrix. With --probe-parts empirical_fisher the run trains on all rows (and says why); its probes equal
    --no-compress's, and the empirical Fisher at the last probe is (1/m) sum_i g_i g_i^T over the data's samples."""
    from shortcut_ext.curvature import HessianOperator
    from shortcut_ext.experiments.sweeps import build_model

    args = ("--arch", "2-shortcut", "--act", "linear", "--epochs", "4", "--lr", "0.5", "--probe-every", "4",
            "--samples", "60", "--save-weights")
    assert _train(tmp_path, *args, "--probe-parts", "empirical_fisher", "ggn", out="ef.json") == 0
    assert "all rows: the empirical Fisher's probes need each sample's gradient" in capsys.readouterr().out
    assert _train(tmp_path, *args, "--probe-parts", "ggn", out="g.json") == 0
    assert "(second-moment compression)" in capsys.readouterr().out
    assert _train(tmp_path, *args, "--probe-parts", "empirical_fisher", "ggn", "--no-compress", out="all.json") == 0
    ef, g, full = (json.loads((tmp_path / f).read_text()) for f in ("ef.json", "g.json", "all.json"))
    assert ef["compressed"] is False and g["compressed"] is True
    for a, b, c in zip(ef["probes"], full["probes"], g["probes"]):
        assert a["empirical_fisher_lam_max"] == pytest.approx(b["empirical_fisher_lam_max"], rel=1e-10)
        assert a["ggn_lam_max"] == pytest.approx(c["ggn_lam_max"], rel=1e-8)  # G: the same on either rows
    net, bundle, _ = train_cmd.load_weights(tmp_path / "ef.weights.pt", "train", backend="torch")
    X, Y = bundle.X, bundle.Y  # every sample of the run's data
    assert X.shape[0] == 60
    gi = torch.stack([torch.autograd.grad(0.5 * ((net(X[i:i + 1]) - Y[i:i + 1]) ** 2).sum(), net.weight)[0].reshape(-1)
                      for i in range(60)])
    want = torch.linalg.eigvalsh(gi.T @ gi / 60)[-1].item()
    assert ef["probes"][-1]["empirical_fisher_lam_max"] == pytest.approx(want, rel=1e-8)
    dense = HessianOperator(net, (X, Y), "mse", matrix="empirical_fisher").to_dense(force=True)
    torch.testing.assert_close(dense, gi.T @ gi / 60, rtol=1e-9, atol=1e-12)
