"""Learner: event order, cancel semantics, callback ordering, default TrainCB, bad input."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastnca.train.learner import (
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    DataLoaders,
    Learner,
    TrainCB,
    check_world_size,
    requested_world_size,
    run_cbs,
)

EVENTS = (
    [f"{w}_{s}" for s in ("fit", "epoch", "batch") for w in ("before", "after", "cleanup")]
    + ["after_predict", "after_loss", "after_backward", "after_step"]
    + [f"after_cancel_{s}" for s in ("fit", "epoch", "batch")]
)
STEPS = ["predict", "get_loss", "backward", "step", "zero_grad"]


class Recorder(Callback):
    """Records every event; raises ``raise_at[(event, epoch, iter, training)]`` when asked."""

    def __init__(self, raise_at=None, order=0):
        self.events, self.raise_at, self.order = [], raise_at or {}, order
        for e in EVENTS:
            setattr(self, e, self._make(e))

    def _make(self, name):
        def f(learn):
            self.events.append(name)
            key = (name, learn.epoch, getattr(learn, "iter", None), learn.training)
            if key in self.raise_at:
                raise self.raise_at[key]()

        return f


class StepRecorder(TrainCB):
    """A TrainCB that also records the step events."""

    def __init__(self, log):
        super().__init__()
        self.log = log
        for name in STEPS:
            setattr(self, name, self._wrap(name, getattr(super(), name)))

    def _wrap(self, name, f):
        def g(learn):
            self.log.append(name)
            f(learn)

        return g


def _dls(n_train=8, n_valid=4, bs=4):
    torch.manual_seed(0)
    x = torch.randn(n_train + n_valid, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    return DataLoaders(
        DataLoader(TensorDataset(x[:n_train], y[:n_train]), bs),
        DataLoader(TensorDataset(x[n_train:], y[n_train:]), bs),
    )


def _learner(cbs, **kw):
    return Learner(nn.Linear(3, 1), _dls(), F.mse_loss, lr=0.1, cbs=cbs, **kw)


def _batch(training):
    core = ["before_batch", "predict", "after_predict", "get_loss", "after_loss"]
    if training:
        core += ["backward", "after_backward", "step", "after_step", "zero_grad"]
    return core + ["after_batch", "cleanup_batch"]


def test_event_order():
    rec = Recorder()
    log = rec.events
    _learner([rec, StepRecorder(log)]).fit(1)
    epoch = lambda tr, n: ["before_epoch"] + _batch(tr) * n + ["after_epoch", "cleanup_epoch"]
    expected = ["before_fit"] + epoch(True, 2) + epoch(False, 1) + ["after_fit", "cleanup_fit"]
    assert log == expected


def test_valid_runs_without_grad_and_in_eval_mode():
    seen = []

    class Probe(Callback):
        def after_predict(self, learn):
            seen.append((learn.training, torch.is_grad_enabled(), learn.preds.requires_grad))

    _learner([Probe()]).fit(1)
    assert seen == [(True, True, True)] * 2 + [(False, False, False)]


@pytest.mark.parametrize(
    "where, exc, skipped, kept",
    [
        # a batch cancelled after predict: no loss/backward/after_batch for it, cleanup still runs
        (("after_predict", 0, 0, True), CancelBatchException, "after_batch", "cleanup_batch"),
        (("before_batch", 0, 1, True), CancelEpochException, "after_epoch", "cleanup_epoch"),
        (("after_epoch", 0, 1, True), CancelFitException, "after_fit", "cleanup_fit"),
    ],
)
def test_cancel_exceptions(where, exc, skipped, kept):
    rec = Recorder(raise_at={where: exc})
    learn = _learner([rec])
    learn.fit(2)
    ev = rec.events
    if exc is CancelBatchException:
        # first training batch: predict ran, then nothing but after_cancel_batch, cleanup_batch
        i = ev.index("after_predict")
        assert ev[i + 1 : i + 3] == ["after_cancel_batch", "cleanup_batch"]
        assert ev.count("after_batch") == ev.count("before_batch") - 1
        assert ev.count("after_fit") == 1 and ev.count("before_epoch") == 4
    elif exc is CancelEpochException:
        # epoch 0 train stops at its 2nd batch, valid and epoch 1 still run
        assert ev.count("after_epoch") == ev.count("before_epoch") - 1 == 3
        assert ev.count("cleanup_epoch") == 4
        first_cleanup = ev.index("cleanup_epoch")
        assert ev[first_cleanup - 2 : first_cleanup] == ["cleanup_batch", "after_cancel_epoch"]
        assert "after_epoch" not in ev[:first_cleanup]
        assert ev.count("after_fit") == 1
    else:
        # cancel at the end of epoch 0's training: no valid, no epoch 1, no after_fit
        assert ev.count("before_epoch") == 1
        assert ev[-3:] == ["cleanup_epoch", "after_cancel_fit", "cleanup_fit"]
    scope = skipped.split("_")[1]  # the cancelled scope: its after_ is skipped exactly once,
    assert ev.count(f"after_{scope}") == ev.count(f"before_{scope}") - 1  # after_cancel_ runs
    assert ev.count(f"after_cancel_{scope}") == 1  # instead, and cleanup_ always
    assert ev.count(f"cleanup_{scope}") == ev.count(f"before_{scope}") and kept in ev


def test_errors_propagate_and_cleanup_runs():
    rec = Recorder(raise_at={("after_loss", 0, 1, True): RuntimeError})
    with pytest.raises(RuntimeError):
        _learner([rec]).fit(1)
    assert rec.events[-3:] == ["cleanup_batch", "cleanup_epoch", "cleanup_fit"]
    assert "after_fit" not in rec.events


def test_callbacks_sorted_by_order_ties_keep_list_order():
    calls = []

    def cb(name, order):
        c = Callback()
        c.order = order
        c.before_fit = lambda learn: calls.append(name)
        return c

    cbs = [cb("c", 5), cb("a", -1), cb("b1", 2), cb("b2", 2)]
    run_cbs(cbs, "before_fit")
    assert calls == ["a", "b1", "b2", "c"]
    calls.clear()
    _learner(cbs).fit(0)
    assert calls == ["a", "b1", "b2", "c"]


def test_default_traincb_added_once_and_trains():
    learn = _learner([])
    w0 = learn.model.weight.detach().clone()
    learn.fit(3, valid=False)
    assert not torch.equal(w0, learn.model.weight)  # it trained
    assert learn.cbs == []  # the default TrainCB lived for the fit only
    log = []
    _learner([StepRecorder(log)]).fit(1, valid=False)
    assert log.count("predict") == 2  # 2 batches, only one training callback ran


def test_n_inp_and_fit_cbs_are_temporary():
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, a, b):
            return self.lin(a + b)

    x = torch.randn(8, 3)
    dl = DataLoader(TensorDataset(x, torch.zeros_like(x), x.sum(1, keepdim=True)), 4)
    learn = Learner(TwoIn(), DataLoaders(dl, dl), F.mse_loss, lr=0.1)
    extra = Recorder()
    learn.fit(1, cbs=[TrainCB(n_inp=2), extra])
    assert learn.cbs == [] and "after_fit" in extra.events
    assert learn.preds.shape == (4, 1)


def test_lr_override_and_opt_func():
    learn = _learner([], opt_func=torch.optim.Adam)
    learn.fit(1, lr=0.01)
    assert isinstance(learn.opt, torch.optim.Adam) and learn.opt.param_groups[0]["lr"] == 0.01


def test_bad_input():
    with pytest.raises(TypeError, match="dls must have .train and .valid"):
        Learner(nn.Linear(1, 1), [1, 2])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Learner(lambda x: x, _dls())
    with pytest.raises(TypeError, match="Callback instances"):
        Learner(nn.Linear(1, 1), _dls(), cbs=[TrainCB])
    with pytest.raises(ValueError, match="n_epochs"):
        _learner([]).fit(-1)
    with pytest.raises(ValueError, match="n_inp"):
        TrainCB(n_inp=0)
    with pytest.raises(ValueError, match="train and a valid"):
        DataLoaders([1])


def test_world_size_mismatch_warns(monkeypatch):
    for k in ("WORLD_SIZE", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(k, raising=False)
    assert requested_world_size() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_world_size() is None
        _learner([]).fit(1)  # no launcher: no warning
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun, but nothing distributed
    with pytest.warns(RuntimeWarning, match="NOT synchronised"):
        _learner([]).fit(1)
    monkeypatch.delenv("WORLD_SIZE")
    # `accelerate launch --cpu --num_processes 2` runs one process with these set
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert requested_world_size() == 2
    with pytest.warns(RuntimeWarning, match="accelerate launch --cpu"):
        check_world_size()
