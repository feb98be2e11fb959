// Row selections of a float32 matrix as XLA FFI custom calls (CPU): each row's k-th
// largest value (MetasaeRowKth) and each row's top k values with their indices
// (MetasaeRowTopK, identical to lax.top_k's output).
//
// What AuxK and per-token TopK need from a top_k is only each row's k-th largest
// value (the threshold), not the sorted top k. XLA:CPU's top_k partially sorts
// every row on one core; here std::nth_element finds the k-th largest in linear
// time among the few entries a sampled estimate keeps (KthOfRow), rows split over threads.
// The result equals min(top_k(x, k).values) exactly (the k-th largest value does
// not depend on how ties are broken). A row holding a NaN gets NaN.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "ranges.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using metasae::ForRanges;

namespace {

// The k-th largest of one row; buf holds cols floats of scratch.
//
// A strided sample of ~1024 entries gives an estimate below the k-th largest (the
// sample's value at about twice k's share of it); one branch-free pass keeps the
// entries at or above it, and nth_element runs on those few (~2k) instead of the
// row. Exact whatever the estimate: if at least k entries reach it, the k-th largest
// does too, so it is among them; otherwise the whole row is selected from.
float KthOfRow(const float* row, int64_t cols, int64_t k, float* buf) {
  bool nan = false;
  if (cols >= 2048 && 4 * k < cols) {
    const int64_t step = cols / 1024;
    int64_t s = 0;
    for (int64_t c = 0; c < cols; c += step) buf[s++] = row[c];
    const int64_t rank = std::min<int64_t>(s, 2 * k * s / cols + 16);
    std::nth_element(buf, buf + (rank - 1), buf + s, std::greater<float>());
    const float est = buf[rank - 1];
    int64_t kept = 0;
    for (int64_t c = 0; c < cols; ++c) {
      float v = row[c];
      nan |= std::isnan(v);
      buf[kept] = v;
      kept += v >= est;
    }
    if (nan) return NAN;
    if (kept >= k) {
      std::nth_element(buf, buf + (k - 1), buf + kept, std::greater<float>());
      return buf[k - 1];
    }
  }
  // Positive entries first: after a ReLU or a mask most entries are zero, and the
  // k-th largest is among the positive ones whenever there are at least k of them.
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
  std::vector<float> buf(cols);
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
  int64_t above = 0;
  for (int64_t c = 0; c < cols; ++c) above += row[c] > t;
  int64_t n = 0, ties = k - above;
  for (int64_t c = 0; c < cols && n < k; ++c) {
    const float val = row[c];
    if (val > t || (val == t && ties-- > 0)) {
      emit(c, val);
      ++n;
    }
  }
}

// Each row's top k (value, index) pairs in lax.top_k's order: values descending, equal
// values by ascending index. The k-th largest value t comes from KthRows' selection;
// then ForEachTop takes exactly the pairs lax.top_k picks, and only those k are sorted (unless
// `sorted` is false: then they stay in ascending index order). A row
// holding a NaN gets NaN values and indices 0..k-1.
void TopKRows(const float* x, float* out_v, int32_t* out_i, int64_t cols, int64_t k, bool sorted,
              int64_t row_begin, int64_t row_end) {
  std::vector<std::pair<float, int32_t>> top(k);
  std::vector<float> buf(cols);
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
// selection (the top aux_k dead latents) without first writing the masked B x N matrix: the
// masked columns are gathered into a buffer per row and selected from as in TopKRows. A row
// holding a NaN in a masked column gets NaN values and indices 0.
void MaskedTopKRows(const float* x, const std::vector<int32_t>& cols_m, float* out_v, int32_t* out_i,
                    int64_t cols, int64_t k, int64_t row_begin, int64_t row_end) {
  const int64_t m = static_cast<int64_t>(cols_m.size());
  std::vector<float> vals(std::max<int64_t>(m, 1)), buf(std::max<int64_t>(m, 1));
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* row = x + r * cols;
    float* v = out_v + r * k;
    int32_t* idx = out_i + r * k;
    std::fill(v, v + k, 0.0f);
    std::fill(idx, idx + k, 0);
    if (m == 0) continue;
    for (int64_t j = 0; j < m; ++j) vals[j] = row[cols_m[j]];
    const int64_t kk = std::min(k, m);
    const float t = KthOfRow(vals.data(), m, kk, buf.data());
    if (std::isnan(t)) {
      std::fill(v, v + k, NAN);
      continue;
    }
    int64_t n = 0;
    ForEachTop(vals.data(), m, kk, t, [&](int64_t j, float val) {
      if (val > 0.0f) {
        v[n] = val;
        idx[n++] = cols_m[j];
      }
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
