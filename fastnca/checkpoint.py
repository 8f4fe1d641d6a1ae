"""NCA checkpoints: one file holding the weights, the model config and a format version.

Layout (a plain dict, saved with ``torch.save``, read back with ``torch.load(weights_only=True)``
so that loading never runs code from the file)::

    {"format": "fastnca-nca", "version": 1,
     "config": {"channels": C, "hidden": H, "fire_rate": p, "filters": [[[...]]] (F, 3, 3),
                "bias1": bool, "bias2": bool, "preset": name, ...},  # rebuilds the module
     "model": NCA state dict,
     "train": None or {"iteration": i, "losses": [...], "optimizer": ..., "scheduler": ...,
                       "rng": ...}}            # what --resume needs to continue the same run

Files are written atomically (a temporary file in the same directory, fsync, ``os.replace``), so a
crash or Ctrl-C mid-write never leaves a half-written checkpoint where a good one was.

``load_checkpoint`` also accepts a lesson-layout state dict (``w1.weight`` (hidden, C*F, 1, 1),
``w1.bias`` (hidden,), ``w2.weight`` (C, hidden, 1, 1)) as saved from the fast.ai lesson's
``SimpleCA``: it is imported with the lesson's filters and fire rate 0.5.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "fastnca-nca"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"  # the checkpoint inside a run directory
LESSON_KEYS = ("w1.weight", "w1.bias", "w2.weight")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line and names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``config`` (dict), ``state_dict`` (the module's), ``train`` (resume
    state or None), ``path`` and ``source`` ("fastnca" or "lesson")."""

    config: dict
    state_dict: dict
    train: dict | None = None
    path: Path | None = None
    source: str = "fastnca"
    extra: dict = field(default_factory=dict)

    def build_model(self, device=None):
        """The NCA module this checkpoint describes, with its weights loaded."""
        from fastnca.nca import NCA

        model = NCA(**model_kwargs(self.config))
        model.load_state_dict(self.state_dict)
        return model.to(device) if device is not None else model


def model_config(model, preset: str | None = None) -> dict:
    """The JSON-able config that rebuilds ``model`` (an ``fastnca.nca.NCA``)."""
    return {
        "channels": int(model.channels),
        "hidden": int(model.hidden),
        "fire_rate": float(model.fire_rate),
        "filters": model.filters.detach().cpu().double().tolist(),
        "bias1": model.w1.bias is not None,
        "bias2": model.w2.bias is not None,
        "preset": preset,
    }


def model_kwargs(config: dict) -> dict:
    """``NCA(**model_kwargs(config))`` rebuilds the module of a checkpoint config."""
    return {
        "channels": int(config["channels"]),
        "hidden": int(config["hidden"]),
        "fire_rate": float(config["fire_rate"]),
        "filters": torch.tensor(config["filters"], dtype=torch.float32),
        "bias1": bool(config.get("bias1", True)),
        "bias2": bool(config.get("bias2", False)),
    }


