"""The model zoo: small trained NCAs shipped in the package (``fastnca/nca/zoo/<name>.pt``).

Each file is a fastnca checkpoint without training state (model config + weights); its config
also holds ``zoo``: the texture and the command that trained it (listed in README.md here).
``zoo:NAME`` names one wherever a checkpoint is accepted.

    zoo_names()               # ['checker', 'dots', ...]
    zoo_path("zoo:stripes")   # Path to the file (ValueError naming the known ones if unknown)
"""

from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
PREFIX = "zoo:"


def zoo_names() -> list[str]:
    """Names of the shipped models, sorted."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.pt"))


def is_zoo_name(source) -> bool:
    """True for a string ``zoo:NAME``."""
    return isinstance(source, str) and source.startswith(PREFIX)


def zoo_path(name: str) -> Path:
    """The file of zoo model ``name`` (with or without the ``zoo:`` prefix)."""
    key = name[len(PREFIX) :] if is_zoo_name(name) else name
    if key not in zoo_names():
        known = ", ".join(zoo_names()) or "none"
        raise ValueError(f"unknown zoo model {key!r}; the zoo has: {known} (see `fastnca zoo`)")
    return ZOO_DIR / f"{key}.pt"
