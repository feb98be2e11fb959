// Products over per-token slots as XLA FFI custom calls (CPU): each token b has K slots
// (a latent id idx[b, j] and a value v[b, j]), e.g. AuxK's top aux_k dead latents.
//
//   MetasaeSlotGatherSum:   out[b]    = sum_j v[b, j] * w[idx[b, j]]          (B x D)
//   MetasaeSlotGatherDot:   out[b, j] = g[b] . w[idx[b, j]] where v[b, j] != 0, else 0   (B x K)
//   MetasaeSlotScatterOuter: out[i]   = sum_{(b, j): idx[b, j] = i} v[b, j] * rows[b]   (N x D)
//                            sums[i]  = sum_{(b, j): idx[b, j] = i} v[b, j]             (N)
//
// These are a decoder over the slots, its value gradient and its (decoder or
// encoder) weight gradient. As dense matmuls each costs 2*B*N*D; here 2*B*K*D,
// K = 512 of N = 9216 for AuxK at the paper's shape. Slots with value 0 are
// absent: skipped in the sums, and their dot is 0. Every loop over D runs in
// blocks of 64 floats held in registers, so a gathered row is read once from
// cache and the output is written once. Rows (or,
// for the scatter, latents, balanced by their slot counts) are split over threads.
// An index outside [0, N) is an error, not a silent out-of-bounds read.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "ranges.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using metasae::ForRanges;

namespace {

typedef float V8 __attribute__((vector_size(32), aligned(4)));  // 8 floats, unaligned loads allowed
constexpr int64_t kBlock = 64;                                  // floats per register block (8 x V8)
constexpr int64_t kMinRows = 16;                                // rows (or latents) per thread at least
constexpr int64_t kAhead = 8;                                   // prefetch distance, in terms of a sum

inline V8 Load(const float* p) { return *reinterpret_cast<const V8*>(p); }
inline void Store(float* p, V8 v) { *reinterpret_cast<V8*>(p) = v; }
inline V8 Splat(float a) { return V8{a, a, a, a, a, a, a, a}; }

// acc[0:len] = sum over terms t of a[t] * src[t][0:len] for len <= kBlock, written to out.
// `row(t)` gives src[t], `coef(t)` gives a[t].
template <typename Row, typename Coef>
void AxpyBlock(int64_t terms, Row row, Coef coef, int64_t off, int64_t len, float* out) {
  if (len == kBlock) {
    V8 acc[8] = {};
    for (int64_t t = 0; t < terms; ++t) {
      if (t + kAhead < terms) {  // rows are scattered in memory: ask for one kAhead terms ahead
        const char* next = reinterpret_cast<const char*>(row(t + kAhead) + off);
        for (int line = 0; line < 4; ++line) __builtin_prefetch(next + 64 * line);
      }
      const V8 a = Splat(coef(t));
      const float* src = row(t) + off;
      for (int u = 0; u < 8; ++u) acc[u] += a * Load(src + 8 * u);
    }
    for (int u = 0; u < 8; ++u) Store(out + off + 8 * u, acc[u]);
    return;
  }
  float acc[kBlock] = {};
  for (int64_t t = 0; t < terms; ++t) {
    const float a = coef(t);
    const float* src = row(t) + off;
    for (int64_t c = 0; c < len; ++c) acc[c] += a * src[c];
  }
  std::memcpy(out + off, acc, len * sizeof(float));
}

inline float Sum(V8 v) {
  float total = 0.0f;
  for (int u = 0; u < 8; ++u) total += v[u];
  return total;
}

// out[t] = g . rows[t] for four rows at once: each block of g is loaded once for all four. The four
// rows of the next call (`next`, scattered in memory) are prefetched alongside.
inline void Dot4(const float* g, const float* const rows[4], const float* const next[4], int64_t d, float* out) {
  V8 acc[4][2] = {};
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    for (int t = 0; t < 4; ++t) __builtin_prefetch(next[t] + c);
    const V8 g0 = Load(g + c), g1 = Load(g + c + 8);
    for (int t = 0; t < 4; ++t) {
      acc[t][0] += g0 * Load(rows[t] + c);
      acc[t][1] += g1 * Load(rows[t] + c + 8);
    }
  }
  for (int t = 0; t < 4; ++t) {
    float total = Sum(acc[t][0] + acc[t][1]);
    for (int64_t e = c; e < d; ++e) total += g[e] * rows[t][e];
    out[t] = total;
  }
}

