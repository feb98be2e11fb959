// Row selections of a float32 matrix as XLA FFI custom calls (CPU): each row's k-th
// largest value (MetasaeRowKth) and each row's top k values with their indices
// (MetasaeRowTopK, identical to lax.top_k's output).
//
// What AuxK and per-token TopK need from a top_k is only each row's k-th largest
// value (the threshold), not the sorted top k. XLA:CPU's top_k partially sorts
// every row on one core; here std::nth_element finds the k-th largest in linear
// time among the few entries a lower bound from the row's block maxima keeps (KthOfRow),
// rows split over threads.
// The result equals min(top_k(x, k).values) exactly (the k-th largest value does
// not depend on how ties are broken). A row holding a NaN gets NaN.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "ranges.h"
#ifdef __AVX__
#include <immintrin.h>
#endif
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using metasae::ForRanges;

namespace {

typedef float V8 __attribute__((vector_size(32), aligned(4)));  // 8 floats, unaligned loads allowed
typedef int32_t I8 __attribute__((vector_size(32)));            // a V8 comparison's lanes (0 or -1)
inline V8 Load(const float* p) { return *reinterpret_cast<const V8*>(p); }
inline V8 Splat(float a) { return V8{a, a, a, a, a, a, a, a}; }
inline bool Any(I8 m) {
#ifdef __AVX__
  return _mm256_movemask_ps(reinterpret_cast<__m256>(m)) != 0;
#else
  int32_t any = 0;
  for (int u = 0; u < 8; ++u) any |= m[u];
  return any != 0;
#endif
}

// Blocks of a row for the estimate below: chunk q's 64 entries (64q .. 64q + 63) form 8 blocks,
// block 8q + u holding entries 64q + 8j + u (j = 0..7), so their maxima are 7 vertical vector
// maxima per chunk; each entry past the last full chunk is a block of its own.
constexpr int64_t kChunk = 64;
inline int64_t NumBlocks(int64_t cols) { return cols / kChunk * 8 + cols % kChunk; }

// Floats of scratch KthOfRow needs for any row of at most `cols` (the row, then twice the block maxima;
// NumBlocks itself is not monotonic: 63 entries are 63 blocks, 64 are 8, so it is bounded by cols/8 + 63).
inline int64_t ScratchSize(int64_t cols) { return cols + 2 * (cols / 8 + kChunk); }

// A value reached by at least k of the n finite entries of x (so at most their k-th largest), close
// below it: the entries are counted into 256 equal-width bins between their minimum and maximum,
// and the bound is the smallest entry of the bins, from the top, that first hold k entries together.
// Exact whatever the bins (each entry is binned the same way twice); nth_element on a copy in
// scratch (n floats) when the range is degenerate.
float LowerBoundOfKth(const float* x, int64_t n, int64_t k, float* scratch) {
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const float range = hi - lo, scale = 256.0f / range;  // a range of +-inf, or NaN, or 0 is degenerate
  if (!(range > 0.0f) || !std::isfinite(range) || !std::isfinite(scale)) {
    std::copy(x, x + n, scratch);
    std::nth_element(scratch, scratch + (k - 1), scratch + n, std::greater<float>());
    return scratch[k - 1];
  }
  auto bin = [&](float v) { return std::min<int32_t>(255, static_cast<int32_t>((v - lo) * scale)); };
  int32_t count[256] = {};
  for (int64_t i = 0; i < n; ++i) ++count[bin(x[i])];
  int32_t top = 255;
  for (int64_t seen = count[255]; seen < k; seen += count[--top]) {
  }
  float bound = hi;
  for (int64_t i = 0; i < n; ++i)
    if (bin(x[i]) >= top) bound = std::min(bound, x[i]);
  return bound;
}

// The k-th largest of one row; buf holds ScratchSize(cols) floats of scratch.
//
// Long rows with a small k: a value that at least k block maxima reach (LowerBoundOfKth) is at most
// the row's k-th largest (k blocks each hold an entry that reaches it), and every entry that reaches
// it lies in a block whose maximum does; so nth_element runs only on the entries of the ~k blocks
// that reach it, instead of on the row. Exact, with no fallback.
float KthOfRow(const float* row, int64_t cols, int64_t k, float* buf) {
  const int64_t nb = NumBlocks(cols), full = cols / kChunk;
  if (cols >= 256 && 4 * k <= nb) {
    float* bmax = buf + cols;
    float* sel = bmax + nb;
    I8 bad = {};
    for (int64_t q = 0; q < full; ++q) {
      const float* chunk = row + q * kChunk;
      V8 m = Load(chunk);
      bad |= m != m;
      for (int j = 1; j < 8; ++j) {
        const V8 v = Load(chunk + 8 * j);
        bad |= v != v;
        m = m > v ? m : v;
      }
      for (int u = 0; u < 8; ++u) bmax[8 * q + u] = m[u];
    }
    bool nan = Any(bad);
    for (int64_t c = full * kChunk; c < cols; ++c) {
      nan |= std::isnan(row[c]);
      bmax[8 * full + c - full * kChunk] = row[c];
    }
    if (nan) return NAN;
    const float est = LowerBoundOfKth(bmax, nb, k, sel);
    int64_t kept = 0;
    for (int64_t b = 0; b < 8 * full; ++b) {
      if (bmax[b] < est) continue;
      const float* first = row + (b / 8) * kChunk + b % 8;
      for (int j = 0; j < 8; ++j) {
        buf[kept] = first[8 * j];
        kept += first[8 * j] >= est;
      }
    }
    for (int64_t c = full * kChunk; c < cols; ++c) {
      buf[kept] = row[c];
      kept += row[c] >= est;
    }
    std::nth_element(buf, buf + (k - 1), buf + kept, std::greater<float>());
    return buf[k - 1];
  }
  // Positive entries first: after a ReLU or a mask most entries are zero, and the
  // k-th largest is among the positive ones whenever there are at least k of them.
  bool nan = false;
  int64_t pos = 0;
  for (int64_t c = 0; c < cols; ++c) {
    float v = row[c];
    nan |= std::isnan(v);
    buf[pos] = v;
    pos += v > 0.0f;
  }
  if (nan) return NAN;
  int64_t len = pos;
  if (pos < k) {  // fewer than k positive: the k-th largest is among the rest
    std::copy(row, row + cols, buf);
    len = cols;
  }
  std::nth_element(buf, buf + (k - 1), buf + len, std::greater<float>());
  return buf[k - 1];
}

void KthRows(const float* x, float* out, int64_t cols, int64_t k, int64_t row_begin, int64_t row_end) {
  std::vector<float> buf(ScratchSize(cols));
  for (int64_t r = row_begin; r < row_end; ++r) out[r] = KthOfRow(x + r * cols, cols, k, buf.data());
}

// Rows and row length of x for a selection of k per row, or the error to return.
ffi::Error RowShape(ffi::Buffer<ffi::F32> x, int64_t k, int64_t* rows, int64_t* cols) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("row selection needs an array of rank >= 1");
  *cols = dims.back();
  if (k < 1 || k > *cols) return ffi::Error::InvalidArgument("row selection needs 1 <= k <= the row length");
  *rows = static_cast<int64_t>(x.element_count()) / *cols;
  return ffi::Error::Success();
}

