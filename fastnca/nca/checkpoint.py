"""NCA checkpoints: one file holding the weights, the model config, a format version and, for a
training run, everything ``--resume`` needs.

Layout (a plain dict, saved with ``torch.save``, read back with ``torch.load(weights_only=True)``
so that loading never runs code from the file)::

    {"format": "fastnca-nca", "version": 2,
     "config": {"channels": C, "hidden": H, "fire_rate": p, "filters": [[[...]]] (F, 3, 3),
                "bias1": bool, "bias2": bool, "preset": name, ...},  # rebuilds the module
     "model": NCA state dict,
     "train": None or fastnca.train.checkpoint.capture(...)      # optimiser, scheduler, RNG, step,
              with "extra": {"iteration", "losses", "pool", ...}}  # and the sample pool

Version 1 files (written before the pool moved into the checkpoint: their pool is in ``pool.pt``
beside them) still load; :attr:`Checkpoint.train` gives both versions in the version-2 layout.
Files are written atomically (``fastnca._io``), so a crash or a kill mid-write never leaves a
half-written checkpoint where a good one was.

``load_checkpoint`` also accepts a lesson-layout state dict (``w1.weight`` (hidden, C*F, 1, 1),
``w1.bias`` (hidden,), ``w2.weight`` (C, hidden, 1, 1)) as saved from the fast.ai lesson's
``SimpleCA``: it is imported with the lesson's filters and fire rate 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastnca._io import atomic_save
from fastnca.train.checkpoint import CheckpointError, load_file

FORMAT = "fastnca-nca"
FORMAT_VERSION = 2
CHECKPOINT_NAME = "checkpoint.pt"  # the checkpoint inside a run directory
LESSON_KEYS = ("w1.weight", "w1.bias", "w2.weight")
# Step options of fastnca.ops.nca_step and the display rule (absent in older files: defaults).
STEP_KEYS = ("padding", "alive_threshold", "alive_channel", "clip", "perception_angle", "display")


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``config`` (dict), ``state_dict`` (the module's), ``train`` (resume
    state or None), ``path`` and ``source`` ("fastnca" or "lesson")."""

    config: dict
    state_dict: dict
    train: dict | None = None
    path: Path | None = None
    source: str = "fastnca"

    @property
    def iteration(self) -> int:
        return 0 if self.train is None else int(self.train["extra"].get("iteration", 0))

    @property
    def losses(self) -> list:
        return [] if self.train is None else list(self.train["extra"].get("losses", []))

    def build_model(self, device=None):
        """The NCA module this checkpoint describes, with its weights loaded."""
        from fastnca.nca.model import NCA

        try:
            model = NCA(**model_kwargs(self.config))
            model.load_state_dict(self.state_dict)
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            where = f"{str(self.path)!r}: " if self.path else ""
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{where}its weights do not fit its config ({first[:160]})"
            ) from None
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
        **(model.step_options() if hasattr(model, "step_options") else {}),
        "display": getattr(model, "display", None),
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
        **{k: config[k] for k in STEP_KEYS if config.get(k) is not None},
    }


def save_checkpoint(path, model, config: dict | None = None, train: dict | None = None) -> Path:
    """Write ``model``'s weights + config (+ optional resume state ``train``) to ``path``.

    ``config`` defaults to :func:`model_config`; extra JSON-able keys (e.g. the training preset)
    are kept. Non-finite weights are refused (a diverged run must not replace a good checkpoint).
    """
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    pool = (train or {}).get("extra", {}).get("pool")
    if isinstance(pool, torch.Tensor) and not torch.isfinite(pool).all():
        bad.append("pool")
    if bad:
        raise CheckpointError(f"{path}: not written: {bad} hold NaN/inf (the run diverged)")
    cfg = model_config(model)
    cfg.update(config or {})
    obj = {"format": FORMAT, "version": FORMAT_VERSION, "config": cfg, "model": sd, "train": train}
    return atomic_save(obj, path)


