"""Training strategies as callbacks: MixedPrecision (torch.amp), AccelerateCB (HuggingFace
Accelerate: mixed precision and multi-process) and CompileCB (torch.compile).

Each composes with any training callback (TrainCB or a subclass): they set ``learn.scaler`` /
``learn.accelerator`` and TrainCB's backward/step go through them. ``accelerate`` is imported only
when an AccelerateCB is made.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader

from fastnca._device import default_device
from fastnca.train.data import MultDL
from fastnca.train.learner import Callback, _n_inp_ok

__all__ = ["AccelerateCB", "CompileCB", "MixedPrecision", "check_autocast"]

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
_ACC_PRECISIONS = ("no", "bf16", "fp16")


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_autocast(device_type: str, dtype: torch.dtype) -> None:
    """Raise ValueError when ``torch.autocast(device_type, dtype)`` would not run (torch only
    warns and silently disables it)."""
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(
            "MixedPrecision(bfloat16): this GPU does not support bfloat16; use dtype=torch.float16"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device_type, dtype=dtype):
                enabled = torch.is_autocast_enabled(device_type)
        except RuntimeError as e:
            raise ValueError(f"autocast to {dtype} is not available on {device_type}: {e}") from e
    bad = [str(w.message) for w in caught if "not supported" in str(w.message)]
    if bad or not enabled:
        raise ValueError(
            f"autocast to {dtype} is not supported on {device_type}"
            + (f" ({bad[0].splitlines()[-1]})" if bad else "")
            + "; pick another dtype or device"
        )


class MixedPrecision(Callback):
    """Run predict and get_loss under ``torch.autocast(<model's device>, dtype)``.

    ``dtype``: torch.bfloat16 (default; no gradient scaling needed; works on CPU) or
    torch.float16 (a ``torch.amp.GradScaler(**scaler_kwargs)``, e.g. ``init_scale=2.0**10``,
    becomes ``learn.scaler``: the loss is scaled before backward and steps with inf/nan gradients
    are skipped while the scale adapts). Strings "bf16"/"fp16" also work.
    Autocast is entered in before_batch and left in after_loss (or cleanup_batch after a cancel).
    """

    order = 10  # after DeviceCB moved the model

    def __init__(self, dtype: torch.dtype | str = torch.bfloat16, **scaler_kwargs):
        if isinstance(dtype, str):
            if dtype.lower() not in _DTYPES:
                raise ValueError(
                    f"dtype must be torch.bfloat16 or torch.float16 (or 'bf16', "
                    f"'fp16'), got {dtype!r}"
                )
            dtype = _DTYPES[dtype.lower()]
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"dtype must be torch.bfloat16 or torch.float16 (or 'bf16', 'fp16'), got {dtype!r}"
            )
        if scaler_kwargs and dtype != torch.float16:
            raise ValueError(
                f"GradScaler options ({', '.join(scaler_kwargs)}) only apply to "
                "dtype=torch.float16; bfloat16 needs no gradient scaling"
            )
        self.dtype, self.scaler_kwargs = dtype, scaler_kwargs
        self._ctx = None

    def before_fit(self, learn):
        self.device_type = _model_device(learn.model).type
        check_autocast(self.device_type, self.dtype)
        fp16 = self.dtype == torch.float16
        learn.scaler = (
            torch.amp.GradScaler(self.device_type, **self.scaler_kwargs) if fp16 else None
        )

    def before_batch(self, learn):
        self._ctx = torch.autocast(self.device_type, dtype=self.dtype)
        self._ctx.__enter__()

    def _leave(self):
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)

    def after_loss(self, learn):
        self._leave()

    def cleanup_batch(self, learn):
        self._leave()

    def cleanup_fit(self, learn):
        learn.scaler = None

    def __repr__(self):
        return f"MixedPrecision({self.dtype})"


def _no_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return default_device().type == "cpu" and not (xpu is not None and xpu.is_available())


def _make_accelerator(mixed_precision: str, **kwargs):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Without a GPU, Accelerate needs cpu=True to form a multi-process (gloo) group under torchrun.
    kwargs.setdefault("cpu", _no_accelerator_device())

    try:
        return Accelerator(mixed_precision=mixed_precision, **kwargs)
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
    # Accelerate keeps one process-wide state and refuses a second Accelerator with another
    # precision. Reset only the precision part (the process group, if any, is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, **kwargs)


class AccelerateCB(Callback):
    """Train through one HuggingFace ``Accelerator`` (``self.acc``, also ``learn.accelerator``).

    before_fit: ``prepare`` the model, optimiser and both loaders (a MultDL's inner DataLoader is
    prepared, so it is sharded across processes); backward goes through
    ``accelerator.backward``. cleanup_fit puts the unwrapped model, plain optimiser and the
    original loaders back. ``mixed_precision``: "no", "bf16" or "fp16" (fp16 needs a GPU). The
    device is the Accelerator's (a GPU when present, else CPU). ``n_inp`` is used by the TrainCB
    the Learner adds when no training callback is given. Launch several processes with
    ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu --num_processes N`` (on a
    CPU-only machine too: without a GPU the Accelerator is made with ``cpu=True`` and uses gloo).
    """

    order = 10

    def __init__(self, mixed_precision: str = "no", n_inp: int = 1, **accelerator_kwargs):
        if mixed_precision not in _ACC_PRECISIONS:
            names = ", ".join(map(repr, _ACC_PRECISIONS))
            raise ValueError(f"mixed_precision must be one of {names}, got {mixed_precision!r}")
        self.n_inp = _n_inp_ok(n_inp)
        self.mixed_precision = mixed_precision
        self.acc = _make_accelerator(mixed_precision, **accelerator_kwargs)
        if mixed_precision == "fp16" and self.acc.device.type == "cpu":
            raise ValueError(
                "AccelerateCB(mixed_precision='fp16') needs a GPU (Accelerate does "
                "not scale fp16 gradients on CPU); use 'bf16' on CPU"
            )

    @property
    def num_processes(self) -> int:
        return int(self.acc.num_processes)

    def _prepare_dl(self, dl):
        if isinstance(dl, DataLoader):
            return self.acc.prepare(dl)
        if isinstance(dl, MultDL) and isinstance(dl.dl, DataLoader):
            return MultDL(self.acc.prepare(dl.dl), dl.mult)
        if self.acc.num_processes > 1:
            warnings.warn(
                f"AccelerateCB: a {type(dl).__name__} loader is not a DataLoader and is "
                "not sharded: every process sees the same batches",
                RuntimeWarning,
                stacklevel=2,
            )
        return dl

    def before_fit(self, learn):
        self._orig = (learn.model, learn.opt, learn.dls.train, learn.dls.valid)
        if learn.opt is not None:
            learn.model, learn.opt = self.acc.prepare(learn.model, learn.opt)
        else:
            learn.model = self.acc.prepare(learn.model)
        learn.dls.train = self._prepare_dl(learn.dls.train)
        learn.dls.valid = self._prepare_dl(learn.dls.valid)
        learn.accelerator = self.acc

    def cleanup_fit(self, learn):
        if not hasattr(self, "_orig"):
            return
        model, opt, learn.dls.train, learn.dls.valid = self._orig
        # Drop the autocast wrapper Accelerate put on model.forward; keep the trained weights.
        self.acc.unwrap_model(learn.model, keep_fp32_wrapper=False)
        # In one process `prepare` returns the user's module itself and flags it as prepared,
        # which would make the next fit's `prepare` a no-op (no autocast, no DDP): unflag it.
        vars(model).pop("_is_accelerate_prepared", None)
        learn.model, learn.opt = model, opt
        learn.accelerator = None
        # Forget this fit's prepared objects (each fit prepares afresh; avoid holding them).
        for name in ("_models", "_optimizers", "_dataloaders", "_schedulers"):
            lst = getattr(self.acc, name, None)
            if isinstance(lst, list):
                lst.clear()
        del self._orig

    def __repr__(self):
        return f"AccelerateCB(mixed_precision={self.mixed_precision!r}, n_inp={self.n_inp})"


class CompileCB(Callback):
    """``torch.compile`` the model in place (``nn.Module.compile(**kwargs)``) at the first fit.

    State-dict keys and ``isinstance`` are unchanged and later fits reuse the compiled code; the
    model stays compiled after the fit. Runs before AccelerateCB, so the inner module is compiled.
    """

    order = 5

    def __init__(self, **torch_compile_kwargs):
        self.kwargs = torch_compile_kwargs

    def before_fit(self, learn):
        m = learn.model
        if getattr(m, "_compiled_call_impl", None) is None:
            m.compile(**self.kwargs)

    def __repr__(self):
        return f"CompileCB({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"
