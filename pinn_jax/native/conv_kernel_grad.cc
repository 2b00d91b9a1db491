// Kernel gradient of a stride-1 NHWC / HWIO convolution, as an XLA FFI handler for XLA:CPU.
//
//   dk[i][j][c][o] = sum over (b, y, x) of xpad[b][y + i][x + j][c] * g[b][y][x][o]
//
// x (B, H, W, C) float32, g (B, Ho, Wo, O) float32 (the output gradient), dk (KH, KW, C, O);
// xpad is x with pad_top rows and pad_left columns of zeros before it (and whatever after it
// that makes Ho = H + pads - KH + 1): positions outside x contribute nothing.
//
// Why: XLA:CPU computes this as an Eigen convolution over the batch after transposing x to
// (C, H, W, B), ~100-160 GFLOP/s on the PtychoPINN CNN's layers, where its forward
// convolutions run at ~290. This is a matrix product over the (b, y, x) positions with the
// accumulator tile held in registers: rows of x (C contiguous) broadcast against vectors of g
// (O contiguous). Positions are split into contiguous row ranges, one per thread, each with
// its own accumulators, summed at the end; within a thread, rows are taken in chunks that fit
// the core's L2 cache, and every (tap, C block, O block) tile runs over the whole chunk.
// Built at first use by pinn_jax.native (g++ -O3 -march=native), loaded with ctypes and
// registered with jax.ffi.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads and stores

struct Shape {
  int64_t B, H, W, C, Ho, Wo, O, KH, KW, pad_top, pad_left;
};

// Calls fn(xp, gp, n) for each output row in [r0, r1) that tap (i, j) reaches: xp at channel 0
// of the first input column, gp at channel 0 of the first output column, n output columns whose
// input column lies inside x (consecutive positions are C and O floats apart).
template <typename Fn>
inline void ForEachRow(const Shape& s, int64_t i, int64_t j, int64_t r0, int64_t r1, Fn fn) {
  const int64_t x0 = std::max<int64_t>(0, s.pad_left - j);
  const int64_t x1 = std::min<int64_t>(s.Wo, s.W + s.pad_left - j);
  if (x1 <= x0) return;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t b = row / s.Ho, y = row % s.Ho;
    const int64_t yi = y + i - s.pad_top;
    if (yi < 0 || yi >= s.H) continue;
    fn(((b * s.H + yi) * s.W + (x0 + j - s.pad_left)) * s.C, ((b * s.Ho + y) * s.Wo + x0) * s.O, x1 - x0);
  }
}

// One tile: C rows [c, c + R) x O columns [o, o + 16 V) of tap (i, j), over the rows
// [r0, r1) of (b, y) positions. acc points at element (c, o) of tap (i, j)'s C x O block.
template <int R, int V>
void Tile(const Shape& s, const float* x, const float* g, int64_t i, int64_t j, int64_t c, int64_t o,
          int64_t r0, int64_t r1, float* acc) {
  v16 a[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) a[r][v] = *reinterpret_cast<const v16u*>(acc + r * s.O + 16 * v);
  ForEachRow(s, i, j, r0, r1, [&](int64_t x_at, int64_t g_at, int64_t n) {
    const float* xp = x + x_at + c;
    const float* gp = g + g_at + o;
    for (int64_t t = 0; t < n; ++t, xp += s.C, gp += s.O) {
      v16 gv[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) gv[v] = *reinterpret_cast<const v16u*>(gp + 16 * v);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float xv = xp[r];
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) a[r][v] += xv * gv[v];
      }
    }
  });
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) *reinterpret_cast<v16u*>(acc + r * s.O + 16 * v) = a[r][v];
}

// The last O % 16 columns, one at a time (no vector of them).
void ScalarColumns(const Shape& s, const float* x, const float* g, int64_t i, int64_t j, int64_t o0,
                   int64_t r0, int64_t r1, float* tap_acc) {
  ForEachRow(s, i, j, r0, r1, [&](int64_t x_at, int64_t g_at, int64_t n) {
    for (int64_t t = 0; t < n; ++t) {
      const float* xp = x + x_at + t * s.C;
      const float* gp = g + g_at + t * s.O;
      for (int64_t c = 0; c < s.C; ++c)
        for (int64_t o = o0; o < s.O; ++o) tap_acc[c * s.O + o] += xp[c] * gp[o];
    }
  });
}