// Checks two [B, K] slot arrays and their indices against N; sets b, k or returns the error.
ffi::Error SlotShapes(ffi::Buffer<ffi::F32> slots, ffi::Buffer<ffi::S32> idx, int64_t n, int64_t* b, int64_t* k) {
  auto sd = slots.dimensions();
  auto id = idx.dimensions();
  if (sd.size() != 2 || id.size() != 2 || sd[0] != id[0] || sd[1] != id[1])
    return ffi::Error::InvalidArgument("slot ops need [B, K] values and indices of the same shape");
  *b = sd[0];
  *k = sd[1];
  const int32_t* ix = idx.typed_data();
  for (int64_t i = 0; i < *b * *k; ++i)
    if (ix[i] < 0 || ix[i] >= n) return ffi::Error::InvalidArgument("slot index outside [0, N)");
  return ffi::Error::Success();
}

void GatherSumRaw(const float* v, const int32_t* ix, const float* tab, float* o, int64_t b, int64_t k, int64_t d,
                  int64_t threads) {
  ForRanges(b, threads, kMinRows, nullptr, [=](int64_t begin, int64_t end) {
    std::vector<int32_t> live(k);
    std::vector<float> coef(k);
    for (int64_t r = begin; r < end; ++r) {
      int64_t m = 0;
      for (int64_t j = 0; j < k; ++j) {
        const float a = v[r * k + j];
        if (a != 0.0f) {
          live[m] = ix[r * k + j];
          coef[m++] = a;
        }
      }
      auto row = [&](int64_t t) { return tab + static_cast<int64_t>(live[t]) * d; };
      auto c = [&](int64_t t) { return coef[t]; };
      for (int64_t off = 0; off < d; off += kBlock) AxpyBlock(m, row, c, off, std::min(kBlock, d - off), o + r * d);
    }
  });
}

ffi::Error GatherSumImpl(ffi::Buffer<ffi::F32> vals, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> out, int64_t threads) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("slot gather needs an [N, D] table");
  const int64_t n = wd[0], d = wd[1];
  int64_t b, k;
  ffi::Error err = SlotShapes(vals, idx, n, &b, &k);
  if (err.failure()) return err;
  GatherSumRaw(vals.typed_data(), idx.typed_data(), w.typed_data(), out->typed_data(), b, k, d, threads);
  return ffi::Error::Success();
}

void GatherDotRaw(const float* gr, const int32_t* ix, const float* tab, const float* v, float* o, int64_t b,
                  int64_t k, int64_t d, int64_t threads) {
  ForRanges(b, threads, kMinRows, nullptr, [=](int64_t begin, int64_t end) {
    std::vector<int64_t> live(k);
    for (int64_t r = begin; r < end; ++r) {
      int64_t m = 0;
      for (int64_t j = 0; j < k; ++j) {
        o[r * k + j] = 0.0f;
        if (v[r * k + j] != 0.0f) live[m++] = j;
      }
      // Four slots at a time (a short group repeats its last slot).
      auto group = [&](int64_t j, const float** rows) {
        const int64_t q = std::min<int64_t>(4, m - j);
        for (int64_t t = 0; t < 4; ++t) rows[t] = tab + static_cast<int64_t>(ix[r * k + live[j + std::min(t, q - 1)]]) * d;
      };
      const float* rows[4];
      const float* next[4];
      float dots[4];
      if (m > 0) group(0, rows);
      for (int64_t j = 0; j < m; j += 4) {
        if (j + 4 < m) {
          group(j + 4, next);
        } else {
          std::copy(rows, rows + 4, next);
        }
        Dot4(gr + r * d, rows, next, d, dots);
        for (int64_t t = 0; t < std::min<int64_t>(4, m - j); ++t) o[r * k + live[j + t]] = dots[t];
        std::copy(next, next + 4, rows);
      }
    }
  });
}

