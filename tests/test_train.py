"""Training (docs/science.md section 4): GD on a linear teacher, divergence as a result, Hessian probes,
learning-rate sweeps that checkpoint and resume."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import shortcut_ext
import shortcut_ext.train as train_mod
from testing import unsigned_checkpoint
from shortcut_ext.data import best_linear_loss, second_moment_compress, synthetic_teacher
from shortcut_ext.experiments.store import RunStore
from shortcut_ext.models import PlainNet, ShortcutNet
from shortcut_ext.reference import loss_fn
from shortcut_ext.train import (TrainConfig, TrainResult, best_run, dense_hessian, hessian_probes, log_grid,
                                lr_sweep, sharpness, spectrum_probes, train)


@pytest.fixture(scope="module")
def teacher():
    X, Y = synthetic_teacher(64, 4, seed=0, noise=0.1)
    return X, Y, best_linear_loss(X, Y)


def _interrupt_at(epoch: int, *args, **kwargs) -> None:
    """``train(*args, **kwargs)`` stopped by a Ctrl-C at ``epoch`` (its checkpoint stays)."""
    def stop(e):
        if e == epoch:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(*args, on_epoch=stop, **kwargs)


def _net(kind="2-shortcut", depth=4, seed=0, mid="identity", backend=None):
    if kind == "2-shortcut":
        return ShortcutNet(4, depth // 2, 2, mid=mid, init="small", seed=seed, dtype=torch.float64, backend=backend)
    return PlainNet(4, depth, activation=mid, init="xavier", seed=seed, dtype=torch.float64, backend=backend)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, match", [
    (dict(epochs=-1), "epochs"), (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(optimizer="lbfgs"), "optimizer"), (dict(batch_size=0), "batch_size"), (dict(loss="l1"), "loss"),
    (dict(probe_every=-2), "probe_every"), (dict(probe_epochs=[-1]), "probe_epochs"),
    (dict(divergence_factor=0.5), "divergence_factor"), (dict(sharpness_every=-1), "sharpness_every"),
    (dict(sharpness_every=True), "sharpness_every"), (dict(sharpness_every=1.5), "sharpness_every"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_log_grid():
    assert log_grid(1e-3, 1, per_decade=1) == [0.001, 0.01, 0.1, 1.0]
    assert len(log_grid(1e-3, 3.16, 2)) == 8
    # ends near a grid point snap to it: the quick grid read 0.00999, 0.0999, 0.999
    assert log_grid(3.16e-3, 3.16, 2) == [0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0, 3.16]
    assert log_grid(2e-3, 2, 2) == [0.002, 0.00632, 0.02, 0.0632, 0.2, 0.632, 2.0]  # from lo, as before
    assert log_grid(0.05, 0.05) == [0.05]
    assert log_grid(0.01, 0.6) == [0.01, 0.0316, 0.1, 0.316] and log_grid(0.001, 0.0019) == [0.001]  # not past hi
    with pytest.raises(ValueError):
        log_grid(1, 0.1)


# --------------------------------------------------------------------------- training
def test_gd_decreases_loss_on_linear_teacher(teacher):
    X, Y, l_min = teacher
    net = _net("2-shortcut", depth=4)
    res = train(net, (X, Y), TrainConfig(epochs=150, lr=0.3), l_min=l_min)
    h = res.history
    assert res.status == "ok" and res.diverged_epoch is None
    assert h["epoch"] == list(range(151))
    assert res.final_loss == h["loss"][-1]
    assert res.final_loss < 0.05 * h["loss"][0]
    assert 0 <= res.final_excess < 1e-2 * (h["loss"][0] - l_min)
    np.testing.assert_allclose(h["excess"], np.array(h["loss"]) - l_min)
    # the recorded loss is the loss of the weights at that epoch; the final one is the trained net's
    with torch.no_grad():
        assert float(loss_fn("mse", net(X), Y)) == pytest.approx(res.final_loss, rel=1e-12)
    assert h["weight_norm"][-1] == pytest.approx(net.mean_frobenius_norm())
    # gradient norm: the norm of the full-batch gradient at the final weights
    L = loss_fn("mse", net(X), Y)
    (g,) = torch.autograd.grad(L, net.weight)
    assert h["grad_norm"][-1] == pytest.approx(float(g.norm()), rel=1e-9)


def test_gd_is_plain_gradient_descent(teacher):
    """One epoch of "gd" is w <- w - lr * grad, exactly."""
    X, Y, _ = teacher
    net = _net("plain", depth=3)
    w0 = net.weight.detach().clone()
    L = loss_fn("mse", net(X), Y)
    (g,) = torch.autograd.grad(L, net.weight)
    train(net, (X, Y), TrainConfig(epochs=1, lr=0.05))
    torch.testing.assert_close(net.weight.detach(), w0 - 0.05 * g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("opt, extra", [("sgd", dict(batch_size=16, momentum=0.5)), ("adam", dict(batch_size=None))])
def test_sgd_and_adam_options(teacher, opt, extra):
    X, Y, l_min = teacher
    res = train(_net("2-shortcut"), (X, Y), TrainConfig(epochs=60, lr=0.01 if opt == "adam" else 0.05, optimizer=opt,
                                                        **extra), l_min=l_min)
    assert res.status == "ok"
    assert res.final_loss < 0.5 * res.history["loss"][0]


def test_compressed_data_gives_the_same_trajectory(teacher):
    X, Y, l_min = teacher
    r1 = train(_net("plain", depth=3), (X, Y), TrainConfig(epochs=30, lr=0.1), l_min=l_min)
    r2 = train(_net("plain", depth=3), second_moment_compress(X, Y), TrainConfig(epochs=30, lr=0.1), l_min=l_min)
    np.testing.assert_allclose(r1.history["loss"], r2.history["loss"], rtol=1e-9)


@pytest.mark.skipif(not shortcut_ext.is_built(), reason="fused kernels not built")
@pytest.mark.parametrize("kind, mid", [("2-shortcut", "relu"), ("plain", "tanh")])
def test_fused_and_torch_backends_train_alike(teacher, kind, mid):
    X, Y, l_min = teacher
    r = [train(_net(kind, depth=6, mid=mid, backend=b), (X, Y), TrainConfig(epochs=40, lr=0.1), l_min=l_min)
         for b in ("fused", "torch")]
    np.testing.assert_allclose(r[0].history["loss"], r[1].history["loss"], rtol=1e-8)
    np.testing.assert_allclose(r[0].history["grad_norm"], r[1].history["grad_norm"], rtol=1e-6)


def test_divergence_is_recorded_not_raised(teacher):
    X, Y, l_min = teacher
    res = train(_net("plain", depth=6), (X, Y), TrainConfig(epochs=200, lr=1e3), l_min=l_min)
    assert res.status == "diverged"
    assert res.final_loss == math.inf and res.diverged_epoch is not None and res.diverged_epoch < 200
    assert len(res.history["epoch"]) == res.diverged_epoch + 1
    d = res.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON: nan became null, inf the string "inf"
    assert d["final_loss"] == "inf" and d["status"] == "diverged"
    back = TrainResult.from_dict(d)
    assert back.final_loss == math.inf and back.status == "diverged"
    # NaN weights from the start are a diverged run too
    net = _net("plain", depth=2)
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    assert train(net, (X, Y), TrainConfig(epochs=5, lr=0.1)).status == "diverged"


def test_to_dict_thins_history(teacher):
    X, Y, _ = teacher
    res = train(_net(), (X, Y), TrainConfig(epochs=100, lr=0.1))
    ep = res.to_dict(max_points=20)["history"]["epoch"]
    assert ep[0] == 0 and ep[-1] == 100 and len(ep) <= 20 and ep == sorted(set(ep))
    assert {1, 2, 3, 5, 8, 56, 67, 78} <= set(ep)  # log-spaced (early dynamics) and evenly spaced epochs


# --------------------------------------------------------------------------- Hessian probes
def test_probes_and_operator_say_they_do_not_see_hooks_or_an_own_forward(teacher):
    """The probes and HessianOperator rebuild the net from its weights: a subclass's forward or a forward
    hook changed model(x), which training used, and not the probed Hessian, without a word."""
    from shortcut_ext.curvature import HessianOperator
    from shortcut_ext.models import ForwardNotSeenWarning

    class Scaled(ShortcutNet):
        def forward(self, x):
            return 2.0 * super().forward(x)

    X, Y = teacher[0][:16].double(), teacher[1][:16].double()
    kw = dict(width=X.shape[1], units=2, shortcut=2, mid="tanh", init="xavier", dtype=torch.float64)
    with pytest.warns(ForwardNotSeenWarning, match="Scaled overrides forward, which they do not see"):
        train_mod.train(Scaled(**kw), (X, Y), epochs=1, lr=1e-3, probe_epochs=[0])
    # a run with the sharpness alone says it once, at the call, not once per epoch from the operator
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        train_mod.train(Scaled(**kw), (X, Y), epochs=5, lr=1e-3, sharpness_every=1)
    said = [w for w in seen if issubclass(w.category, ForwardNotSeenWarning)]
    assert len(said) == 1 and "the Hessian probes (and the sharpness)" in str(said[0].message), [str(w.message) for w in said]
    plain = ShortcutNet(**kw)
    handle = plain.register_forward_hook(lambda m, a, out: 2 * out)
    with pytest.warns(ForwardNotSeenWarning, match="HessianOperator differentiates .* the model has forward hooks"):
        HessianOperator(plain, (X, Y))
    handle.remove()

    class OwnHead(ShortcutNet):
        def read(self, h):
            return torch.tanh(h)

    with pytest.warns(ForwardNotSeenWarning, match="OwnHead overrides read"):
        HessianOperator(OwnHead(**kw), (X, Y))
    patched = ShortcutNet(**kw)
    patched.forward = lambda x: 2 * ShortcutNet.forward(patched, x)
    with pytest.warns(ForwardNotSeenWarning, match="the model's forward is replaced on the instance"):
        HessianOperator(patched, (X, Y))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: out)
    try:
        with pytest.warns(ForwardNotSeenWarning, match="torch.nn has global forward hooks"):
            HessianOperator(plain, (X, Y))
    finally:
        handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForwardNotSeenWarning)
        HessianOperator(plain, (X, Y))
        train_mod.train(plain, (X, Y), epochs=1, lr=1e-3, probe_epochs=[0])
        train_mod.train(Scaled(**kw), (X, Y), epochs=1, lr=1e-3)  # no probes: nothing to say


def test_a_torch_backend_model_is_probed_without_the_fused_kernels(teacher, monkeypatch):
    """--backend torch (a cross-check of the fused kernels) still computed its Hessian probes with the
    fused HVP kernel it meant to check."""
    import shortcut_ext.ops as ops_mod

    def no_fused(*a, backend=None, **k):
        assert backend != "fused", "the fused HVP ran for a backend='torch' model"
        return orig(*a, backend=backend, **k)

    orig = ops_mod.residual_stack_hvp
    monkeypatch.setattr(ops_mod, "residual_stack_hvp", no_fused)
    X, Y = teacher[0][:16].double(), teacher[1][:16].double()
    kw = dict(width=X.shape[1], units=2, shortcut=2, mid="tanh", init="xavier", dtype=torch.float64)
    for exact in (4000, 8):  # dense and Lanczos + SLQ probes
        r = train_mod.train(ShortcutNet(**kw, backend="torch"), (X, Y), epochs=1, lr=1e-3, probe_epochs=[0],
                            exact_max_params=exact)
        assert math.isfinite(r.probes[0]["lam_max"])
    from shortcut_ext.curvature.hessian import fused_hvp_available

    if fused_hvp_available():  # the check above can fail
        with pytest.raises(AssertionError, match="the fused HVP ran"):
            train_mod.train(ShortcutNet(**kw, backend="fused"), (X, Y), epochs=1, lr=1e-3, probe_epochs=[0])


def test_the_operators_fallback_warning_is_said_once_per_run(teacher, monkeypatch):
    """Each probe entered catch_warnings, which resets the registry of warnings already shown: the operator's
    autograd-fallback warning came once per probe (11 times for 11 probes).  (The operator falls back here
    as where the fused HVP kernel is not built.)"""
    import shortcut_ext.curvature.hessian as hessian_mod

    monkeypatch.setattr(hessian_mod, "fused_hvp_available", lambda: False)
    X = teacher[0][:16].double()
    Y = torch.randn(16, 3, dtype=torch.float64)
    net = ShortcutNet(width=X.shape[1], units=2, shortcut=2, init="xavier", dtype=torch.float64, out_features=3)
    for hooked in (False, True):  # with a hook, the probes entered catch_warnings (it resets the registry)
        handle = net.register_forward_hook(lambda m, a, out: out) if hooked else None
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("default")
            train_mod.train(net, (X, Y), epochs=5, lr=1e-3, probe_every=1)
        assert sum("runs autograd Hessian-vector products" in str(w.message) for w in got) == 1
        assert sum("do not see" in str(w.message) for w in got) == (1 if hooked else 0)
        if handle is not None:
            handle.remove()


def test_train_refuses_a_parametrized_weight(teacher):
    """Under a parametrization model.weight is recomputed each forward: gd failed with autograd's "not used
    in the graph", adam with "can't optimize a non-leaf", and inside parametrize.cached() the run "trained"
    a temporary and left the model as it was."""
    import torch.nn.utils.parametrize as parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    X, Y = teacher[0][:16], teacher[1][:16]
    net = ShortcutNet(width=X.shape[1], units=2, shortcut=2, init="xavier")
    parametrize.register_parametrization(net, "weight", Double())
    for opt in ("gd", "adam"):
        with pytest.raises(ValueError, match="model.weight must be a leaf tensor .*parametriz"):
            train_mod.train(net, (X, Y), epochs=1, lr=1e-3, optimizer=opt)
    with parametrize.cached(), pytest.raises(ValueError, match="model.weight must be a leaf tensor"):
        train_mod.train(net, (X, Y), epochs=1, lr=1e-3)


def test_spectrum_probes_definitions():
    ev = np.array([-3.0, -1.0, 0.5, 1.0, 2.0, 2.0, 4.0, 6.0, 8.0, 12.0])
    p = spectrum_probes(ev)
    assert p["lam_max"] == 12.0
    assert p["lam_q10"] == 0.5  # the 10th percentile of |lambda| (inverted CDF)
    assert p["index"] == 0.2
    assert p["cond"] == 24.0 and p["cond_q10"] == 24.0
    assert p["lam_top"] == 12.0
    n = spectrum_probes([-9.0, 1.0, 2.0])  # the largest |lambda| is negative: lam_top keeps the sign
    assert (n["lam_max"], n["lam_top"]) == (9.0, 2.0)
    z = spectrum_probes([0.0, 0.0])
    assert math.isnan(z["cond"]) and z["index"] == 0.0
    assert spectrum_probes([0.0, 1.0])["cond"] == math.inf


@pytest.mark.parametrize("kind, mid", [("2-shortcut", "identity"), ("2-shortcut", "tanh"), ("plain", "identity")])
def test_dense_hessian_matches_autograd(kind, mid):
    X, Y = synthetic_teacher(12, 4, seed=1)
    net = _net(kind, depth=2, seed=3, mid=mid)
    with torch.no_grad():
        net.weight.mul_(20)  # away from the zero point
    w0 = net.weight.detach().reshape(-1).clone()
    ref = torch.autograd.functional.hessian(lambda w: loss_fn("mse", net.forward_with(w, X, backend="torch"), Y), w0)
    torch.testing.assert_close(dense_hessian(net, (X, Y)), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use_fallback", [True, False])
def test_probes_at_zero_match_theorem_1(use_fallback):
    """2-shortcut linear net at zero: cond = sigma_max(M) / sigma_min(M), index 1/2, any number of units."""
    probe = train_mod._dense_probes if use_fallback else train_mod.hessian_probes
    X, Y = synthetic_teacher(40, 4, seed=5, noise=0.2)
    M = (X.T @ X - Y.T @ X) / X.shape[0]
    s = torch.linalg.svdvals(M)
    for units in (1, 3):
        net = ShortcutNet(4, units, 2, init="zero", dtype=torch.float64)
        p = probe(net, (X, Y), "mse", 4000)
        assert p["cond"] == pytest.approx(float(s.max() / s.min()), rel=1e-8)
        assert p["lam_max"] == pytest.approx(float(s.max()), rel=1e-8)
        assert p["index"] == pytest.approx(0.5)


def test_fallback_agrees_with_curvature_module():
    pytest.importorskip("shortcut_ext.curvature.condition")
    X, Y = synthetic_teacher(30, 4, seed=2)
    net = PlainNet(4, 3, init="xavier", seed=1, dtype=torch.float64)
    a = hessian_probes(net, (X, Y), "mse", 4000)
    b = train_mod._dense_probes(net, (X, Y), "mse", 4000)
    for k in ("lam_max", "lam_q10", "index", "cond_q10"):
        assert a[k] == pytest.approx(b[k], rel=1e-7), k


def test_fallback_skips_large_nets():
    X, Y = synthetic_teacher(10, 4)
    p = train_mod._dense_probes(_net("plain", depth=4), (X, Y), "mse", exact_max_params=10)
    assert math.isnan(p["lam_max"]) and p["method"].startswith("skipped")


def test_probes_along_training(teacher):
    X, Y, l_min = teacher
    res = train(_net("2-shortcut", depth=4), (X, Y), TrainConfig(epochs=20, lr=0.3, probe_every=10), l_min=l_min)
    assert [p["epoch"] for p in res.probes] == [0, 10, 20]
    assert res.probes[0]["index"] == pytest.approx(0.5, abs=0.05)  # near the zero saddle
    assert all(p["loss"] == res.history["loss"][p["epoch"]] for p in res.probes)
    res = train(_net("plain", depth=2), (X, Y), TrainConfig(epochs=10, lr=0.1, probe_epochs=[3, 0, 3]))
    assert [p["epoch"] for p in res.probes] == [0, 3]


def test_probes_of_the_hessians_parts(teacher):
    """probe_parts: the Gauss-Newton part, the rest and the empirical Fisher, probed beside the Hessian at the same
    weights, equal the dense references' spectra; near the zero saddle the Hessian is all functional part, G ~ 0."""
    from shortcut_ext.curvature import dense_empirical_fisher_func, dense_ggn_func, dense_hessian_func

    X, Y, l_min = teacher
    net = _net("2-shortcut", depth=4)
    res = train(net, (X, Y), TrainConfig(epochs=8, lr=0.3, probe_epochs=[0, 8],
                                         probe_parts=["functional", "empirical_fisher", "ggn"]))
    p0, p = res.probes
    assert p0["ggn_lam_max"] < 1e-3 * p0["functional_lam_max"]
    assert p0["empirical_fisher_lam_max"] < 1e-2 * p0["functional_lam_max"]  # J ~ 0 there too
    H = dense_hessian_func(net, (X, Y))
    G = dense_ggn_func(net, (X, Y))
    Fe = dense_empirical_fisher_func(net, (X, Y))
    for part, D in (("ggn", G), ("functional", H - G), ("empirical_fisher", Fe)):
        ev = torch.linalg.eigvalsh(D)
        assert p[f"{part}_lam_max"] == pytest.approx(float(ev.abs().max()), rel=1e-9)
        assert p[f"{part}_method"] == "exact"
    assert p["ggn_index"] == 0 and p["empirical_fisher_index"] == 0 and p["functional_index"] > 0
    assert TrainConfig(probe_parts=["empirical_fisher", "ggn"]).probe_parts == ("ggn", "empirical_fisher")
    assert "probe_parts" not in TrainConfig().to_dict()  # the default: earlier versions' keys and checkpoints
    assert TrainConfig(probe_parts="ggn").probe_parts == ("ggn",)
    for bad in (["gn"], 3, ["ggn", None]):
        with pytest.raises(ValueError, match=r"probe_parts must be a sequence of \('ggn', 'functional', "
                                              r"'empirical_fisher'\)"):
            TrainConfig(probe_parts=bad)


