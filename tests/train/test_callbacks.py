"""Callbacks: training strategies (fp32, bf16 autocast, Accelerate, compile), metrics, progress,
gradient normalisation, LR schedules, devices and atomic checkpoints with exact resume."""

import io
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR, OneCycleLR
from torch.utils.data import DataLoader, TensorDataset

from fastnca._device import default_device
from fastnca.train.callbacks import (
    AccelerateCB,
    BatchSchedCB,
    CheckpointCB,
    CompileCB,
    DeviceCB,
    EpochSchedCB,
    GradNormCB,
    MetricsCB,
    MixedPrecision,
    ProgressCB,
    check_autocast,
    load_checkpoint,
)
from fastnca.train.data import MultDL
from fastnca.train.learner import (
    Callback,
    CancelBatchException,
    CancelFitException,
    DataLoaders,
    Learner,
)


def _dls(n=64, bs=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]]) + 0.3
    return DataLoaders(DataLoader(TensorDataset(x, y), bs), DataLoader(TensorDataset(x, y), bs))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))


class Probe(Callback):
    """Calls ``fns[event](learn)`` and keeps the results in ``seen[event]``."""

    order = 99

    def __init__(self, **fns):
        self.seen = {k: [] for k in fns}
        for k, f in fns.items():
            setattr(self, k, lambda learn, k=k, f=f: self.seen[k].append(f(learn)))