ffi::Error GatherDotImpl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> vals, ffi::ResultBuffer<ffi::F32> out, int64_t threads) {
  auto wd = w.dimensions();
  auto gd = g.dimensions();
  if (wd.size() != 2 || gd.size() != 2 || gd[1] != wd[1])
    return ffi::Error::InvalidArgument("slot dot needs [B, D] rows and an [N, D] table");
  const int64_t n = wd[0], d = wd[1];
  int64_t b, k;
  ffi::Error err = SlotShapes(vals, idx, n, &b, &k);
  if (err.failure()) return err;
  if (gd[0] != b) return ffi::Error::InvalidArgument("slot dot needs one row per token");
  GatherDotRaw(g.typed_data(), idx.typed_data(), w.typed_data(), vals.typed_data(), out->typed_data(), b, k, d,
               threads);
  return ffi::Error::Success();
}

void ScatterOuterRaw(const float* v, const int32_t* ix, const float* src, float* o, float* s, int64_t b, int64_t k,
                     int64_t n, int64_t d, int64_t threads) {
  // Slots grouped by latent (a counting sort of the nonzero ones, in token order within a latent):
  // start[i]..start[i+1]. Threads count and place the slots of their own token ranges.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, b / kMinRows));
  std::vector<std::vector<int64_t>> count(parts, std::vector<int64_t>(n, 0));
  auto tokens = [=](int64_t p) { return std::make_pair(b * p / parts, b * (p + 1) / parts); };
  ForRanges(parts, parts, 1, nullptr, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t* c = count[p].data();
      const auto [t0, t1] = tokens(p);
      for (int64_t i = t0 * k; i < t1 * k; ++i) c[ix[i]] += v[i] != 0.0f;
    }
  });
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {  // count[p][i] becomes where part p's slots of latent i go
    int64_t at = start[i];
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t c = count[p][i];
      count[p][i] = at;
      at += c;
    }
    start[i + 1] = at;
  }
  std::vector<int32_t> tok(start[n]);
  std::vector<float> coef(start[n]);
  ForRanges(parts, parts, 1, nullptr, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t* fill = count[p].data();
      const auto [t0, t1] = tokens(p);
      for (int64_t i = t0 * k; i < t1 * k; ++i) {
        if (v[i] == 0.0f) continue;
        const int64_t at = fill[ix[i]]++;
        tok[at] = static_cast<int32_t>(i / k);
        coef[at] = v[i];
      }
    }
  });
  // Balance threads by slots, with each latent counted once more for writing its row.
  std::vector<int64_t> cost(n + 1);
  for (int64_t i = 0; i <= n; ++i) cost[i] = start[i] + i;
  const int64_t* st = start.data();
  const int32_t* tk = tok.data();
  const float* cf = coef.data();
  ForRanges(n, threads, kMinRows, cost.data(), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t first = st[i], count = st[i + 1] - st[i];
      auto row = [&](int64_t t) { return src + static_cast<int64_t>(tk[first + t]) * d; };
      auto c = [&](int64_t t) { return cf[first + t]; };
      for (int64_t off = 0; off < d; off += kBlock) AxpyBlock(count, row, c, off, std::min(kBlock, d - off), o + i * d);
      float total = 0.0f;
      for (int64_t t = 0; t < count; ++t) total += cf[first + t];
      s[i] = total;
    }
  });
}

ffi::Error ScatterOuterImpl(ffi::Buffer<ffi::F32> vals, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> rows,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> sums, int64_t threads) {
  auto od = out->dimensions();
  auto rd = rows.dimensions();
  if (od.size() != 2 || rd.size() != 2 || rd[1] != od[1])
    return ffi::Error::InvalidArgument("slot scatter needs [B, D] rows and an [N, D] output");
  const int64_t n = od[0], d = od[1];
  int64_t b, k;
  ffi::Error err = SlotShapes(vals, idx, n, &b, &k);
  if (err.failure()) return err;
  if (rd[0] != b) return ffi::Error::InvalidArgument("slot scatter needs one row per token");
  ScatterOuterRaw(vals.typed_data(), idx.typed_data(), rows.typed_data(), out->typed_data(), sums->typed_data(), b, k,
                  n, d, threads);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetasaeSlotGatherSum, GatherSumImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetasaeSlotGatherDot, GatherDotImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetasaeSlotScatterOuter, ScatterOuterImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