# --------------------------------------------------------------------------- sweeps, checkpoints, resume
def test_best_run_picks_lowest_final_loss():
    rs = [TrainResult("ok", 0.1, 10, 0.5, None), TrainResult("diverged", 1.0, 10, math.inf, None),
          TrainResult("ok", 0.3, 10, 0.2, None), TrainResult("ok", 0.01, 10, 0.2, None)]
    assert best_run(rs).lr == 0.3
    assert best_run([rs[1]]) is None
    assert best_run([r.to_dict() for r in rs])["lr"] == 0.3


def test_lr_sweep_records_divergence_and_picks_best(teacher):
    X, Y, l_min = teacher
    best, runs = lr_sweep(lambda: _net("plain", depth=4), (X, Y), [0.01, 0.1, 1e3], TrainConfig(epochs=40),
                          l_min=l_min)
    assert [r.status for r in runs] == ["ok", "ok", "diverged"]
    assert best.lr == 0.1 and best.final_loss == min(r.final_loss for r in runs)


def test_store_tolerates_partial_line(tmp_path):
    p = tmp_path / "runs.jsonl"
    s = RunStore(p)
    s.put("a", {"x": 1.0, "bad": float("nan")})
    with open(p, "a") as f:
        f.write('{"key": "b", "record": {"x": ')  # an interrupted write
    s2 = RunStore(p)
    assert s2.get("a") == {"x": 1.0, "bad": None} and "b" not in s2 and s2.skipped_lines == 1
    s2.put("c", {"x": 3})
    s3 = RunStore(p)
    assert s3.keys() == ["a", "c"] and s3.skipped_lines == 1