STRATEGIES = {
    "fp32": lambda: [],
    "MixedPrecision(bf16)": lambda: [MixedPrecision()],
    "AccelerateCB(bf16)": lambda: [AccelerateCB("bf16")],
    # aot_eager: dynamo + AOT autograd without inductor's C++ build (a cold inductor compile costs
    # 15-60 s on a 2-core CI machine); bench_strategies.py runs CompileCB with inductor.
    "CompileCB": lambda: [CompileCB(backend="aot_eager")],
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_loss_decreases_with_each_strategy(name):
    m = MetricsCB()
    model = _model()
    learn = Learner(
        model,
        _dls(),
        F.mse_loss,
        lr=0.05,
        cbs=[DeviceCB(), m, *STRATEGIES[name]()],
        opt_func=torch.optim.Adam,
    )
    learn.fit(4, valid=False)
    losses = [d["loss"] for d in m.log]
    assert losses[-1] < 0.3 * losses[0], losses
    if name == "CompileCB":
        assert model._compiled_call_impl is not None  # compiled in place
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        learn.fit(1, valid=False)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompile


class DtypeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.seen = []

    def forward(self, x):
        h = self.lin(x)
        self.seen.append((torch.is_autocast_enabled(x.device.type), h.dtype))
        return h


@pytest.mark.parametrize(
    "cb", [lambda: MixedPrecision(torch.bfloat16), lambda: AccelerateCB("bf16")]
)
def test_autocast_active_inside_predict_only(cb):
    model = DtypeNet()
    probe = Probe(
        after_batch=lambda learn: torch.is_autocast_enabled(learn.preds.device.type),
        after_loss=lambda learn: learn.loss.dtype,
    )
    Learner(model, _dls(32), F.mse_loss, cbs=[cb(), probe]).fit(1)
    assert model.seen == [(True, torch.bfloat16)] * 4  # 2 train + 2 valid batches
    assert probe.seen["after_batch"] == [False] * 4  # left autocast after the loss
    assert probe.seen["after_loss"] == [torch.float32] * 4
    assert not torch.is_autocast_enabled("cpu")


def test_mixed_precision_leaves_autocast_on_cancel():
    class Cancel(Callback):
        def after_predict(self, learn):
            raise CancelBatchException()

    probe = Probe(cleanup_batch=lambda learn: torch.is_autocast_enabled("cpu"))
    Learner(_model(), _dls(32), F.mse_loss, cbs=[MixedPrecision(), Cancel(), probe]).fit(1)
    assert probe.seen["cleanup_batch"] == [False] * 4


def test_mixed_precision_fp16_uses_a_grad_scaler():
    mp, m = MixedPrecision("fp16"), MetricsCB()
    probe = Probe(after_step=lambda learn: type(learn.scaler).__name__)
    learn = Learner(
        _model(), _dls(), F.mse_loss, lr=0.05, cbs=[mp, m, probe], opt_func=torch.optim.Adam
    )
    learn.fit(4, valid=False)
    assert set(probe.seen["after_step"]) == {"GradScaler"} and learn.scaler is None
    assert m.log[-1]["loss"] < 0.5 * m.log[0]["loss"]


def test_precision_bad_input():
    for bad in ("fp8", torch.float32, "float64"):
        with pytest.raises(ValueError, match="dtype must be torch.bfloat16 or torch.float16"):
            MixedPrecision(bad)
    with pytest.raises(ValueError, match="only apply to dtype=torch.float16"):
        MixedPrecision("bf16", init_scale=2.0)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        AccelerateCB("fp32")
    with pytest.raises(ValueError, match="not supported on cpu"):
        check_autocast("cpu", torch.float64)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a GPU"):
            AccelerateCB("fp16")


def test_accelerate_prepares_and_restores():
    dls = _dls()
    dls.train = MultDL(dls.train, 2)
    train, valid, model = dls.train, dls.valid, _model()
    cb = AccelerateCB("bf16")
    probe = Probe(
        before_batch=lambda learn: (
            type(learn.dls.train.dl).__name__,
            type(learn.opt).__name__,
            learn.accelerator,
        )
    )
    learn = Learner(model, dls, F.mse_loss, cbs=[cb, probe])
    learn.fit(1, valid=False)
    assert probe.seen["before_batch"][0] == ("DataLoaderShard", "AcceleratedOptimizer", cb.acc)
    assert len(probe.seen["before_batch"]) == 8  # MultDL(2) over 4 batches
    assert learn.model is model and "_original_forward" not in model.__dict__
    assert dls.train is train and dls.valid is valid and type(learn.opt) is torch.optim.SGD
    assert learn.accelerator is None and cb.num_processes == 1
    # a second fit prepares afresh (autocast again, sharded loader again)
    learn.model = net = DtypeNet()
    learn.fit(1, valid=False)
    learn.fit(1, valid=False)
    assert net.seen == [(True, torch.bfloat16)] * 16
    assert probe.seen["before_batch"][-1][0] == "DataLoaderShard"
    # another precision in the same process (Accelerate keeps one global state)
    Learner(_model(), _dls(), F.mse_loss, cbs=[AccelerateCB("no")]).fit(1)


def test_grad_norm_cb_normalises_each_parameter():
    norms = lambda learn: [p.grad.norm().item() for p in learn.model.parameters()]
    for extra in ([], [MixedPrecision("fp16", init_scale=64.0)]):  # fp16: unscaled first
        probe = Probe(after_backward=norms)
        model = _model()
        before = [p.detach().clone() for p in model.parameters()]
        learn = Learner(model, _dls(16, 16), F.mse_loss, lr=0.5, cbs=[GradNormCB(), probe, *extra])
        learn.fit(1, valid=False)
        assert probe.seen["after_backward"][0] == pytest.approx([1.0] * 4, abs=1e-5)
        # SGD(lr) moved every parameter by exactly lr * (unit vector)
        params = zip(model.parameters(), before, strict=True)
        steps = [(p.detach() - b).norm().item() for p, b in params]
        assert steps == pytest.approx([0.5] * 4, abs=1e-4)


def test_batch_and_epoch_schedulers():
    lr_of = lambda learn: learn.opt.param_groups[0]["lr"]
    probe = Probe(before_batch=lr_of)
    sched = partial(OneCycleLR, max_lr=0.1, total_steps=8)
    Learner(_model(), _dls(), F.mse_loss, cbs=[BatchSchedCB(sched), probe]).fit(2, valid=False)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = OneCycleLR(ref_opt, max_lr=0.1, total_steps=8)
    expected = []
    for _ in range(8):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert probe.seen["before_batch"] == pytest.approx(expected)
    probe = Probe(before_epoch=lr_of)
    ms = partial(MultiStepLR, milestones=[1, 2], gamma=0.1)
    Learner(_model(), _dls(), F.mse_loss, lr=1.0, cbs=[EpochSchedCB(ms), probe]).fit(3)
    # stepped after each training epoch: the validation epoch already sees the new rate
    assert probe.seen["before_epoch"] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01, 0.01])
    with pytest.raises(TypeError, match="sched must be a callable"):
        BatchSchedCB(3)