constexpr int64_t kMinRows = 64;  // rows per thread at least

ffi::Error RowKthImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out, int64_t k, int64_t threads) {
  int64_t rows, cols;
  ffi::Error shape = RowShape(x, k, &rows, &cols);
  if (shape.failure()) return shape;
  const float* in = x.typed_data();
  float* res = out->typed_data();
  ForRanges(rows, threads, kMinRows, nullptr, [=](int64_t begin, int64_t end) { KthRows(in, res, cols, k, begin, end); });
  return ffi::Error::Success();
}

// Calls emit(c, row[c]) for the k entries of a row that lax.top_k picks, in index order, given the
// row's k-th largest value t: every entry above t, then as many equal to t as fill k.
template <typename Emit>
void ForEachTop(const float* row, int64_t cols, int64_t k, float t, Emit emit) {
  const int64_t whole = cols / 8 * 8;
  const V8 tv = Splat(t);
  I8 above_v = {};
  for (int64_t c = 0; c < whole; c += 8) above_v -= Load(row + c) > tv;  // lanes count up
  int64_t above = 0;
  for (int u = 0; u < 8; ++u) above += above_v[u];
  for (int64_t c = whole; c < cols; ++c) above += row[c] > t;
  int64_t n = 0, ties = k - above;
  auto take = [&](int64_t c) {
    const float val = row[c];
    if (val > t || (val == t && ties-- > 0)) {
      emit(c, val);
      ++n;
    }
  };
  for (int64_t c = 0; c < whole && n < k; c += 8) {  // only groups of 8 holding an entry >= t are looked into
    if (!Any(Load(row + c) >= tv)) continue;
    for (int64_t e = c; e < c + 8 && n < k; ++e) take(e);
  }
  for (int64_t c = whole; c < cols && n < k; ++c) take(c);
}