def test_interrupted_sweep_resumes_without_redoing_runs(teacher, tmp_path, monkeypatch):
    X, Y, l_min = teacher
    lrs = [0.01, 0.03, 0.1, 0.3, 1e3]
    cfg = TrainConfig(epochs=30)
    make = lambda: _net("2-shortcut", depth=4)  # noqa: E731
    real_train = train_mod.train
    calls = []

    def crashing(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the machine stops in the middle of the 4th run
        calls.append(a[2].lr)
        return real_train(*a, **k)

    monkeypatch.setattr(train_mod, "train", crashing)
    store = RunStore(tmp_path / "runs.jsonl")
    with pytest.raises(KeyboardInterrupt):
        lr_sweep(make, (X, Y), lrs, cfg, l_min=l_min, store=store, key="sweep|test")
    assert calls == [0.01, 0.03, 0.1] and len(RunStore(tmp_path / "runs.jsonl")) == 3

    calls.clear()
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: (calls.append(a[2].lr), real_train(*a, **k))[1])
    store = RunStore(tmp_path / "runs.jsonl")  # a new process reads what the first one finished
    best, runs = lr_sweep(make, (X, Y), lrs, cfg, l_min=l_min, store=store, key="sweep|test")
    assert calls == [0.3, 1e3]  # only the unfinished runs are trained
    assert [r.lr for r in runs] == lrs and runs[-1].status == "diverged"
    # the resumed sweep equals an uninterrupted one
    monkeypatch.setattr(train_mod, "train", real_train)
    best2, runs2 = lr_sweep(make, (X, Y), lrs, cfg, l_min=l_min)
    assert best.lr == best2.lr
    np.testing.assert_allclose([r.final_loss for r in runs[:4]], [r.final_loss for r in runs2[:4]], rtol=1e-12)
    calls.clear()
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: (calls.append(a[2].lr), real_train(*a, **k))[1])
    lr_sweep(make, (X, Y), lrs, cfg, l_min=l_min, store=RunStore(tmp_path / "runs.jsonl"), key="sweep|test")
    assert calls == []  # everything done: nothing retrained


def test_targets_checked_against_the_model():
    X, Y = torch.randn(20, 4), torch.randn(20, 3)
    mk = lambda: shortcut_ext.ShortcutNet(width=6, units=2, in_features=4, out_features=3, backend="torch")  # noqa: E731
    cases = [
        ((X, Y[:, :1]), "mse", r"Y must be a float tensor of shape \[m, 3\] = \[20, 3\].*got \[20, 1\]"),
        ((X, Y[:, 0]), "mse", r"got \[20\] float32"),
        ((X[:, :3], Y), "mse", r"X must have shape \[m, 4\]"),
        ((X, torch.full((20,), 4)), "cross_entropy", r"class indices must lie in \[0, 3\).*\[4, 4\]"),
        ((X, Y[:, 0]), "cross_entropy", r"class-index targets Y \[m\] must be integers, got float32"),
        ((X[:0], Y[:0]), "mse", r"at least one sample"),
    ]
    for data, loss, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            train_mod.train(mk(), data, epochs=2, lr=0.1, loss=loss)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got True"):
        train_mod.train(mk(), (X, Y), epochs=2, lr=True)
    r = train_mod.train(mk(), (X, torch.randint(0, 3, (20,))), epochs=2, lr=0.1, loss="cross_entropy")
    assert r.status == "ok"


# --------------------------------------------------------------------------- QA round 6 regressions
def test_interrupted_train_call_resumes_when_called_again(teacher, tmp_path):
    """The same ``train(net, ..., checkpoint=ck)`` call after a Ctrl-C resumes: the weights are put back as
    at the call (they used to stay half-trained, so the fingerprint no longer matched and the run restarted
    from trained weights, labelled epoch 0)."""
    X, Y, l_min = teacher
    cfg = TrainConfig(epochs=30, lr=0.1)
    ref = train(_net(), (X, Y), cfg, l_min=l_min)
    net, ck = _net(), tmp_path / "run.ckpt.pt"
    w0 = net.weight.detach().clone()

    _interrupt_at(17, net, (X, Y), cfg, l_min=l_min, checkpoint=ck, checkpoint_every=5, checkpoint_every_s=0)
    assert torch.equal(net.weight, w0)
    notes = []
    res = train(net, (X, Y), cfg, l_min=l_min, checkpoint=ck, checkpoint_every=5, checkpoint_every_s=0,
                log=notes.append)
    assert notes and notes[0].startswith("resuming from epoch 15")
    assert res.final_loss == ref.final_loss and res.history["loss"] == ref.history["loss"]


def test_resume_under_another_thread_count_says_so(teacher, tmp_path):
    """A checkpoint written with 2 CPU threads resumed with 1: the run resumes (the numbers agree to
    rounding) and says it is not bit for bit, naming the thread count that would be; the same count says
    nothing."""
    X, Y, l_min = teacher
    cfg = TrainConfig(epochs=12, lr=0.1)
    net, ck = _net(), tmp_path / "run.ckpt.pt"
    ref = train(_net(), (X, Y), cfg, l_min=l_min)

    def stop(epoch):
        if epoch == 7:
            raise KeyboardInterrupt

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(KeyboardInterrupt):
            train(net, (X, Y), cfg, l_min=l_min, checkpoint=ck, checkpoint_every=5, checkpoint_every_s=0,
                  on_epoch=stop)
        torch.set_num_threads(1)
        notes = []
        res = train(net, (X, Y), cfg, l_min=l_min, checkpoint=ck, checkpoint_every=5, checkpoint_every_s=0,
                    log=notes.append)
    finally:
        torch.set_num_threads(before)
    assert notes[0].startswith("resuming from epoch 5"), notes
    assert len(notes) == 2 and "written with 2 CPU threads" in notes[1] and "OMP_NUM_THREADS=2" in notes[1], notes
    assert res.final_loss == pytest.approx(ref.final_loss, rel=1e-4)


@pytest.mark.parametrize("change", ["rounding", "one sample"])
def test_data_rounded_differently_resumes_and_other_data_does_not(teacher, tmp_path, change):
    """Data prepared under another BLAS thread count (MNIST's whitening; torchrun sets OMP_NUM_THREADS=1)
    differ in their last bits: the exact hash called the checkpoint "of another run (data)" and the run
    started afresh. Data equal to rounding resume with a note; a changed sample still starts afresh."""
    X, Y, l_min = teacher
    cfg, ck = TrainConfig(epochs=12, lr=0.1), tmp_path / "d.ckpt.pt"

    _interrupt_at(7, _net(), (X, Y), cfg, l_min=l_min, checkpoint=ck, checkpoint_every=5, checkpoint_every_s=0)
    X2 = X.clone()
    if change == "rounding":  # a few ulps, as another reduction order gives
        X2 = X2 * (1 + 4e-16 * torch.randn(X.shape, generator=torch.Generator().manual_seed(1), dtype=X.dtype))
        assert not torch.equal(X2, X)
    else:
        X2[3] += 0.05
    l_min2 = best_linear_loss(X2, Y)
    notes = []
    res = train(_net(), (X2, Y), cfg, l_min=l_min2, checkpoint=ck, checkpoint_every=5, checkpoint_every_s=0,
                log=notes.append)
    if change == "rounding":
        assert "agree with those of the checkpoint" in notes[0] and notes[1].startswith("resuming from epoch 5")
        assert res.final_loss == pytest.approx(train(_net(), (X, Y), cfg, l_min=l_min).final_loss, rel=1e-9)
    else:
        assert len(notes) == 1 and "is of another run (it differs in: data or probe data" in notes[0], notes


def test_checkpoint_of_other_probe_data_is_not_resumed(teacher, tmp_path):
    X, Y, l_min = teacher
    cfg = TrainConfig(epochs=12, lr=0.1, probe_every=3)
    ck = tmp_path / "p.ckpt.pt"

    _interrupt_at(7, _net(), (X, Y), cfg, l_min=l_min, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0)
    other = (X[:40], Y[:40])
    with pytest.warns(UserWarning, match="is of another run"):
        res = train(_net(), (X, Y), cfg, l_min=l_min, probe_data=other, checkpoint=ck, checkpoint_every=1,
                    checkpoint_every_s=0)
    fresh = train(_net(), (X, Y), cfg, l_min=l_min, probe_data=other)
    assert [p["lam_max"] for p in res.probes] == [p["lam_max"] for p in fresh.probes]