def test_device_cb():
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert default_device() == torch.device("cpu")
    probe = Probe(before_batch=lambda learn: (learn.batch[0].device.type, learn.device.type))
    Learner(_model(), _dls(), F.mse_loss, cbs=[DeviceCB("cpu"), probe]).fit(1)
    assert set(probe.seen["before_batch"]) == {("cpu", "cpu")}
    with pytest.raises(ValueError, match="device: expected auto, cpu, cuda"):
        DeviceCB("warp-drive")


def test_metrics_weighted_by_batch_size():
    x = torch.zeros(4, 1)
    y = torch.tensor([1.0, 1.0, 1.0, 2.0])[:, None]
    dl = DataLoader(TensorDataset(x, y), 3)  # batches of sizes 3 (mean 1) and 1 (mean 2)
    loss = lambda p, t: t.mean() + 0 * p.sum()
    m = MetricsCB(twice=lambda p, t: 2 * t.mean())
    Learner(nn.Linear(1, 1), DataLoaders(dl, dl), loss, lr=0.0, cbs=[m]).fit(1)
    assert [d["train"] for d in m.log] == ["train", "eval"]
    assert m.log[0]["loss"] == pytest.approx(1.25) and m.log[0]["twice"] == pytest.approx(2.5)
    assert set(m.log[1]) == {"epoch", "train", "loss", "twice"}


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_plain_lines_in_a_non_terminal():
    out = io.StringIO()
    p = ProgressCB(file=out)
    Learner(_model(), _dls(), F.mse_loss, cbs=[MetricsCB(), p]).fit(2)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[3].startswith("epoch 0 train [####################] 4/4  loss ")
    assert lines[4].split() == ["epoch", "train", "loss"]  # MetricsCB table: header once ...
    assert [line.split()[:2] for line in lines if len(line.split()) == 3] == [
        ["epoch", "train"],
        ["0", "train"],
        ["0", "eval"],
        ["1", "train"],
        ["1", "eval"],
    ]
    assert len(lines) == 2 * 2 * 4 + 5  # a line per batch (4 per epoch here) + the table
    assert len(p.losses) == 8


def test_progress_redraws_in_a_terminal_and_plots(tmp_path):
    out = FakeTTY()
    p = ProgressCB(file=out, plot=tmp_path / "loss.png", refresh=0.0)
    Learner(_model(), _dls(), F.mse_loss, cbs=[p]).fit(1)
    text = out.getvalue()
    assert text.startswith("\repoch 0 train [#####...............] 1/4  loss ")
    assert text.count("\repoch 0 train") == 4 and "\n" in text  # redrawn in place, then kept
    png = Image.open(tmp_path / "loss.png")  # drawn with Pillow: no matplotlib needed
    assert png.format == "PNG" and png.size == (640, 360)
    assert len(set(png.convert("RGB").getdata())) > 2  # a curve, not a blank frame


# ----- checkpoints -----
class Killed(Exception):
    pass


class Killer(Callback):
    """Ends the process's fit abruptly (as a kill would) right after optimiser step ``at``;
    ``early_stop=True`` ends it the clean way, with CancelFitException."""

    order = 40

    def __init__(self, at, early_stop=False):
        self.at, self.n, self.early_stop = at, 0, early_stop

    def after_step(self, learn):
        self.n += 1
        if self.n == self.at:
            raise CancelFitException() if self.early_stop else Killed()


def _ckpt_learner(path, seed, extra=(), every=None):
    sched = BatchSchedCB(partial(OneCycleLR, max_lr=0.05, total_steps=8))
    steps = Probe(after_step=lambda learn: 1)
    cbs = [CheckpointCB(path, every=every), sched, steps, *extra]
    learn = Learner(_model(seed), _dls(), F.mse_loss, cbs=cbs, opt_func=torch.optim.Adam)
    return learn, steps


