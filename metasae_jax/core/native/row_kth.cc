// The k-th largest value of each row of a float32 matrix, as an XLA FFI custom call (CPU).
//
// What AuxK and per-token TopK need from a top_k is only each row's k-th largest
// value (the threshold), not the sorted top k. XLA:CPU's top_k partially sorts
// every row on one core; here each row's positive entries are copied out and
// std::nth_element finds the k-th largest in linear time, rows split over threads.
// The result equals min(top_k(x, k).values) exactly (the k-th largest value does
// not depend on how ties are broken). A row holding a NaN gets NaN.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

void KthRows(const float* x, float* out, int64_t cols, int64_t k, int64_t row_begin, int64_t row_end) {
  std::vector<float> buf(cols);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* row = x + r * cols;
    // Positive entries first: after a ReLU or a mask most entries are zero, and the
    // k-th largest is among the positive ones whenever there are at least k of them.
    int64_t pos = 0;
    bool nan = false;
    for (int64_t c = 0; c < cols; ++c) {
      float v = row[c];
      nan |= std::isnan(v);
      buf[pos] = v;
      pos += v > 0.0f;
    }
    if (nan) {
      out[r] = NAN;
      continue;
    }
    int64_t len = pos;
    if (pos < k) {  // fewer than k positive: the k-th largest is among the rest
      std::copy(row, row + cols, buf.begin());
      len = cols;
    }
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.begin() + len, std::greater<float>());
    out[r] = buf[k - 1];
  }
}

ffi::Error RowKthImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out, int64_t k, int64_t threads) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("row_kth needs an array of rank >= 1");
  const int64_t cols = dims.back();
  if (k < 1 || k > cols) return ffi::Error::InvalidArgument("row_kth needs 1 <= k <= the row length");
  const int64_t rows = cols == 0 ? 0 : static_cast<int64_t>(x.element_count()) / cols;
  const float* in = x.typed_data();
  float* res = out->typed_data();
  int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, rows / 64));
  if (t == 1) {
    KthRows(in, res, cols, k, 0, rows);
    return ffi::Error::Success();
  }
  std::vector<std::thread> pool;
  for (int64_t i = 0; i < t; ++i) {
    pool.emplace_back(KthRows, in, res, cols, k, rows * i / t, rows * (i + 1) / t);
  }
  for (auto& th : pool) th.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetasaeRowKth, RowKthImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("threads"));