// Each row's top k (value, index) pairs in lax.top_k's order: values descending, equal
// values by ascending index. The k-th largest value t comes from KthRows' selection;
// then ForEachTop takes exactly the pairs lax.top_k picks, and only those k are sorted (unless
// `sorted` is false: then they stay in ascending index order). A row
// holding a NaN gets NaN values and indices 0..k-1.
void TopKRows(const float* x, float* out_v, int32_t* out_i, int64_t cols, int64_t k, bool sorted,
              int64_t row_begin, int64_t row_end) {
  std::vector<std::pair<float, int32_t>> top(k);
  std::vector<float> buf(ScratchSize(cols));
  auto before = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* row = x + r * cols;
    float* v = out_v + r * k;
    int32_t* idx = out_i + r * k;
    const float t = KthOfRow(row, cols, k, buf.data());
    if (std::isnan(t)) {
      for (int64_t j = 0; j < k; ++j) {
        v[j] = NAN;
        idx[j] = static_cast<int32_t>(j);
      }
      continue;
    }
    int64_t n = 0;
    ForEachTop(row, cols, k, t, [&](int64_t c, float val) { top[n++] = {val, static_cast<int32_t>(c)}; });
    if (sorted) std::sort(top.begin(), top.begin() + k, before);
    for (int64_t j = 0; j < k; ++j) {
      v[j] = top[j].first;
      idx[j] = top[j].second;
    }
  }
}

ffi::Error RowTopKImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                       ffi::ResultBuffer<ffi::S32> indices, int64_t k, int64_t sorted, int64_t threads) {
  int64_t rows, cols;
  ffi::Error shape = RowShape(x, k, &rows, &cols);
  if (shape.failure()) return shape;
  const float* in = x.typed_data();
  float* v = values->typed_data();
  int32_t* idx = indices->typed_data();
  ForRanges(rows, threads, kMinRows, nullptr,
            [=](int64_t begin, int64_t end) { TopKRows(in, v, idx, cols, k, sorted != 0, begin, end); });
  return ffi::Error::Success();
}

// Each row's largest positive entries among the masked columns, up to k (ties by ascending
// index), in ascending index order; the slots left over get value 0 and index 0. This is AuxK's
// selection (the top aux_k dead latents) without first writing the masked B x N matrix: one
// branch-free pass gathers the row's positive masked entries (a dead latent's pre-activation is
// mostly zero after the ReLU: ~12 % positive on real activations), all of them are taken when
// there are at most k, else the k-th largest among them is found and taken as in TopKRows. A row
// holding a NaN in a masked column gets NaN values and indices 0.
void MaskedTopKRows(const float* x, const std::vector<int32_t>& cols_m, float* out_v, int32_t* out_i,
                    int64_t cols, int64_t k, int64_t row_begin, int64_t row_end) {
  const int64_t m = static_cast<int64_t>(cols_m.size());
  std::vector<float> vals(std::max<int64_t>(m, 1)), buf(ScratchSize(std::max<int64_t>(m, 1)));
  std::vector<int32_t> where(std::max<int64_t>(m, 1));
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* row = x + r * cols;
    float* v = out_v + r * k;
    int32_t* idx = out_i + r * k;
    std::fill(v, v + k, 0.0f);
    std::fill(idx, idx + k, 0);
    int64_t pos = 0;
    bool nan = false;
    for (int64_t j = 0; j < m; ++j) {
      const float val = row[cols_m[j]];
      nan |= std::isnan(val);
      vals[pos] = val;
      where[pos] = cols_m[j];
      pos += val > 0.0f;
    }
    if (nan) {
      std::fill(v, v + k, NAN);
      continue;
    }
    if (pos <= k) {  // every positive entry is taken
      std::copy(vals.begin(), vals.begin() + pos, v);
      std::copy(where.begin(), where.begin() + pos, idx);
      continue;
    }
    const float t = KthOfRow(vals.data(), pos, k, buf.data());
    int64_t n = 0;
    ForEachTop(vals.data(), pos, k, t, [&](int64_t j, float val) {
      v[n] = val;
      idx[n++] = where[j];
    });
  }
}

ffi::Error RowTopKMaskedImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> values,
                             ffi::ResultBuffer<ffi::S32> indices, int64_t k, int64_t threads) {
  auto dims = x.dimensions();
  if (dims.size() < 1 || mask.element_count() != static_cast<size_t>(dims.back()))
    return ffi::Error::InvalidArgument("masked row selection needs one mask entry per column");
  const int64_t cols = dims.back();
  if (k < 1) return ffi::Error::InvalidArgument("row selection needs k >= 1");
  const int64_t rows = static_cast<int64_t>(x.element_count()) / std::max<int64_t>(cols, 1);
  std::vector<int32_t> cols_m;
  const bool* on = mask.typed_data();
  for (int64_t c = 0; c < cols; ++c)
    if (on[c]) cols_m.push_back(static_cast<int32_t>(c));
  const float* in = x.typed_data();
  float* v = values->typed_data();
  int32_t* idx = indices->typed_data();
  ForRanges(rows, threads, kMinRows, nullptr, [&, in, v, idx](int64_t begin, int64_t end) {
    MaskedTopKRows(in, cols_m, v, idx, cols, k, begin, end);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetasaeRowTopK, RowTopKImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("sorted")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetasaeRowKth, RowKthImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetasaeRowTopKMasked, RowTopKMaskedImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("threads"));