def resolve(path) -> Path:
    """A checkpoint file from a file, a run directory (``RUN_DIR/checkpoint.pt``) or ``zoo:NAME``
    (a model shipped in ``fastnca.nca.zoo``)."""
    from fastnca.nca.zoo import is_zoo_name, zoo_path

    if is_zoo_name(path):
        try:
            return zoo_path(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    p = Path(path).expanduser()
    if p.is_dir():
        f = p / CHECKPOINT_NAME
        if not f.is_file():
            raise CheckpointError(
                f"{str(p)!r} is not a run directory (no {CHECKPOINT_NAME} in "
                f"it); pass a checkpoint file or the -o directory of "
                f"`fastnca train`"
            )
        return f
    if not p.exists():
        raise CheckpointError(f"{str(p)!r}: no such checkpoint file or run directory")
    return p


def _train_state(train, version: int, p: Path) -> dict:
    """The resume state in the version-2 layout (a version-1 state is converted; its pool, kept
    in pool.pt then, is not in it)."""
    if not isinstance(train, dict):
        raise CheckpointError(f"{str(p)!r} is damaged: its training state is not a dict")
    try:
        if version >= 2:
            int(train["step"]), train["rng"]["torch"], dict(train["extra"])
            return train
        return {
            "step": int(train["iteration"]),
            "opt_class": None,
            "opt": train["optimizer"],
            "sched": train.get("scheduler"),
            "scaler": None,
            "missing_ok": ("sched",),
            "rng": {"torch": train["rng"], "cuda": train.get("cuda_rng"), "python": None},
            "extra": {
                "iteration": int(train["iteration"]),
                "losses": list(train["losses"]),
                "n_reseeds": int(train.get("n_reseeds", 0)),
            },
        }
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{str(p)!r} is damaged: its training state lacks {e}") from None


def is_lesson_state_dict(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(obj.get(k), torch.Tensor) for k in LESSON_KEYS)


def from_lesson_state_dict(sd: dict, path=None) -> Checkpoint:
    """A Checkpoint from the lesson's ``SimpleCA`` state dict (see the module docstring)."""
    from fastnca.nca.model import NCA

    where = f"{str(path)!r}: " if path is not None else ""
    w1, b1, w2 = (sd[k] for k in LESSON_KEYS)
    if w1.dim() != 4 or w2.dim() != 4 or b1.dim() != 1 or w2.shape[1] != w1.shape[0]:
        raise CheckpointError(
            f"{where}lesson state dict has inconsistent shapes: w1.weight "
            f"{tuple(w1.shape)}, w1.bias {tuple(b1.shape)}, w2.weight "
            f"{tuple(w2.shape)}; expected (H, C*F, 1, 1), (H,), (C, H, 1, 1)"
        )
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
    obj = load_file(p)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        version = obj.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{str(p)!r} has checkpoint format version {version!r}; this "
                f"fastnca reads up to {FORMAT_VERSION}: upgrade fastnca"
            )
        cfg, sd = obj.get("config"), obj.get("model")
        if not isinstance(cfg, dict) or not isinstance(sd, dict):
            raise CheckpointError(f"{str(p)!r} is damaged: no config or no weights in it")
        missing = [k for k in ("channels", "hidden", "fire_rate", "filters") if k not in cfg]
        if missing:
            raise CheckpointError(f"{str(p)!r} is damaged: its config lacks {missing}")
        train = obj.get("train")
        if train is not None:
            train = _train_state(train, version, p)
        return Checkpoint(cfg, sd, train, p, "fastnca")
    if is_lesson_state_dict(obj):
        return from_lesson_state_dict(obj, p)
    what = (
        f"a dict with keys {sorted(map(str, obj))[:6]}"
        if isinstance(obj, dict)
        else f"a {type(obj).__name__}"
    )
    raise CheckpointError(
        f"{str(p)!r} is not a fastnca NCA checkpoint (it holds {what}); expected "
        f"a file written by `fastnca train` or a lesson state dict with "
        f"{', '.join(LESSON_KEYS)}"
    )


def load_nca(path, device=None):
    """The NCA module of a checkpoint file, run directory or lesson state dict."""
    return load_checkpoint(path).build_model(device)


def add_to_zoo(run_dir, name: str, command: str, texture: str | None = None) -> Path:
    """Store the model of a `fastnca train` run as ``zoo/<name>.pt``: config + weights only (no
    pool, optimiser or RNG state), with the training command in ``config["zoo"]``. (Here, not in
    ``fastnca.nca.zoo``: the zoo is read by this module and must not import it.)"""
    from fastnca.nca.zoo import ZOO_DIR

    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"zoo name must be letters, digits, - or _, got {name!r}")
    ckpt = load_checkpoint(run_dir)
    model = ckpt.build_model()
    iters = (ckpt.train or {}).get("step")
    config = {k: v for k, v in ckpt.config.items() if k not in ("filters",)}
    config["zoo"] = {"name": name, "texture": texture, "command": command, "iterations": iters}
    return save_checkpoint(ZOO_DIR / f"{name}.pt", model, config=config, train=None)