def test_checkpoint_of_another_format_is_named_as_such(teacher, tmp_path):
    """A checkpoint written by the previous version (format 1: a fingerprint of sums) was called 'of another
    run (it differs in: data, initial weights)' though it was the same run."""
    X, Y, l_min = teacher
    cfg, ck = TrainConfig(epochs=6, lr=0.1), tmp_path / "f.ckpt.pt"

    _interrupt_at(3, _net(), (X, Y), cfg, l_min=l_min, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0)
    state = torch.load(ck, weights_only=True)
    torch.save(dict(state, format=1), ck)
    notes = []
    train(_net(), (X, Y), cfg, l_min=l_min, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, log=notes.append)
    assert len(notes) == 1 and "written by another version of shortcut_ext (checkpoint format 1" in notes[0]


@pytest.mark.parametrize("change", ["projection", "shuffled targets"])
def test_checkpoint_of_other_projections_or_data_order_is_not_resumed(tmp_path, change):
    """The fingerprint saw the data by sums and the model by weight sums: a zero-init net with another
    seed's input projection, or the same targets shuffled, resumed the other run's checkpoint."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(20, 6, generator=g), torch.randn(20, 4, generator=g)
    Y2 = Y[torch.randperm(20, generator=g)] if change == "shuffled targets" else Y
    seed2 = 1 if change == "projection" else 0
    mk = lambda seed: ShortcutNet(width=4, units=3, shortcut=1, init="zero", seed=seed, in_features=6)  # noqa: E731
    cfg, ck = TrainConfig(epochs=12, lr=0.05), tmp_path / "c.ckpt.pt"

    _interrupt_at(7, mk(0), (X, Y), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0)
    with pytest.warns(UserWarning, match="is of another run"):
        res = train(mk(seed2), (X, Y2), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0)
    fresh = train(mk(seed2), (X, Y2), cfg)
    assert res.history["loss"] == fresh.history["loss"]


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_train_under_autocast_inference_mode_and_frozen_weights(backend):
    """Under torch.autocast train()'s backward ran the read-out and the torch backend in bfloat16 (the
    gradient norm moved in the 4th digit); inference mode and a frozen weight gave raw autograd errors.
    With the fused backend, the direct step (no autograd through the stack) keeps the head out of autocast too."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    mk = lambda: ShortcutNet(width=4, units=3, shortcut=2, mid="tanh", init="small", in_features=6,  # noqa: E731
                             out_features=3, backend=backend)
    assert (train_mod._direct_loss_and_grad(mk(), "mse") is not None) == (backend == "fused")
    ref = train(mk(), (X, Y), epochs=3, lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = train(mk(), (X, Y), epochs=3, lr=0.1, probe_every=3)
    assert res.history["grad_norm"] == ref.history["grad_norm"] and res.final_loss == ref.final_loss
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"train\(\) needs autograd.*outside inference"):
        train(mk(), (X, Y), epochs=2)
    net = mk()
    net.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="model.weight must be trainable, got requires_grad=False"):
        train(net, (X, Y), epochs=2)


def test_train_config_takes_numpy_scalars():
    """A learning rate or epoch count taken from a numpy grid was refused as 'not a number'."""
    c = TrainConfig(epochs=np.int64(5), lr=np.float32(0.25), optimizer="sgd", batch_size=np.int32(4),
                    momentum=np.float64(0.5), seed=np.uint8(3), divergence_factor=np.int64(10))
    assert (c.epochs, c.lr, c.batch_size, c.momentum, c.seed, c.divergence_factor) == (5, 0.25, 4, 0.5, 3, 10.0)
    assert type(c.epochs) is int and type(c.lr) is float and json.dumps(c.to_dict())
    with pytest.raises(ValueError, match="divergence_factor must be > 1, got 'x'"):
        TrainConfig(divergence_factor="x")
    with pytest.raises(ValueError, match="epochs must be an integer"):
        TrainConfig(epochs=np.float64(5))


def test_unresolved_slq_probes_are_flagged():
    """Above exact_max_params the probes come from SLQ, which cannot resolve a deep plain net's eigenvalues
    near 0 (index 0.89 against the exact 0.32, a finite cond_q10 for a singular Hessian): they are saved
    with resolved = False and the run says so once; exact probes are resolved."""
    from shortcut_ext.data import synthetic_teacher

    X, Y = synthetic_teacher(60, 6, seed=0, noise=0.1)
    data = (X.double(), Y.double())
    notes = []
    res = train(PlainNet(width=6, depth=40, init="xavier", dtype=torch.float64), data, epochs=1, lr=0.01,
                probe_every=1, exact_max_params=1000, log=notes.append)
    assert [p["resolved"] for p in res.probes] == [False, False]
    assert len(notes) == 1 and "could not resolve the eigenvalues near 0" in notes[0] and "exact_max_params" in notes[0]
    exact = train(PlainNet(width=6, depth=40, init="xavier", dtype=torch.float64), data, epochs=0, lr=0.01,
                  probe_every=1, exact_max_params=2000)
    assert exact.probes[0]["resolved"] is True and exact.probes[0]["index_unresolved_mass"] == 0.0


def test_slowly_climbing_runs_are_not_stable():
    from shortcut_ext.experiments.sweeps import is_stable

    kw = dict(epochs=100, l_min=None)
    climbing = TrainResult(status="ok", lr=1.36, final_loss=4.1e6, history={"loss": [4.5, 9.0, 4.1e6]}, **kw)
    falling = TrainResult(status="ok", lr=0.1, final_loss=0.3, history={"loss": [4.5, 1.0, 0.3]}, **kw)
    diverged = TrainResult(status="diverged", lr=3.0, final_loss=math.inf, history={"loss": [4.5]}, **kw)
    assert [is_stable(r) for r in (climbing, falling, diverged)] == [False, True, False]
    # a net stuck at a saddle (gradient 1e-11, loss 0.5 from start to end) did count as stable at every rate
    stuck = TrainResult(status="ok", lr=3.16, final_loss=0.5, history={"loss": [0.5, 0.5, 0.5]}, **kw)
    assert not is_stable(stuck)


def test_compression_and_l_min_stay_exact_on_badly_scaled_data():
    """Targets 1e6 times the inputs: the second-moment matrix's input block fell below its eigenvalue
    cut (L_min 9.47e10 became 1e-18); an ill-conditioned X lost L_min's accuracy through pinv(S_xx)."""
    X, Y = synthetic_teacher(300, 5, seed=1, noise=0.2)
    for s in (1e5, 1e6):
        Xc, Yc = second_moment_compress(X, Y * s)
        assert best_linear_loss(Xc, Yc) == pytest.approx(best_linear_loss(X, Y * s), rel=1e-9)
        torch.testing.assert_close(Xc.T @ Xc / Xc.shape[0], X.T @ X / X.shape[0], rtol=1e-10, atol=1e-12)
    x = X.numpy().copy()
    x[:, 0] *= 1e-5
    x[:, 2] *= 1e5
    w, *_ = np.linalg.lstsq(x, Y.numpy(), rcond=None)
    want = 0.5 * float(((Y.numpy() - x @ w) ** 2).sum()) / x.shape[0]
    assert best_linear_loss(torch.as_tensor(x), Y) == pytest.approx(want, rel=1e-10)


def test_non_finite_data_and_bad_configs_are_refused(teacher):
    X, Y, _ = teacher
    Xn = X.clone()
    Xn[3, 1] = float("nan")
    with pytest.raises(ValueError, match="data: X must be finite"):
        train(_net(), (Xn, Y), TrainConfig(epochs=2))
    with pytest.raises(ValueError, match="probe_data: Y must be finite"):
        train(_net(), (X, Y), TrainConfig(epochs=2), probe_data=(X, Y * float("inf")))
    for kw, msg in (({"momentum": float("nan"), "optimizer": "sgd"}, "momentum must be a finite number"),
                    ({"momentum": "a", "optimizer": "sgd"}, "momentum must be a finite number"),
                    ({"momentum": 0.9}, "momentum needs optimizer 'sgd'"),
                    ({"batch_size": 8}, "batch_size needs optimizer 'sgd' or 'adam'"),
                    ({"batch_size": True, "optimizer": "sgd"}, "batch_size must be None or an integer"),
                    ({"exact_max_params": "x"}, "exact_max_params must be an integer"),
                    ({"seed": 1.5}, "seed must be an integer"), ({"seed": 2**70}, "seed must be an integer"),
                    ({"probe_every": True}, "probe_every must be an integer"),
                    ({"probe_epochs": [2.7]}, "probe_epochs must hold integers"),
                    ({"probe_epochs": 5}, "probe_epochs must be a sequence")):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**kw)


def test_stochastic_probes_follow_the_seed():
    """Above exact_max_params the probes are Lanczos + SLQ: their random vectors used to be seed 0's in
    every run, so seed-averaged cond_q10 / index kept the probes' error; train passes its seed."""
    from shortcut_ext.train import hessian_probes

    net = ShortcutNet(4, 6, shortcut=2, init="xavier", seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g, dtype=torch.float64))
    a, b, c = (hessian_probes(net, data, exact_max_params=0, seed=s) for s in (0, 0, 1))
    assert a["method"].startswith("lanczos") and a["index"] == b["index"] and a["lam_q10"] == b["lam_q10"]
    assert (a["index"], a["lam_q10"]) != (c["index"], c["lam_q10"])