template <int V>
void RowsTile(const Shape& s, const float* x, const float* g, int64_t i, int64_t j, int64_t c, int64_t rows,
              int64_t o, int64_t r0, int64_t r1, float* acc) {
  switch (rows) {
    case 6: Tile<6, V>(s, x, g, i, j, c, o, r0, r1, acc); break;
    case 5: Tile<5, V>(s, x, g, i, j, c, o, r0, r1, acc); break;
    case 4: Tile<4, V>(s, x, g, i, j, c, o, r0, r1, acc); break;
    case 3: Tile<3, V>(s, x, g, i, j, c, o, r0, r1, acc); break;
    case 2: Tile<2, V>(s, x, g, i, j, c, o, r0, r1, acc); break;
    default: Tile<1, V>(s, x, g, i, j, c, o, r0, r1, acc); break;
  }
}

// All taps over the rows [r0, r1), added into acc (KH, KW, C, O).
void Accumulate(const Shape& s, const float* x, const float* g, int64_t r0, int64_t r1, float* acc) {
  // rows per chunk: x and g rows of the chunk within ~512 KiB (L2)
  const int64_t row_bytes = 4 * s.Wo * (s.C + s.O);
  const int64_t chunk = std::max<int64_t>(1, (512 * 1024) / std::max<int64_t>(1, row_bytes));
  const int64_t o_vec = s.O - s.O % 16;
  for (int64_t c0 = r0; c0 < r1; c0 += chunk) {
    const int64_t c1 = std::min(r1, c0 + chunk);
    for (int64_t i = 0; i < s.KH; ++i) {
      for (int64_t j = 0; j < s.KW; ++j) {
        float* tap = acc + (i * s.KW + j) * s.C * s.O;
        for (int64_t c = 0; c < s.C; c += 6) {
          const int64_t rows = std::min<int64_t>(6, s.C - c);
          int64_t o = 0;
          for (; o + 64 <= o_vec; o += 64) RowsTile<4>(s, x, g, i, j, c, rows, o, c0, c1, tap + c * s.O + o);
          for (; o + 32 <= o_vec; o += 32) RowsTile<2>(s, x, g, i, j, c, rows, o, c0, c1, tap + c * s.O + o);
          for (; o + 16 <= o_vec; o += 16) RowsTile<1>(s, x, g, i, j, c, rows, o, c0, c1, tap + c * s.O + o);
        }
        if (o_vec < s.O) ScalarColumns(s, x, g, i, j, o_vec, c0, c1, tap);
      }
    }
  }
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk,
                      int64_t pad_top, int64_t pad_left, int64_t threads) {
  const auto xd = x.dimensions();
  const auto gd = g.dimensions();
  const auto kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4) {
    return ffi::Error::InvalidArgument("conv_kernel_grad: x, g and dk must be 4-d");
  }
  Shape s{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], kd[0], kd[1], pad_top, pad_left};
  if (gd[0] != s.B || kd[2] != s.C || kd[3] != s.O || pad_top < 0 || pad_left < 0) {
    return ffi::Error::InvalidArgument("conv_kernel_grad: shapes of x, g and dk do not agree");
  }
  const int64_t size = s.KH * s.KW * s.C * s.O;
  float* out = dk->typed_data();
  const int64_t rows = s.B * s.Ho;
  // a thread per ~32 output rows at least: small layers are not worth splitting
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, rows / 32));
  std::vector<std::vector<float>> partial(n - 1, std::vector<float>(size, 0.0f));
  std::memset(out, 0, sizeof(float) * size);
  auto range = [&](int64_t t) { return std::make_pair(rows * t / n, rows * (t + 1) / n); };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < n; ++t) {
    pool.emplace_back([&, t] {
      auto [r0, r1] = range(t);
      Accumulate(s, x.typed_data(), g.typed_data(), r0, r1, partial[t - 1].data());
    });
  }
  {
    auto [r0, r1] = range(0);
    Accumulate(s, x.typed_data(), g.typed_data(), r0, r1, out);
  }
  for (auto& th : pool) th.join();
  for (const auto& p : partial)
    for (int64_t e = 0; e < size; ++e) out[e] += p[e];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PinnJaxConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("threads"));