def _chmod_default(path) -> None:
    """mkstemp makes 0600 files; give the final file the usual 0666 & ~umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_save(obj, path) -> Path:
    """``torch.save(obj)`` to a temporary file beside ``path``, fsync, then ``os.replace``."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _chmod_default(tmp)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def atomic_write_json(obj: dict, path) -> Path:
    """``json.dump(obj)`` to ``path`` through a temporary file and ``os.replace``."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        _chmod_default(tmp)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def save_checkpoint(path, model, config: dict | None = None, train: dict | None = None) -> Path:
    """Write ``model``'s weights + config (+ optional resume state ``train``) to ``path``.

    ``config`` defaults to :func:`model_config`; extra JSON-able keys (e.g. the training preset)
    are kept. Non-finite weights are refused (a diverged run must not replace a good checkpoint).
    """
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: not written: weights {bad} hold NaN/inf (the run diverged)")
    cfg = model_config(model)
    cfg.update(config or {})
    obj = {"format": FORMAT, "version": FORMAT_VERSION, "config": cfg, "model": sd, "train": train}
    return atomic_save(obj, path)


def resolve(path) -> Path:
    """A checkpoint file from a file or a run directory (``RUN_DIR/checkpoint.pt``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        f = p / CHECKPOINT_NAME
        if not f.is_file():
            raise CheckpointError(f"{str(p)!r} is not a run directory (no {CHECKPOINT_NAME} in "
                                  f"it); pass a checkpoint file or the -o directory of "
                                  f"`fastnca train`")
        return f
    if not p.exists():
        raise CheckpointError(f"{str(p)!r}: no such checkpoint file or run directory")
    return p


def load_file(path):
    """``torch.load(path, weights_only=True)`` on CPU; a bad file raises CheckpointError."""
    return _torch_load(Path(path).expanduser())


def _torch_load(p: Path):
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{str(p)!r} is truncated or not a checkpoint ({type(e).__name__})") \
            from None
    except pickle.UnpicklingError as e:
        msg = str(e)
        i = msg.find("Unsupported global:")
        if i >= 0:  # a pickled class or function: refused by weights_only, never run
            what = msg[i:].splitlines()[0].split(" was not an allowed global")[0]
            raise CheckpointError(f"{str(p)!r} is not a fastnca checkpoint: it holds objects "
                                  f"other than tensors and plain data ({what[:100]})") from None
        raise CheckpointError(f"{str(p)!r} is truncated or not a torch checkpoint") from None
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{str(p)!r} is truncated or not a torch checkpoint "
                              f"({first[:120]})") from None
    except OSError as e:
        raise CheckpointError(f"{str(p)!r} could not be read ({type(e).__name__}: {e})") from None
    except Exception as e:  # a damaged archive can fail anywhere in the unpickler (KeyError, ...)
        raise CheckpointError(f"{str(p)!r} is truncated or not a torch checkpoint "
                              f"({type(e).__name__})") from None


def is_lesson_state_dict(obj) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(obj.get(k), torch.Tensor) for k in LESSON_KEYS)


def from_lesson_state_dict(sd: dict, path=None) -> Checkpoint:
    """A Checkpoint from the lesson's ``SimpleCA`` state dict (see the module docstring)."""
    from fastnca.nca import NCA

    where = f"{str(path)!r}: " if path is not None else ""
    w1, b1, w2 = (sd[k] for k in LESSON_KEYS)
    if w1.dim() != 4 or w2.dim() != 4 or b1.dim() != 1 or w2.shape[1] != w1.shape[0]:
        raise CheckpointError(f"{where}lesson state dict has inconsistent shapes: w1.weight "
                              f"{tuple(w1.shape)}, w1.bias {tuple(b1.shape)}, w2.weight "
                              f"{tuple(w2.shape)}; expected (H, C*F, 1, 1), (H,), (C, H, 1, 1)")
    try:
        model = NCA.from_lesson_state_dict(sd)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{where}cannot import the lesson state dict: {e}") from None
    cfg = model_config(model, preset="lesson-import")
    return Checkpoint(cfg, model.state_dict(), None, Path(path) if path else None, "lesson")


def load_checkpoint(path) -> Checkpoint:
    """Read a fastnca checkpoint (a file or a run directory) or a lesson-layout state dict.

    Raises ``CheckpointError`` (a ValueError, one line naming the file) for a missing, truncated,
    foreign or newer-format file.
    """
    p = resolve(path)
    obj = _torch_load(p)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        version = obj.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{str(p)!r} has checkpoint format version {version!r}; this "
                                  f"fastnca reads up to {FORMAT_VERSION}: upgrade fastnca")
        cfg, sd = obj.get("config"), obj.get("model")
        if not isinstance(cfg, dict) or not isinstance(sd, dict):
            raise CheckpointError(f"{str(p)!r} is damaged: no config or no weights in it")
        missing = [k for k in ("channels", "hidden", "fire_rate", "filters") if k not in cfg]
        if missing:
            raise CheckpointError(f"{str(p)!r} is damaged: its config lacks {missing}")
        return Checkpoint(cfg, sd, obj.get("train"), p, "fastnca")
    if is_lesson_state_dict(obj):
        return from_lesson_state_dict(obj, p)
    what = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) \
        else f"a {type(obj).__name__}"
    raise CheckpointError(f"{str(p)!r} is not a fastnca NCA checkpoint (it holds {what}); expected "
                          f"a file written by `fastnca train` or a lesson state dict with "
                          f"{', '.join(LESSON_KEYS)}")


def load_nca(path, device=None):
    """The NCA module of a checkpoint file, run directory or lesson state dict."""
    return load_checkpoint(path).build_model(device)