def test_targets_with_history_and_inference_data_train_alike(teacher):
    """Targets from a teacher net that were not detached made the fused probes NaN ("Can't call numpy() on
    Tensor that requires grad") while status said ok; data made under torch.inference_mode trained on the
    fused backend but failed on the torch backend ("Inference tensors cannot be saved for backward")."""
    X = teacher[0][:16].double()
    head = torch.nn.Linear(X.shape[1], X.shape[1], dtype=torch.float64)
    Y = head(X)  # requires grad: a teacher's output
    with torch.inference_mode():
        Xi, Yi = X.clone(), Y.detach().clone()
    kw = dict(width=X.shape[1], units=2, shortcut=2, mid="tanh", init="xavier", dtype=torch.float64)
    got = {}
    for backend in ("fused", "torch"):
        for name, data in (("history", (X, Y)), ("inference", (Xi, Yi))):
            r = train_mod.train(ShortcutNet(**kw, backend=backend), data, epochs=2, lr=1e-3, probe_epochs=[1],
                                exact_max_params=8)  # Lanczos + SLQ probes: they call numpy()
            assert r.status == "ok" and not r.probes[0]["method"].startswith("failed"), r.probes[0]["method"]
            got[backend, name] = r
    assert head.weight.grad is None  # the run did not backpropagate into the teacher
    H = dense_hessian(ShortcutNet(**kw), (X, Y))  # the probes' dense fallback, public: it kept the history too
    assert not H.requires_grad and H.numpy().shape == (H.shape[0], H.shape[0])
    for name in ("history", "inference"):
        a, b = got["fused", name], got["torch", name]
        assert a.final_loss == pytest.approx(b.final_loss, rel=1e-12)
        assert a.probes[0]["lam_max"] == pytest.approx(b.probes[0]["lam_max"], rel=1e-6)


def test_divergence_rule_is_factor_times_initial_loss(teacher):
    """Not pinned: the divergence rule's threshold itself, ``L > divergence_factor * max(L0, 1)``.  Every
    divergence test overshot it by orders of magnitude, so a threshold ten times higher passed.  Here one
    GD step (lr 1.5, L0 = 3.68) gives L1 = 42.9 = 11.65 * max(L0, 1), computed independently by hand: factor
    3 (L1 between 3x and 30x L0) and 11 (just below) diverge at epoch 1, 12 (just above) stays ok."""
    X, Y, _ = teacher

    def net():
        return PlainNet(4, 3, init="xavier", seed=0, dtype=torch.float64, backend="torch")

    ref = net()
    w0 = ref.weight.detach().clone()
    L0 = loss_fn("mse", ref(X), Y)
    (g,) = torch.autograd.grad(L0, ref.weight)
    L0 = float(L0.detach())
    L1 = float(loss_fn("mse", ref.forward_with(w0 - 1.5 * g, X), Y).detach())
    ratio = L1 / max(L0, 1.0)
    assert L0 > 1.0 and 11.2 < ratio < 11.9
    for factor, status in ((3.0, "diverged"), (11.0, "diverged"), (12.0, "ok")):
        res = train(net(), (X, Y), TrainConfig(epochs=1, lr=1.5, divergence_factor=factor))
        assert res.status == status, factor
        assert res.history["loss"][:2] == pytest.approx([L0, L1], rel=1e-12)
        assert res.diverged_epoch == (1 if status == "diverged" else None)


def test_spectrum_probes_zero_tolerance_scales_with_the_size():
    """Not pinned: the zero tolerance ``P * eps * |lambda|max`` of ``spectrum_probes`` (train's fallback
    probes), with its factor ``P``.  A rank-deficient PSD Hessian's zero eigenvalues come out of eigvalsh as
    rounding of either sign, up to a few ``eps * |lambda|max``; without the factor ``P`` about one in ten of
    them counted as negative.  Reference: the construction, rank 200 of 300 with eigenvalues in [1, 10]
    (index 0, singular)."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    H = U[:, :200] @ torch.diag(torch.linspace(1, 10, 200, dtype=torch.float64)) @ U[:, :200].T
    ev = torch.linalg.eigvalsh(H)
    assert float((ev < 0).double().mean()) > 0.05  # the rounding the tolerance must absorb
    p = spectrum_probes(ev)
    assert p["index"] == 0.0 and p["cond"] == math.inf and p["cond_q10"] == math.inf
    assert p["lam_max"] == pytest.approx(10.0, rel=1e-12)


def test_cross_entropy_one_hot_probabilities_match_class_indices():
    """Not tested: train() with cross-entropy *probability* targets Y [m, q] (only class indices were
    trained).  One-hot probabilities are the same targets as the indices, so the loss history, the gradient
    norms and the Hessian probes must agree with the index run to rounding; a soft target (rows of a
    softmax) trains too, and its initial loss is the reference's soft cross-entropy."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 6, (40,), generator=g)
    onehot = torch.nn.functional.one_hot(lab, 6).double()

    def net():
        return ShortcutNet(6, 3, 2, mid="tanh", init="small", seed=1, dtype=torch.float64)

    kw = dict(epochs=5, lr=0.5, loss="cross_entropy", probe_epochs=[0, 5])
    a, b = train(net(), (X, lab), **kw), train(net(), (X, onehot), **kw)
    assert a.status == b.status == "ok"
    for k in ("loss", "grad_norm", "weight_norm"):
        assert b.history[k] == pytest.approx(a.history[k], rel=1e-12, abs=1e-14), k
    assert a.history["loss"][-1] < a.history["loss"][0]  # it trained
    assert len(a.probes) == len(b.probes) == 2
    for pa, pb in zip(a.probes, b.probes):
        assert not pa["method"].startswith("failed") and pa["method"] == pb["method"]
        for k in ("lam_max", "lam_q10", "index", "cond", "cond_q10"):
            assert pb[k] == pytest.approx(pa[k], rel=1e-9, abs=1e-12), k
    soft = torch.softmax(torch.randn(40, 6, generator=g, dtype=torch.float64), 1)
    model = net()
    L0 = float(-(soft * torch.log_softmax(model(X), 1)).sum(1).mean().detach())
    c = train(model, (X, soft), epochs=2, lr=0.5, loss="cross_entropy")
    assert c.status == "ok" and c.history["loss"][0] == pytest.approx(L0, rel=1e-12)
    with pytest.raises(ValueError, match=r"class indices \[40\] or probabilities \[40, 6\]"):
        train(net(), (X, onehot.long()), epochs=1, lr=0.5, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"probabilities \[40, 6\]"):
        train(net(), (X, onehot[:, :5]), epochs=1, lr=0.5, loss="cross_entropy")


def test_checkpoint_whose_optimizer_state_cannot_be_loaded_is_refused_and_keeps_the_model(tmp_path):
    """Not tested: a checkpoint of the same run whose optimizer state passes the entry checks but that
    ``load_state_dict`` refuses (no parameter groups).  train() raises a ValueError naming the file and how to
    go on (delete it), leaves the model's weights and the file as they were; once deleted, the same call
    gives the uninterrupted run's numbers."""
    X = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg, ck = TrainConfig(epochs=6, lr=0.01, optimizer="adam"), tmp_path / "c.ckpt.pt"

    def net():
        return ShortcutNet(width=3, units=2, shortcut=2, init="xavier", seed=0, dtype=torch.float64)

    _interrupt_at(4, net(), (X, X), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0)
    good = unsigned_checkpoint(ck)  # its entries are damaged below: no checksum (as an earlier version wrote)
    torch.save({**good, "optimizer": {**good["optimizer"], "param_groups": []}}, ck)
    before = ck.read_bytes()
    model = net()
    w0 = model.weight.detach().clone()
    with pytest.raises(ValueError, match=r"c\.ckpt\.pt matches this run but its optimizer or generator state "
                                         r"cannot be loaded .*delete it to start afresh"):
        train(model, (X, X), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0)
    assert torch.equal(model.weight, w0) and ck.read_bytes() == before
    ck.unlink()
    res = train(model, (X, X), cfg, checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0)
    assert res.history["loss"] == train(net(), (X, X), cfg).history["loss"]


