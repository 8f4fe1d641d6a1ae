"""Training state, captured and restored in one place: the one checkpoint system of fastnca.

``CheckpointCB`` and NCA run directories (``fastnca.nca.run``) both save :func:`capture` of a
Learner: the optimiser (with its class name), the LR scheduler, the gradient scaler, the random
number generators (torch CPU and CUDA, Python's ``random``), the step count and an ``extra``
dict the caller owns (e.g. the NCA sample pool), and restore it with :func:`restore`. Files are
written atomically (``fastnca._io``) and read with :func:`load_file`, which never runs code from a
file (``torch.load(weights_only=True)``) and names what is wrong in one line.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import torch

__all__ = ["CheckpointError", "capture", "get_rng_state", "load_file", "restore", "set_rng_state"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line and names the file."""


def load_file(path):
    """``torch.load(path, weights_only=True)`` on CPU; every failure is a one-line CheckpointError:
    missing, unreadable, truncated, not a torch file, or holding objects other than tensors and
    plain data (refused, never run)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{str(p)!r}: no such file")
    if not p.is_file():
        raise CheckpointError(f"{str(p)!r} is not a regular file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(
            f"{str(p)!r} is truncated or not a checkpoint ({type(e).__name__})"
        ) from None
    except pickle.UnpicklingError as e:
        msg = str(e)
        i = max(msg.find("Unsupported global:"), msg.find("unsupported GLOBAL"))
        if i >= 0:  # a pickled class or function: refused by weights_only, never run
            what = msg[i:].splitlines()[0].split(" was not an allowed global")[0]
            what = what.split(" whose module")[0]
            raise CheckpointError(
                f"{str(p)!r} holds unsafe content: objects other than tensors "
                f"and plain data ({what[:100]}); refused, nothing was run"
            ) from None
        raise CheckpointError(f"{str(p)!r} is truncated or not a torch checkpoint") from None
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{str(p)!r} is truncated or not a torch checkpoint ({first[:120]})"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{str(p)!r} could not be read ({type(e).__name__}: {e})") from None
    except Exception as e:  # a damaged archive can fail anywhere in the unpickler (KeyError, ...)
        raise CheckpointError(
            f"{str(p)!r} is truncated or not a torch checkpoint ({type(e).__name__})"
        ) from None


def get_rng_state() -> dict:
    """The random generators a training step draws from: torch (CPU, every CUDA device), Python."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("python") is not None:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))


def capture(learn, step: int, extra: dict | None = None) -> dict:
    """The resumable state of a Learner's fit (not the model: its weights are saved beside it)."""
    opt, sched, scaler = learn.opt, getattr(learn, "sched", None), getattr(learn, "scaler", None)
    return {
        "step": int(step),
        "opt_class": None if opt is None else type(opt).__name__,
        "opt": None if opt is None else opt.state_dict(),
        "sched": None if sched is None else sched.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": get_rng_state(),
        "extra": dict(extra or {}),
    }


def restore(learn, state: dict, where) -> None:
    """Load optimiser, scheduler and scaler state of :func:`capture` into ``learn`` (RNG state is
    restored by the caller at the point its run drew it: see ``set_rng_state``). A state that does
    not fit this fit's objects is a ValueError naming ``where`` and the difference."""
    opt_class = state.get("opt_class")
    if learn.opt is not None and opt_class not in (None, type(learn.opt).__name__):
        raise ValueError(
            f"checkpoint {where} was written with the {opt_class} optimiser but this "
            f"fit uses {type(learn.opt).__name__}; resume with the same optimiser "
            f"(opt_func) or start afresh"
        )
    lenient = state.get("missing_ok", ())  # states of older formats that never saved these
    objs = (
        ("opt", learn.opt),
        ("sched", getattr(learn, "sched", None)),
        ("scaler", getattr(learn, "scaler", None)),
    )
    for name, obj in objs:
        st = state.get(name)
        if st is None or obj is None:
            if (st is None) != (obj is None) and not (st is None and name in lenient):
                raise ValueError(
                    f"checkpoint {where} {'has no' if st is None else 'has a'} {name} state but "
                    f"this fit {'has' if st is None else 'has no'} one; resume with the same "
                    f"callbacks (MixedPrecision, schedulers) as the run that wrote it"
                )
            continue
        try:
            obj.load_state_dict(st)
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise ValueError(
                f"checkpoint {where}: its {name} state does not fit this fit's {name}: {e}"
            ) from None