@pytest.mark.parametrize("kill_at, every, saved_at", [(5, 2, 4), (7, 3, 6)])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, kill_at, every, saved_at):
    ref, _ = _ckpt_learner(tmp_path / "ref.pt", seed=0)
    ref.fit(2)
    path = tmp_path / "run.pt"
    killed, _ = _ckpt_learner(path, seed=0, extra=[Killer(kill_at)], every=every)
    with pytest.raises(Killed):
        killed.fit(2)
    assert load_checkpoint(path)["step"] == saved_at
    resumed, steps = _ckpt_learner(path, seed=123, every=every)  # other init: the load must win
    resumed.fit(2)
    assert len(steps.seen["after_step"]) == 8 - saved_at
    for a, b in zip(ref.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert load_checkpoint(path)["step"] == 8


def test_checkpoint_saved_on_early_stop_and_optimiser_mismatch_is_clear(tmp_path):
    path = tmp_path / "c.pt"
    stopped, _ = _ckpt_learner(path, seed=0, extra=[Killer(3, early_stop=True)])
    stopped.fit(2)  # CancelFitException: a clean early stop
    saved = load_checkpoint(path)
    assert saved["step"] == 3 and saved["sched"] is not None and saved["opt_class"] == "Adam"
    sgd = Learner(
        _model(),
        _dls(),
        F.mse_loss,
        opt_func=torch.optim.SGD,
        cbs=[CheckpointCB(path), BatchSchedCB(partial(OneCycleLR, max_lr=0.05, total_steps=8))],
    )
    with pytest.raises(ValueError, match="written with the Adam optimiser but this fit uses SGD"):
        sgd.fit(1)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # fp16 overflow skip
def test_checkpoint_resumes_scaler(tmp_path):
    path = tmp_path / "c.pt"
    learn, _ = _ckpt_learner(path, 0, extra=[MixedPrecision("fp16")])
    learn.fit(1, valid=False)
    saved = load_checkpoint(path)
    assert saved["scaler"] is not None and saved["sched"] is not None
    probe = Probe(before_fit=lambda learn: learn.scaler.get_scale())
    probe.order = 40
    learn2, _ = _ckpt_learner(path, 1, extra=[MixedPrecision("fp16"), probe])
    learn2.fit(1, valid=False)
    assert probe.seen["before_fit"] == [saved["scaler"]["scale"]]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    learn, _ = _ckpt_learner(path, 0)
    learn.fit(1, valid=False)
    good = path.read_bytes()

    def dying_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(good[:100])  # half-written ...
        raise KeyboardInterrupt  # ... then the process is killed

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(1, valid=False)
    assert path.read_bytes() == good  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_checkpoint_errors(tmp_path):
    path = tmp_path / "c.pt"
    learn, _ = _ckpt_learner(path, 0)
    learn.fit(1, valid=False)
    other = Learner(nn.Linear(4, 1), _dls(), F.mse_loss, cbs=[CheckpointCB(path)])
    with pytest.raises(ValueError, match="written for another model"):
        other.fit(1)
    no_sched = Learner(
        _model(), _dls(), F.mse_loss, cbs=[CheckpointCB(path)], opt_func=torch.optim.Adam
    )
    with pytest.raises(ValueError, match="has a sched state"):
        no_sched.fit(1)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable fastnca checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="not a fastnca checkpoint"):
        load_checkpoint(tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="every"):
        CheckpointCB(path, every=0)


class _RunsCode:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_cb_refuses_a_pickle_with_code(tmp_path, capsys):
    path = tmp_path / "c.pt"
    torch.save({"format": "fastnca-checkpoint-1", "step": 1, "model": _RunsCode()}, path)
    learn, _ = _ckpt_learner(path, 0)
    with pytest.raises(ValueError, match="unsafe content"):
        learn.fit(1)
    assert "code ran" not in capsys.readouterr().out