def test_a_failing_hessian_probe_is_recorded_and_the_run_goes_on(monkeypatch):
    """Not tested: a Hessian probe that raises (e.g. eigh failing on an overflowed Hessian) is recorded as
    ``method = "failed: <type>: <first line>"`` with nan values, and training goes on: the history equals a
    run without probes bit for bit and the other probes are the real ones."""
    X, Y = synthetic_teacher(32, 4, seed=0, noise=0.1)

    def net():
        return ShortcutNet(width=4, units=2, shortcut=2, init="small", seed=0, dtype=torch.float64)

    real = train_mod.hessian_probes
    calls = []

    def flaky(model, data, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise np.linalg.LinAlgError("Eigenvalues did not converge\nsecond line")
        return real(model, data, *args, **kwargs)

    monkeypatch.setattr(train_mod, "hessian_probes", flaky)
    res = train(net(), (X, Y), epochs=6, lr=0.05, probe_epochs=[0, 3, 6])
    ref = train(net(), (X, Y), epochs=6, lr=0.05, probe_epochs=[0, 6])
    plain = train(net(), (X, Y), epochs=6, lr=0.05)
    assert res.status == "ok" and res.history["loss"] == plain.history["loss"]
    assert [p["epoch"] for p in res.probes] == [0, 3, 6]
    bad = res.probes[1]
    assert bad["method"] == "failed: LinAlgError: Eigenvalues did not converge"
    assert all(math.isnan(bad[k]) for k in ("lam_max", "lam_q10", "index", "cond", "cond_q10"))
    assert bad["loss"] == res.history["loss"][3]
    for got, want in zip((res.probes[0], res.probes[2]), ref.probes):
        assert all(got[k] == want[k] for k in ("lam_max", "lam_q10", "index", "cond", "cond_q10", "method"))
    json.dumps(res.to_dict(), allow_nan=True)  # the failed probe saves


def test_interrupted_run_with_probe_epochs_resumes_bit_for_bit(tmp_path):
    """Not tested: the checkpoint fingerprint of a config with ``probe_epochs`` (TrainConfig.to_dict's list
    conversion) and a resume across a probe epoch.  Interrupted at epoch 4, the rerun resumes (it says so)
    and ends with the uninterrupted run's history and probes, bit for bit; other probe epochs are another
    run (not resumed)."""
    X, Y = synthetic_teacher(32, 4, seed=1, noise=0.1)

    def net():
        return ShortcutNet(width=4, units=2, shortcut=2, mid="tanh", init="small", seed=1, dtype=torch.float64)

    kw = dict(epochs=8, lr=0.1, probe_epochs=[2, 6], seed=3, l_min=best_linear_loss(X, Y))
    ck = tmp_path / "p.ckpt.pt"
    full = train(net(), (X, Y), **kw)
    model = net()
    _interrupt_at(4, model, (X, Y), checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, **kw)
    notes = []
    res = train(model, (X, Y), checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, log=notes.append, **kw)
    assert notes and notes[0].startswith("resuming from epoch 5 of 8"), notes
    assert res.history == full.history
    assert [p["epoch"] for p in res.probes] == [2, 6] and res.probes == full.probes
    notes = []  # the finished run's checkpoint, with other probe epochs
    train(net(), (X, Y), checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, log=notes.append,
          **{**kw, "probe_epochs": [2, 7]})
    assert notes and "another run" in notes[0] and "probe_epochs" in notes[0], notes


@pytest.mark.parametrize("kind, mid, scale, seed, dtype", [
    ("2-shortcut", "identity", 1.0, 2, torch.float64),  # near the zero point: a tight cluster at the top
    ("plain", "tanh", 1.0, 2, torch.float64), ("plain", "tanh", 2.0, 1, torch.float64),  # |lambda|max negative
    ("2-shortcut", "tanh", 1.0, 2, torch.float32)])
def test_sharpness_is_the_largest_eigenvalue(teacher, kind, mid, scale, seed, dtype):
    net = _net(kind, depth=6, seed=seed, mid=mid)
    with torch.no_grad():
        net.weight.mul_(scale)
    X, Y, _ = teacher
    ev = torch.linalg.eigvalsh(dense_hessian(net, (X, Y)))
    if dtype == torch.float32:
        net = net.float()
        X, Y = X.float(), Y.float()
    s = sharpness(net, (X, Y))
    assert s["converged"] and s["products"] <= 200 and s["residual"] <= 1e-4 * float(ev.abs().max())
    # a Ritz value: below the top eigenvalue (to rounding), and within the residual of it
    top, eps = float(ev.max()), (1e-6 if dtype == torch.float32 else 1e-12) * float(ev.abs().max())
    assert -eps <= top - s["lam_top"] <= s["residual"] + eps
    assert s["lam_top"] == pytest.approx(top, rel=1e-5)
    if scale > 1:
        assert -float(ev.min()) > float(ev.max()) > 0  # the case it is there for


def test_sharpness_along_training_matches_the_probes_and_resumes_bit_for_bit(teacher, tmp_path):
    """sharpness_every=3: the history's sharpness series is nan between multiples of 3 and the probes' lam_top at
    them; an interrupted run resumes to the same series bit for bit; a run without it keeps the configuration (and
    checkpoint fingerprint) of earlier versions, and the sharpness is another run's fingerprint."""
    X, Y, _ = teacher
    kw = dict(epochs=7, lr=0.3, probe_every=3, seed=1, sharpness_every=3)
    full = train(_net(mid="tanh"), (X, Y), **kw)
    sh = full.history["sharpness"]
    assert len(sh) == 8 and all(math.isnan(v) for e, v in enumerate(sh) if e % 3)
    # (Lanczos to a residual of 1e-4 |lambda|max: the Ritz value within that of the exact probes' value, and below it)
    for p in full.probes:
        assert -1e-12 * p["lam_max"] <= p["lam_top"] - sh[p["epoch"]] <= 1e-4 * p["lam_max"]
    assert full.to_dict()["history"]["sharpness"][1] is None  # strict JSON
    ck = tmp_path / "s.ckpt.pt"
    model = _net(mid="tanh")
    _interrupt_at(4, model, (X, Y), checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, **kw)
    notes = []
    res = train(model, (X, Y), checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, log=notes.append, **kw)
    assert notes[0].startswith("resuming from epoch 5 of 7")
    assert res.history["sharpness"][:7:3] == sh[:7:3] and math.isnan(res.history["sharpness"][4])
    assert "sharpness_every" not in TrainConfig().to_dict() and TrainConfig(sharpness_every=2).to_dict()["sharpness_every"] == 2
    notes = []
    train(_net(mid="tanh"), (X, Y), checkpoint=ck, checkpoint_every=1, checkpoint_every_s=0, log=notes.append,
          **{**kw, "sharpness_every": 2})
    assert notes and "another run" in notes[0], notes


def test_the_sharpness_survives_thinning_and_is_checked_in_stored_records(teacher):
    """to_dict(max_points=) keeps every epoch with a sharpness (it kept 9 of 201 at max_points=50); a stored record
    whose sharpness series is of another length or holds text is not a finished run (it crashed reproduce)."""
    X, Y, _ = teacher
    res = train(_net(), (X, Y), epochs=300, lr=0.05, sharpness_every=7)
    d = res.to_dict(max_points=20)
    kept = [(e, v) for e, v in zip(d["history"]["epoch"], d["history"]["sharpness"]) if v is not None]
    assert [e for e, _ in kept] == list(range(0, 301, 7)) and len(d["history"]["epoch"]) < 80
    assert [v for _, v in kept] == res.history["sharpness"][::7]
    back = TrainResult.from_dict(d).history
    assert TrainResult.is_record(d) and back["sharpness"][back["epoch"].index(7)] == res.history["sharpness"][7]
    h = d["history"]
    for bad in (h["sharpness"][:5], ["1.0"] * len(h["epoch"]), [True] * len(h["epoch"]), "x"):
        assert not TrainResult.is_record({**d, "history": {**h, "sharpness": bad}}), bad


def test_sharpness_arguments_are_checked(teacher):
    X, Y, _ = teacher
    for kw, match in ((dict(max_steps=0), "max_steps"), (dict(max_steps=True), "max_steps"), (dict(max_steps=2.7),
                      "max_steps"), (dict(max_steps="5"), "max_steps"), (dict(max_steps=None), "max_steps"),
                      (dict(seed=1.5), "seed"), (dict(seed=2**63), "seed"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=match):
            sharpness(_net(), (X, Y), **kw)
    assert sharpness(_net(), (X, Y), max_steps=np.int64(40), seed=np.int64(3))["products"] <= 40


def test_a_sharpness_that_fails_or_stops_short_is_said_once(teacher, monkeypatch):
    import shortcut_ext.train as T

    X, Y, _ = teacher
    calls = []

    def failing(*a, **k):
        calls.append(1)
        raise RuntimeError("no luck\nsecond line")

    monkeypatch.setattr(T, "sharpness", failing)
    notes = []
    res = train(_net(), (X, Y), epochs=4, lr=0.1, sharpness_every=2, log=notes.append)
    assert len(calls) == 3 and all(math.isnan(v) for v in res.history["sharpness"]) and res.status == "ok"
    assert notes == ["note: the sharpness at epoch 0 failed (RuntimeError: no luck); it is nan there (said once per run)"]
    monkeypatch.setattr(T, "sharpness", lambda *a, **k: {"lam_top": 2.0, "converged": False, "residual": 0.01,
                                                         "products": 200})
    notes = []
    res = train(_net(), (X, Y), epochs=2, lr=0.1, sharpness_every=1, log=notes.append)
    assert res.history["sharpness"] == [2.0, 2.0, 2.0] and len(notes) == 1
    assert "stopped at 200 Lanczos steps with a residual of 0.01 against 2" in notes[0]


def test_config_seed_and_divergence_factor_bounds_are_exclusive():
    """Not pinned: the upper seed bound (seeds lie in [0, 2^63): 2^63 overflows torch's manual_seed) and
    ``divergence_factor > 1`` (a factor of 1 calls any run diverged whose loss rises once).  Both ends are
    refused; the values just inside are accepted."""
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^63\)"):
        TrainConfig(seed=2**63)
    assert TrainConfig(seed=2**63 - 1).seed == 2**63 - 1
    with pytest.raises(ValueError, match="divergence_factor must be > 1"):
        TrainConfig(divergence_factor=1)
    with pytest.raises(ValueError, match="divergence_factor must be > 1"):
        TrainConfig(divergence_factor=1.0)
    assert TrainConfig(divergence_factor=1.5).divergence_factor == 1.5


def test_to_dict_keeps_a_history_of_exactly_max_points():
    """Not pinned: ``to_dict(max_points=n)`` thins only a history longer than n; one of exactly n epochs is
    kept whole (thinning it dropped epochs for nothing: 20 -> 16)."""
    hist = {k: [float(i) for i in range(20)] for k in TrainResult.HISTORY_FIELDS}
    hist["epoch"] = list(range(20))
    r = TrainResult("ok", 0.1, 19, 1.0, None, history=hist)
    assert r.to_dict(max_points=20)["history"]["epoch"] == list(range(20))
    assert len(r.to_dict(max_points=19)["history"]["epoch"]) < 20


def test_class_index_equal_to_out_features_is_refused_up_front():
    """Not pinned: for ``loss="cross_entropy"`` a class index must be < out_features; an index equal to
    out_features was let through to torch's cross_entropy (a RuntimeError from deep inside)."""
    net = ShortcutNet(3, 1, init="small", dtype=torch.float64)
    X = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\)"):
        train(net, (X, torch.tensor([0, 1, 2, 3])), epochs=1, loss="cross_entropy")
    assert train(net, (X, torch.tensor([0, 1, 2, 2])), epochs=1, loss="cross_entropy").status == "ok"


def _pre():
    X, Y = synthetic_teacher(64, 4, seed=0)
    return X, Y, (lambda: ShortcutNet(4, 2, init="small", seed=0, dtype=torch.float64))


