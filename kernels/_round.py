"""Round-to-nearest-even downcasts that give the same bits compiled and interpreted.

Compiled Triton rounds float32 -> bfloat16 to nearest even (``cvt.rn.bf16.f32``), but the
interpreter (TRITON_INTERPRET=1, the CPU tests) truncates, even with
``fp_downcast_rounding="rtne"``. ``to_out`` therefore rounds bfloat16 by integer arithmetic on the
float32 bits, so the kernels store identical values on every path and the CPU tests check the
numerics that ship:

    bits' = bits + 0x7FFF + ((bits >> 16) & 1),   result = high 16 bits of bits'

(ties go to the even high half; a carry into the exponent rounds up to the next binade or to inf,
as IEEE round-to-nearest-even does; subnormals need no special case, bfloat16 shares float32's
exponent). The high half is bit-cast to bfloat16: no float cast is left for the interpreter to get
wrong (its float32 -> bfloat16 conversion also mangles subnormals). NaN becomes 0x7FC0.
float16 needs no help: the interpreter's numpy cast and compiled Triton both round to nearest even.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_out(y, dtype: tl.constexpr):
    # y: float32 (or float64) tile -> dtype, rounded to nearest even.
    if dtype == tl.bfloat16:
        y32 = y.to(tl.float32)
        bits = y32.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        hi = tl.where(y32 != y32, 0x7FC0, bits >> 16)  # NaN -> the canonical quiet NaN
        return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)
