// Circular 3x3 stencils on CPU, row block by row block of one channel plane: the padding, the
// filters and their adjoint shared by the C++ kernels of perceive and nca_step. A filter bank is
// a list of taps (filter f, row a, column e, value v): filter f at (i, j) reads the plane at
// (i + a - 1, j + e - 1) with weight v (cross-correlation, as F.conv2d).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace fastnca {

struct Tap {
  int f, a, e;
  double v;
};

// taps: (K, 4) float64 rows (f, a, e, v).
inline std::vector<Tap> read_taps(const at::Tensor& taps) {
  auto t = taps.to(at::kDouble).contiguous();
  const double* p = t.data_ptr<double>();
  std::vector<Tap> out;
  for (int64_t k = 0; k < t.size(0); ++k)
    out.push_back({int(p[4 * k]), int(p[4 * k + 1]), int(p[4 * k + 2]), p[4 * k + 3]});
  return out;
}

// Per-thread scratch buffers, kept across calls (torch's OpenMP threads live as long as the
// process): no allocation, page faults or zero fill per tile or per call.
template <typename T>
T* scratch(int slot, int64_t n) {
  static thread_local std::vector<T> bufs[12];
  if (int64_t(bufs[slot].size()) < n) bufs[slot].resize(n);
  return bufs[slot].data();
}

// Runs fn(i) for i in [0, n) on torch's intra-op threads, handing out the next i to whichever
// thread is free (a slow or preempted thread does not hold the others up at the end).
template <typename F>
void parallel_dynamic(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    at::NoGradGuard no_grad;  // grad mode is per thread: the workers' own
    for (int64_t i = next++; i < n; i = next++) fn(i);
  });
}

// xp (rb+2, W+2) <- rows r0-1 .. r0+rb of the plane x (H, W), circular in both dims.
template <typename T>
void pad_rows(const T* x, int64_t H, int64_t W, int64_t r0, int64_t rb, T* xp) {
  for (int64_t rr = 0; rr < rb + 2; ++rr) {
    const T* src = x + ((r0 - 1 + rr) % H + H) % H * W;
    T* dst = xp + rr * (W + 2);
    std::copy(src, src + W, dst + 1);
    dst[0] = src[W - 1];
    dst[W + 1] = src[0];
  }
}

// out[f] rows 0..rb-1 (row stride W, filter f at out + f * fstride) <- filter f on the padded rows
// xp (rb+2, W+2). Row by row, so that an output row stays in L1 while its taps accumulate.
template <typename T>
void filter_rows(const T* xp, int64_t rb, int64_t W, int64_t nf, const std::vector<Tap>& taps,
                 T* out, int64_t fstride) {
  for (int64_t r = 0; r < rb; ++r) {
    for (int64_t f = 0; f < nf; ++f) std::fill_n(out + f * fstride + r * W, W, T(0));
    for (const Tap& k : taps) {
      const T v = T(k.v);
      T* __restrict o = out + k.f * fstride + r * W;
      const T* __restrict s = xp + (r + k.a) * (W + 2) + k.e;
      for (int64_t j = 0; j < W; ++j) o[j] += v * s[j];
    }
  }
}

// acc (rb+2, W+2) += the filters' adjoint of src[f] rows 0..rb-1 (src + f * fstride, stride W):
// each tap sends a value back to the cell it read, acc[r + a, j + e] += v * src[f][r, j].
template <typename T>
void adjoint_rows(const T* src, int64_t fstride, int64_t rb, int64_t W,
                  const std::vector<Tap>& taps, T* acc) {
  for (int64_t r = 0; r < rb; ++r)
    for (const Tap& k : taps) {
      const T v = T(k.v);
      const T* __restrict s = src + k.f * fstride + r * W;
      T* __restrict a = acc + (r + k.a) * (W + 2) + k.e;
      for (int64_t j = 0; j < W; ++j) a[j] += v * s[j];
    }
}

// The adjoint of the circular padding, part 1: the halo columns of acc (rows, W+2) folded onto
// the opposite edges. The halo rows (0 and rb+1) belong to other row blocks: the caller adds
// them where they go (after the parallel loop, as the blocks run concurrently).
template <typename T>
void fold_columns(T* acc, int64_t rows, int64_t W) {
  for (int64_t rr = 0; rr < rows; ++rr) {
    T* a = acc + rr * (W + 2);
    a[1] += a[W + 1];
    a[W] += a[0];
  }
}

// The adjoint of the circular padding, part 2: the halo rows top and bottom (W each) of the
// block at rows r0 .. r0+rb-1 of the plane (H, W) added to the rows they stand for.
template <typename T>
void add_halo_rows(T* plane, int64_t H, int64_t W, int64_t r0, int64_t rb, const T* top,
                   const T* bottom) {
  T* up = plane + (r0 - 1 + H) % H * W;
  T* down = plane + (r0 + rb) % H * W;
  for (int64_t j = 0; j < W; ++j) up[j] += top[j];
  for (int64_t j = 0; j < W; ++j) down[j] += bottom[j];
}

}  // namespace fastnca