def test_a_run_interrupted_after_its_last_update_resumes_at_the_end(tmp_path):
    """Not pinned: a checkpoint at epoch == epochs (written after the last update, e.g. killed during the
    final probe or the JSON write) is a valid checkpoint: the rerun resumes from it, not calls it damaged and
    starts afresh; it ends with the uninterrupted run's history."""
    X, Y, net = _pre()
    kw = dict(epochs=5, lr=0.1, checkpoint=tmp_path / "r.ckpt.pt", checkpoint_every=1, checkpoint_every_s=0)
    full = train(net(), (X, Y), epochs=5, lr=0.1)
    _interrupt_at(4, net(), (X, Y), **kw)
    notes = []
    res = train(net(), (X, Y), log=notes.append, **kw)
    assert notes and notes[0].startswith("resuming from epoch 5 of 5"), notes
    assert not any("damaged" in n for n in notes) and res.history["loss"] == full.history["loss"]


def test_a_checkpoint_of_another_checkpoint_key_is_not_resumed(tmp_path):
    """Not pinned: ``checkpoint_key`` (the CLI's command options) is part of the checkpoint's fingerprint:
    a checkpoint written under another key is another run, started afresh, not resumed."""
    X, Y, net = _pre()
    kw = dict(epochs=5, lr=0.1, checkpoint=tmp_path / "r.ckpt.pt", checkpoint_every=1, checkpoint_every_s=0)
    _interrupt_at(2, net(), (X, Y), checkpoint_key={"run": "A"}, **kw)
    notes = []
    train(net(), (X, Y), checkpoint_key={"run": "B"}, log=notes.append, **kw)
    assert notes and not any(n.startswith("resuming") for n in notes), notes
    assert "command options" in notes[0], notes
    _interrupt_at(2, net(), (X, Y), checkpoint_key={"run": "A"}, log=lambda m: None, **kw)  # the same key resumes
    notes = []
    train(net(), (X, Y), checkpoint_key={"run": "A"}, log=notes.append, **kw)
    assert notes and notes[0].startswith("resuming from epoch"), notes


def test_the_seed_reaches_the_stochastic_hessian_probes():
    """Not pinned: ``seed`` seeds the Lanczos / SLQ probes (above exact_max_params): two seeds give two
    estimates (a fixed internal seed made every run's probes the same draw), one seed the same."""
    X, Y, net = _pre()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = [train(net(), (X, Y), epochs=0, probe_every=1, exact_max_params=0, seed=s).probes[0] for s in (0, 1, 0)]
    assert p[0]["method"] != "exact"
    assert (p[0]["lam_q10"], p[0]["index"]) != (p[1]["lam_q10"], p[1]["index"])
    assert (p[0]["lam_q10"], p[0]["index"]) == (p[2]["lam_q10"], p[2]["index"])


def test_the_seed_shuffles_the_mini_batches():
    """Not pinned: ``seed`` seeds the mini-batch order of sgd: two seeds give two runs (a fixed generator
    seed made every seed the same run), one seed the same run."""
    X, Y, net = _pre()
    r = [train(net(), (X, Y), epochs=3, lr=0.05, optimizer="sgd", batch_size=8, seed=s).final_loss
         for s in (0, 1, 0)]
    assert r[0] != r[1] and r[0] == r[2]


def test_divergence_limit_is_at_least_the_factor_for_a_small_initial_loss():
    """Not pinned: the divergence limit is ``divergence_factor * max(L0, 1)``: a run whose loss starts far
    below 1 and grows (here x6.25 a step from 5e-5) but stays small is not diverged.  ``max(L0, 0)`` called
    it diverged at epoch 2."""
    X = torch.eye(2, dtype=torch.float64)
    r = train(PlainNet(2, 1, init="zero", dtype=torch.float64), (X, 0.01 * X), epochs=3, lr=6.0,
              divergence_factor=10)
    assert r.status == "ok" and r.diverged_epoch is None
    assert r.history["loss"][0] == pytest.approx(5e-5) and r.history["loss"][-1] > 10 * r.history["loss"][0]


def test_resume_keeps_the_divergence_limit_of_the_first_epoch(tmp_path):
    """Not pinned: the divergence limit is set from the loss at epoch 0 and a resumed run restores it from
    the checkpoint: resumed at epoch 11, the run diverges where the uninterrupted one does (27), not where a
    limit recomputed from the resumed loss puts it (22)."""
    X = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
    Y = X @ torch.diag(torch.tensor([10.0, 1e-3], dtype=torch.float64))

    def net():
        return PlainNet(2, 1, init="zero", dtype=torch.float64)

    kw = dict(epochs=30, lr=1.2, divergence_factor=2.0)
    full = train(net(), (X, Y), **kw)
    assert full.status == "diverged" and full.diverged_epoch == 27
    ck = dict(checkpoint=tmp_path / "r.ckpt.pt", checkpoint_every=1, checkpoint_every_s=0)
    _interrupt_at(10, net(), (X, Y), **ck, **kw)
    notes = []
    res = train(net(), (X, Y), log=notes.append, **ck, **kw)
    assert notes and notes[0].startswith("resuming from epoch"), notes
    assert res.status == "diverged" and res.diverged_epoch == 27
    assert res.history["loss"] == full.history["loss"]


# --------------------------------------------------------------------------- the direct step (no autograd through the stack)
_DIRECT_NETS = {
    "1-shortcut tanh-mid": lambda dt: ShortcutNet(5, 3, 1, mid="tanh", post="relu", init="small", scale=0.3, seed=1,
                                                  dtype=dt),
    "2-shortcut relu-mid": lambda dt: ShortcutNet(5, 4, 2, mid="relu", init="small", scale=0.3, seed=2, dtype=dt),
    "3-shortcut ssigmoid-pre": lambda dt: ShortcutNet(5, 2, 3, pre="ssigmoid", mid="tanh", init="small", scale=0.3,
                                                      seed=3, dtype=dt),
    "plain relu": lambda dt: PlainNet(5, 6, activation="relu", init="orthogonal", seed=4, dtype=dt),
    "projections in and out": lambda dt: ShortcutNet(5, 3, 2, mid="relu", init="small", scale=0.3, seed=5,
                                                     in_features=7, out_features=3, dtype=dt),
}


def _direct_data(net, loss, dtype, m=37):
    g = torch.Generator().manual_seed(7)
    X = torch.randn(m, net.in_features, generator=g, dtype=dtype)
    if loss == "mse":
        return X, torch.randn(m, net.out_features, generator=g, dtype=dtype)
    if loss == "class indices":
        return X, torch.randint(0, net.out_features, (m,), generator=g)
    return X, torch.softmax(torch.randn(m, net.out_features, generator=g, dtype=dtype), dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["mse", "class indices", "class probabilities"])
@pytest.mark.parametrize("name", list(_DIRECT_NETS))
@pytest.mark.parametrize("recompute", [None, True, False])
def test_the_direct_step_gives_the_autograd_loss_and_gradient_bit_for_bit(name, loss, dtype, recompute):
    net = _DIRECT_NETS[name](dtype)
    net.recompute = recompute
    X, Y = _direct_data(net, loss, dtype)
    L_name = "mse" if loss == "mse" else "cross_entropy"
    direct = train_mod._direct_loss_and_grad(net, L_name)
    assert direct is not None
    L1, g1 = direct(X, Y)
    L2 = loss_fn(L_name, net(X), Y)
    (g2,) = torch.autograd.grad(L2, net.weight)
    assert L1 == float(L2) and g1.shape == net.weight.shape and g1.dtype == dtype
    assert torch.equal(g1, g2)
    assert g1.abs().max() > 0
    ref = loss_fn(L_name, net.forward_with(net.weight, X, backend="torch"), Y)  # and it is the gradient
    (g3,) = torch.autograd.grad(ref, net.weight)
    torch.testing.assert_close(g1, g3, **({} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)))


