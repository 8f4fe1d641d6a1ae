"""Memory bounds written once: a job that would need more than ``MEMORY_FRACTION`` of this
machine's RAM is refused before any work, with what it would need, the limit and why.

The estimates are deliberately simple (the large tensors only, float32) and say which part
dominates, so the message tells the user which option to lower.
"""

from __future__ import annotations

import os

MEMORY_FRACTION = 0.5  # of physical RAM: beyond it a job swaps or is killed by the OOM killer
FALLBACK_RAM = 16 * 2**30  # when the platform does not say


def machine_memory() -> int:
    """Physical RAM of this machine in bytes."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return FALLBACK_RAM


def gib(n: float) -> str:
    v = n / 2**30
    return f"{v:.3g} GiB" if v < 1000 else f"{v:,.0f} GiB"


def check_memory(what: str, parts: dict[str, float], fix: str) -> int:
    """Raise ValueError if ``sum(parts)`` bytes exceed the limit; returns the estimate.

    ``parts``: name -> bytes of the large buffers (e.g. {"pool": ..., "rollout": ...}).
    """
    need = int(sum(parts.values()))
    ram = machine_memory()
    limit = int(MEMORY_FRACTION * ram)
    if need > limit:
        detail = " + ".join(f"{k} {gib(v)}" for k, v in parts.items() if v >= 2**20)
        raise ValueError(
            f"{what} would need about {gib(need)} of memory ({detail}), more than the limit of "
            f"{gib(limit)} ({MEMORY_FRACTION:.0%} of this machine's {gib(ram)} RAM; a larger job "
            f"would swap or be killed); {fix}"
        )
    return need
