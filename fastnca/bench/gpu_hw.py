"""The GPUs of the static report: per-SM limits of each compute capability, the peak rates of
the cards (roofline floors), and the occupancy a kernel's resources allow.

The one table of card peaks in fastnca: the static report (``gpu_static``), the benchmark
suites' "% of floor" columns (``fastnca bench`` on CUDA) and ``benchmarks/gpu_check.sh`` all read
:data:`CARDS` / :func:`card_for`. A card not listed has no floor, and the output says so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of one compute capability (CUDA programming guide, compute capabilities)."""

    cc: int
    name: str
    smem_sm: int  # shared memory per SM usable by blocks (bytes)
    smem_block: int  # opt-in maximum per block (bytes)
    regs_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    sms: int = 108  # SM count used for grids (A100 108, H100 SXM 132, B200 148)


ARCHS = {
    80: Arch(80, "sm_80 (A100)", 164 * 1024, 163 * 1024, sms=108),
    90: Arch(90, "sm_90 (H100/H200)", 228 * 1024, 227 * 1024, sms=132),
    100: Arch(100, "sm_100 (B200)", 228 * 1024, 227 * 1024, sms=148),
}
GATED = (80, 90)  # --check fails on these targets by default


@dataclass(frozen=True)
class Card:
    """Peak rates for the roofline floor (dense tensor-core rates, vendor data sheets)."""

    name: str
    cc: int
    bw: float  # HBM bytes/s
    fp32: float  # FP32 FMA on CUDA cores, FLOP/s
    tf32: float
    half: float  # bf16/fp16 tensor cores, fp32 accumulation


CARDS = (
    Card("A100-40GB", 80, 1.555e12, 19.5e12, 156e12, 312e12),
    Card("H100-SXM", 90, 3.35e12, 66.9e12, 494.7e12, 989.4e12),
    Card("H200", 90, 4.8e12, 66.9e12, 494.7e12, 989.4e12),
)
# Variants that torch.cuda.get_device_name() tells apart; not columns of the static report.
A100_80GB = Card("A100-80GB", 80, 2.039e12, 19.5e12, 156e12, 312e12)
H100_PCIE = Card("H100-PCIe", 90, 2.0e12, 51.2e12, 378e12, 756e12)


def card_for(device_name: str) -> Card | None:
    """The card of a ``torch.cuda.get_device_name()`` string ("NVIDIA H100 80GB HBM3" ->
    H100-SXM); None for a card without known peaks (no floor is reported for it)."""
    n = device_name.upper()
    if "H200" in n:
        return CARDS[2]
    if "H100" in n:
        return H100_PCIE if "PCIE" in n else CARDS[1]
    if "A100" in n:
        return A100_80GB if "80GB" in n else CARDS[0]
    return None


def floor_s(nbytes: float, flops: float, card: Card, kind: str = "ieee") -> float:
    """Roofline floor of one timed call: max(bytes / HBM bandwidth, FLOPs / peak rate of the
    arithmetic it runs), in seconds (``kind`` as in :func:`dot_rate`)."""
    return max(nbytes / card.bw, flops / dot_rate(card, kind) if flops else 0.0)


def dot_rate(card: Card, kind: str) -> float:
    # kind: "ieee" (FP32 FMA), "tf32", "tf32x3" (3 TF32 products), "bf16x3"/"bf16x6", "half".
    return {
        "ieee": card.fp32,
        "tf32": card.tf32,
        "tf32x3": card.tf32 / 3,
        "half": card.half,
        "bf16x3": card.half / 3,
        "bf16x6": card.half / 6,
    }[kind]


def occupancy(res: dict, warps: int, arch: Arch) -> tuple[int, float]:
    """(blocks per SM, fraction of the SM's warp slots) from registers, shared memory, warps."""
    if "error" in res or res["smem"] > arch.smem_block:
        return 0, 0.0
    regs_warp = -(-res["regs"] * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = arch.regs_sm // max(1, regs_warp * warps)
    by_smem = arch.smem_sm // (res["smem"] + 1024) if res["smem"] else arch.max_blocks
    blocks = min(by_regs, by_smem, arch.max_warps // warps, arch.max_blocks)
    return blocks, blocks * warps / arch.max_warps


def floor_us(w: tuple, card: Card) -> float:
    nbytes, dot, kind, other = w
    return 1e6 * max(
        nbytes / card.bw, (dot / dot_rate(card, kind) if dot else 0.0) + other / card.fp32
    )