@pytest.mark.parametrize("save_layers", [False, True])
@pytest.mark.parametrize("m", [0, 1, 37, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["1-shortcut tanh-mid", "2-shortcut relu-mid", "3-shortcut ssigmoid-pre", "plain relu"])
def test_the_one_call_mse_step_is_model_x_and_autograd_bit_for_bit(name, dtype, m, save_layers):
    """``_C.mse_step`` (the direct step's forward, loss, grad_y and backward in one C++ call) against the
    model under autograd: the same loss and gradient bits, with and without saved layers, any batch size.

    One exception: float64 without saved layers where the GEMMs are the BLAS's ``dgemm`` (a portable build, or
    SHORTCUT_EXT_CPU_GEMM=brgemm), not the register kernel.  The backward then recomputes each unit's layers in
    other row blocks than the forward's, and the BLAS's sums depend on the blocking: the gradient is the same
    to rounding (a few 1e-17 of its largest entry here), not bit for bit."""
    from shortcut_ext._build import _C

    net = _DIRECT_NETS[name](dtype)
    X, Y = _direct_data(net, "mse", dtype, m=m)
    wv = net.stack_weights(net.weight.detach())
    L, g = _C.mse_step(X, wv, Y, net.shortcut, *net.activations, save_layers)
    L2 = loss_fn("mse", net(X), Y)
    (g2,) = torch.autograd.grad(L2, net.weight)
    assert isinstance(L, float) and L == float(L2.detach())
    assert g.shape == wv.shape and g.dtype == dtype and not g.requires_grad
    if dtype == torch.float64 and not save_layers and shortcut_ext.build_info()["cpu_gemm_float64"] != "kernel64":
        torch.testing.assert_close(g, g2.view_as(wv), rtol=0, atol=1e-14 * float(g2.abs().max()))
    else:
        assert torch.equal(g, g2.view_as(wv))
    assert (g.abs().max() > 0) == (m > 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not reach the step: the same bits
        L3, g3 = _C.mse_step(X, wv, Y, net.shortcut, *net.activations, save_layers)
    assert L3 == L and torch.equal(g3, g)


@pytest.mark.parametrize("save_layers", [False, True])
@pytest.mark.parametrize("m", [0, 1, 37, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("q", [3, 8])  # fewer targets than the width (5), and more
def test_the_one_call_mse_step_with_a_read_out_is_model_x_and_autograd_bit_for_bit(q, dtype, m, save_layers):
    """``_C.mse_step(..., readout=P)``: the loss of ``y @ P.T`` (model.read) and its gradient, the same bits as
    the model under autograd (a read-out net's step was Python: 120 us more a step at d = 16)."""
    from shortcut_ext._build import _C

    net = ShortcutNet(5, 3, 2, mid="relu", init="small", scale=0.3, seed=5, in_features=7, out_features=q, dtype=dtype)
    X, Y = _direct_data(net, "mse", dtype, m=m)
    wv = net.stack_weights(net.weight.detach())
    L, g = _C.mse_step(net.embed(X), wv, Y, net.shortcut, *net.activations, save_layers, net.readout)
    L2 = loss_fn("mse", net(X), Y)
    (g2,) = torch.autograd.grad(L2, net.weight)
    assert isinstance(L, float) and L == float(L2.detach())
    if dtype == torch.float64 and not save_layers and shortcut_ext.build_info()["cpu_gemm_float64"] != "kernel64":
        torch.testing.assert_close(g, g2.view_as(wv), rtol=0, atol=1e-14 * float(g2.abs().max()))
    else:
        assert torch.equal(g, g2.view_as(wv))
    assert m == 0 or g.abs().max() > 0


def test_the_one_call_mse_step_refuses_targets_unlike_the_output():
    from shortcut_ext._build import _C

    net = _DIRECT_NETS["2-shortcut relu-mid"](torch.float64)
    X, Y = _direct_data(net, "mse", torch.float64)
    wv = net.stack_weights(net.weight.detach())
    for bad, said in ((Y[:, :3], r"\[37, 3\]"), (Y.float(), r"\[37, 5\] Float"), (Y[:5], r"\[5, 5\]")):
        with pytest.raises(ValueError, match=r"targets must have shape \[37, 5\], dtype Double.*got " + said):
            _C.mse_step(X, wv, bad, net.shortcut, *net.activations)
    with pytest.raises(ValueError, match="weights"):  # the op's own checks still run
        _C.mse_step(X, wv[..., :4, :4], Y, net.shortcut, *net.activations)
    # with a read-out P [q, d], the targets are [B, q]; a read-out of another width, dtype or rank is refused
    P = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"targets must have shape \[37, 3\] \(the read-out's\).*got \[37, 5\]"):
        _C.mse_step(X, wv, Y, net.shortcut, *net.activations, False, P)
    for badP, said in ((P[:, :4], r"\[3, 4\] Double"), (P.float(), r"\[3, 5\] Float"), (P[0], r"\[5\] Double")):
        with pytest.raises(ValueError, match=r"readout must have shape \[q, d\] = \[q, 5\].*got " + said):
            _C.mse_step(X, wv, Y[:, :3], net.shortcut, *net.activations, False, badP)


def test_training_takes_the_one_call_step_where_it_can(monkeypatch):
    """MSE with targets of the output's dtype, with or without a read-out: ``_C.mse_step``; other dtypes: the
    Python step; the same history either way as with the stack under autograd."""
    from shortcut_ext import _build

    real, calls, direct = _build._C.mse_step, [], train_mod._direct_loss_and_grad
    monkeypatch.setattr(_build._C, "mse_step", lambda *a: (calls.append(1), real(*a))[1])
    cfg = TrainConfig(epochs=12, lr=0.05)
    for name, expect in (("2-shortcut relu-mid", 13), ("plain relu", 13), ("projections in and out", 13)):
        calls.clear()
        X, Y = _direct_data(_DIRECT_NETS[name](torch.float64), "mse", torch.float64, m=40)
        a = train(_DIRECT_NETS[name](torch.float64), (X, Y), cfg)
        assert len(calls) == expect, name
        monkeypatch.setattr(train_mod, "_direct_loss_and_grad", lambda *a: None)
        b = train(_DIRECT_NETS[name](torch.float64), (X, Y), cfg)
        monkeypatch.undo()
        monkeypatch.setattr(_build._C, "mse_step", lambda *a: (calls.append(1), real(*a))[1])
        assert a.history == b.history and a.status == b.status == "ok", name
    calls.clear()  # a column-major weight (set by hand): the step takes a row-major copy, the same numbers
    def column_major():
        net = _DIRECT_NETS["plain relu"](torch.float64)
        net.weight = torch.nn.Parameter(net.weight.detach().transpose(-1, -2).contiguous().transpose(-1, -2))
        assert not net.weight.is_contiguous()
        return net

    X, Y = _direct_data(column_major(), "mse", torch.float64, m=40)
    a = train(column_major(), (X, Y), cfg)
    assert len(calls) == 13
    monkeypatch.setattr(train_mod, "_direct_loss_and_grad", lambda *a: None)
    assert a.history == train(column_major(), (X, Y), cfg).history
    calls.clear()  # float32 targets of a float64 net: the Python step, which promotes as loss_fn does
    net = _DIRECT_NETS["2-shortcut relu-mid"](torch.float64)
    X, Y = _direct_data(net, "mse", torch.float64, m=40)
    monkeypatch.setattr(train_mod, "_direct_loss_and_grad", direct)
    L, g = train_mod._direct_loss_and_grad(net, "mse")(X, Y.float())
    assert not calls and L == float(loss_fn("mse", net(X), Y.float()).detach())


@pytest.mark.parametrize("optimizer", ["gd", "sgd", "adam"])
def test_training_takes_the_direct_step_and_ends_where_autograd_does(optimizer, monkeypatch):
    """The same history, bit for bit, with the stack's autograd; and the direct step is what ran."""
    X, Y = _direct_data(_DIRECT_NETS["2-shortcut relu-mid"](torch.float64), "mse", torch.float64, m=50)
    cfg = TrainConfig(epochs=30, lr=0.02, optimizer=optimizer, probe_epochs=[0, 30],
                      batch_size=None if optimizer == "gd" else 16, momentum=0.5 if optimizer == "sgd" else 0.0)
    real, calls = train_mod._direct_loss_and_grad, []

    def counted(*a):
        f = real(*a)
        return None if f is None else (lambda *b: (calls.append(1), f(*b))[1])

    monkeypatch.setattr(train_mod, "_direct_loss_and_grad", counted)
    a = train(_DIRECT_NETS["2-shortcut relu-mid"](torch.float64), (X, Y), cfg)
    assert len(calls) == 31 + (0 if optimizer == "gd" else 30 * math.ceil(50 / 16))  # every loss and gradient
    monkeypatch.setattr(train_mod, "_direct_loss_and_grad", lambda *a: None)
    b = train(_DIRECT_NETS["2-shortcut relu-mid"](torch.float64), (X, Y), cfg)
    assert a.history == b.history and a.final_loss == b.final_loss and a.status == b.status == "ok"
    assert a.probes == b.probes and a.history["loss"][-1] < a.history["loss"][0]


def test_the_direct_step_is_not_taken_where_it_would_not_be_model_x_and_autograd():
    def net():
        return ShortcutNet(4, 3, 2, init="small", scale=0.3, seed=0, dtype=torch.float64)

    assert train_mod._direct_loss_and_grad(net(), "mse") is not None
    assert train_mod._direct_loss_and_grad(ShortcutNet(4, 3, 2, backend="torch", dtype=torch.float64), "mse") is None
    n = net()
    n.register_forward_hook(lambda mod, inp, out: out * 2)
    assert train_mod._direct_loss_and_grad(n, "mse") is None
    n = net()
    n.register_full_backward_hook(lambda mod, gin, gout: None)
    assert train_mod._direct_loss_and_grad(n, "mse") is None

    class Doubled(ShortcutNet):
        def forward(self, x):
            return 2 * super().forward(x)

    assert train_mod._direct_loss_and_grad(Doubled(4, 3, 2, dtype=torch.float64), "mse") is None
    # a hook on the weight's gradient runs, as in any autograd step: halving it is training at half the rate
    X, Y = _direct_data(net(), "mse", torch.float64)
    n = net()
    n.weight.register_hook(lambda g: g / 2)
    assert train_mod._direct_loss_and_grad(n, "mse") is None
    a = train(n, (X, Y), TrainConfig(epochs=5, lr=0.1))
    b = train(net(), (X, Y), TrainConfig(epochs=5, lr=0.05))
    assert a.history["loss"] == pytest.approx(b.history["loss"], rel=1e-12)


@pytest.mark.parametrize("optimizer,momentum", [("gd", 0.0), ("sgd", 0.0), ("sgd", 0.5), ("sgd", 0.9)])
def test_stability_threshold_is_where_full_batch_steps_diverge_on_a_quadratic(optimizer, momentum):
    """torch.optim.SGD's steps (gd: no momentum) on 0.5 lam w^2: 2% below the threshold they shrink w, 2% above
    they blow it up; stability_threshold says where that happens."""
    from shortcut_ext.train import stability_threshold

    lr, lam = 0.1, None
    thr = stability_threshold(optimizer, lr, momentum)
    for factor, grows in ((0.98, False), (1.02, True)):
        lam = factor * thr
        w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        opt = torch.optim.SGD([w], lr=lr, momentum=momentum)
        for _ in range(3000):
            opt.zero_grad()
            (0.5 * lam * w * w).sum().backward()
            opt.step()
        assert (abs(float(w)) > 1.0) == grows, (factor, float(w))


def test_stability_threshold_refuses_what_has_none_and_bad_arguments():
    from shortcut_ext.train import stability_threshold

    assert stability_threshold("sgd", 0.1, 0.9, full_batch=False) is None
    assert stability_threshold("adam", 0.1) is None and stability_threshold("gd", 0.5) == 4.0
    for kw, match in (({"optimizer": "rmsprop", "lr": 0.1}, "optimizer must be one of"),
                      ({"optimizer": "gd", "lr": 0.0}, "lr must be a finite number > 0"),
                      ({"optimizer": "gd", "lr": float("inf")}, "lr must be"),
                      ({"optimizer": "gd", "lr": True}, "lr must be"),
                      ({"optimizer": "sgd", "lr": 0.1, "momentum": -0.1}, "momentum must be a finite number >= 0"),
                      ({"optimizer": "gd", "lr": 0.1, "momentum": 0.5}, "momentum needs optimizer 'sgd'")):
        with pytest.raises(ValueError, match=match):
            stability_threshold(**kw)
