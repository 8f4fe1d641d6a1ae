"""The static GPU report as markdown (docs/gpu_static.md): one row per kernel launch and target,
with registers, spills, shared memory, occupancy and the roofline floor on each card. Rows are
``fastnca.bench.gpu_static.Row``."""

from __future__ import annotations

from fastnca.bench.gpu_hw import ARCHS, CARDS, Arch, floor_us, occupancy


def _cell(res: dict, warps: int, arch: Arch) -> str:
    if res is None:
        return ""
    if "error" in res:
        return "compile error"
    blocks, occ = occupancy(res, warps, arch)
    spill = f"**{res['spill_stores']}**" if res["spill_stores"] else "0"
    return f"{res['regs']} / {spill} / {res['smem'] // 1024} / {blocks} ({occ:.0%})"


def markdown(rows: list, ccs) -> str:
    head = ["op", "shape", "dtype", "kernel", "config [tensor dtypes]", "grid", "warps"]
    head += [f"{ARCHS[cc].name}" for cc in ccs] + [f"floor µs {c.name}" for c in CARDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.case.op,
            r.case.shape,
            r.case.dtype,
            r.kernel,
            r.config,
            "x".join(map(str, r.grid)),
            str(r.warps),
        ]
        cells += [_cell(r.res.get(cc), r.warps, ARCHS[cc]) for cc in ccs]
        cells += [f"{floor_us(r.work, c):.1f}" for c in CARDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import torch
    import triton

    return f"triton {triton.__version__}, torch {torch.__version__}"


_DOC = """# Static GPU report

Every Triton kernel launch of fastnca, compiled for three NVIDIA targets on a machine without a GPU,
with the resources ptxas reports and the roofline floor of the launch. Regenerate with

    python -m fastnca.bench.gpu_static --write docs/gpu_static.md

(compiled results are cached under `~/.cache/fastnca/gpu_static`, or `$FASTNCA_GPU_STATIC_CACHE`,
keyed by Triton source hash, specialisation, options, target and triton version). CI runs
`python -m fastnca.bench.gpu_static --check`, which exits 1 naming every default configuration that
spills, exceeds the per-block shared memory or fails to compile on sm_80, sm_90 or sm_100.

How: the real launchers (`fastnca/kernels/*.py`) are called on meta tensors inside
`fastnca.kernels._launch.recording(GpuInfo(capability, SMs))`; they launch nothing and record the
kernel, arguments, constexprs, grid and warps they would use on that GPU (dot precision and
persistent grids follow the recorded capability and SM count, as on the card). Each launch is
compiled with Triton's own binder and `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32))` down to a cubin with the wheel's ptxas; `ptxas -v` gives registers and spill bytes, the
compiled metadata the shared memory.

Cases: nca_step and perceive at the lesson (4 channels, 8 hidden, 4x256x256), texture (12/96,
4x128x128) and 16/128 (4x128x128) shapes, 4 filters; gram and style_loss (training: residual
saved) at VGG16 relu1_1..relu5_1 of one 256x256 image (64/128/256/512/512 channels at 256², 128²,
64², 32², 16²); each in float32, bfloat16, float16, forward and backward launches. nca_step step
options, float32, only where they change the compiled kernels: `options=growing` (16/128, zero
padding, 3 filters; alive masking runs as torch max-pools around the kernels) and
`options=texture` (12/96, the four clips: forward with CLIP=15, the backward's gradient pass of
the update/state clips, backward with the perception/hidden clips).

Cell legend per target: `registers / spill-store bytes / shared memory KiB / blocks per SM
(occupancy)`. Occupancy = resident warps / 64, from registers (allocated per warp in units of 256,
65536 per SM), shared memory (per SM: sm_80 164 KiB, sm_90/sm_100 228 KiB; +1 KiB reserved per
block; per-block limit 163 / 227 KiB) and warps (64 per SM, 32 blocks).

Roofline floor of one launch, µs = max(bytes / HBM bandwidth, dot FLOPs / dot peak + other FLOPs /
FP32 peak), with the bytes the launch must move (its inputs and outputs once; scratch it writes,
such as nca_step's dP, counts) and the useful FLOPs (Gram: upper triangle). Peaks used (dense,
vendor data sheets): {cards}. Dot peak by precision: "ieee" = FP32 FMA, "tf32", "tf32x3" = TF32 / 3,
"half" (bf16/fp16 operands, fp32 accumulation). float32 Gram dots are "ieee" because torch's default
float32 matmul precision is "highest" (set "high" for TF32). sm_100 has no floor column; an
A100-80GB (2.039 TB/s) has floors 1.31x below the A100-40GB column where memory-bound.

Configuration rules (the launchers' defaults; docs/gpu_static_before.md has the table before them):
nca_step forward: 32 cells x 32 hidden units per chunk, 4 warps (16 cells when C*F > 64); the
hidden layer is looped over in chunks, so only a (32, 32) slice of the activations is live.
nca_step backward: one launch, two roles of persistent programs: dP (all hidden chunks) and, per
hidden chunk of 16, that chunk's weight-gradient partials; 32 cells, 8 warps. The nine filter taps
of the perception tile are reloaded per tile (volatile) instead of being hoisted out of the
persistent loop as nine register-resident tiles. Offsets inside an image are 32-bit unless
F*C*H*W can pass 2**31. Gram/style forward: 8 warps. `dot_precision` ("ieee", "tf32", "tf32x3",
"bf16", "fp16") is an opt-in of the nca_step launchers (and of the public `nca_step`); the
default keeps float32 accuracy (tf32x3 on sm_80+). With the perception clip the backward kernel
runs unpipelined (num_stages=1, not shown in the config column): software-pipelined, the clamped
perception tile took 190 KB of shared memory and spilled 44-76 B on every target.

sm_100 backward: 16 cells on 4 warps (a row of its own where it differs from the sm_80/sm_90
configuration): 32 cells on 8 warps spilled 16 B (float32) / 36 B (bf16, fp16) per thread there,
and 16 cells on 8 warps or one pipeline stage 12 to 1284 B. The config, grid and warps columns are
those of the first target with that configuration (the persistent grid follows each card's SMs).

"""


def document(rows: list, ccs) -> str:
    cards = "; ".join(
        f"{c.name} {c.bw / 1e12:.4g} TB/s, FP32 {c.fp32 / 1e12:.3g}, TF32 {c.tf32 / 1e12:.3g}, "
        f"bf16/fp16 {c.half / 1e12:.3g} TFLOP/s"
        for c in CARDS
    )
    return _DOC.format(cards=cards) + f"Made with {_versions()}.\n\n" + markdown(rows, ccs)
