// Scaled (masked) softmax over the last dim of attention scores, one warp per row.
//
// Each warp owns one row of sk keys; lane l holds keys l, l + 32, l + 64, ... in
// registers (kIters of them, kIters = next power of two >= ceil(sk / 32)), so a row is
// read once and written once. Everything is computed in fp32 and stored in the input
// type (at::Half or at::BFloat16).
//
// Forward, with x the scores of one row and q the row's query index:
//   causal: keys j > q are masked and their probability is written as 0
//   masked: keys with mask[j] != 0 take the value -10000 before the softmax
//   y_j = exp(s_j - max_k s_k) / sum_k exp(s_k - max_k s_k),  s_j = scale * x_j
// Backward (g = dL/dy):
//   dL/dx_j = scale * y_j * (g_j - sum_k g_k y_k)   (0 where the key is masked)
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

namespace megatron_softmax {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;
constexpr int kMaxKeys = 4096;

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Row `row` of a [rows, sk] score matrix; rows = batches * heads * sq.
// kCausal: keys j > q are masked (mask is not read).
// otherwise: mask is [mask_batches, 1, sq, sk] (mask_batches 1 or batches), nonzero = masked.
template <typename scalar_t, int kIters, bool kCausal>
__global__ void __launch_bounds__(kThreadsPerBlock)
    scaled_softmax_forward_kernel(scalar_t* __restrict__ output,
                                  const scalar_t* __restrict__ input,
                                  const uint8_t* __restrict__ mask, float scale, int64_t rows,
                                  int sq, int sk, int heads, int mask_batches) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warps leave together: rows are warp-aligned
  const int lane = threadIdx.x % kWarpSize;
  const int q = static_cast<int>(row % sq);
  const scalar_t* x = input + row * sk;
  scalar_t* y = output + row * sk;
  const uint8_t* m = nullptr;
  if (!kCausal) {
    const int64_t batch = row / (static_cast<int64_t>(heads) * sq);
    const int64_t mask_batch = mask_batches == 1 ? 0 : batch;
    m = mask + (mask_batch * sq + q) * static_cast<int64_t>(sk);
  }
  const int valid = kCausal ? q + 1 : sk;  // keys [0, valid) take part in the softmax

  float values[kIters];
  float row_max = -CUDART_INF_F;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int j = lane + i * kWarpSize;
    float v = -CUDART_INF_F;
    if (j < valid) {
      v = static_cast<float>(x[j]) * scale;
      if (!kCausal && m[j] != 0) v = -10000.0f;
    }
    values[i] = v;
    row_max = fmaxf(row_max, v);
  }
  row_max = warp_max(row_max);

  float row_sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int j = lane + i * kWarpSize;
    const float e = j < valid ? __expf(values[i] - row_max) : 0.0f;
    values[i] = e;
    row_sum += e;
  }
  row_sum = warp_sum(row_sum);
  const float inv_sum = 1.0f / row_sum;

#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int j = lane + i * kWarpSize;
    if (j < sk) y[j] = static_cast<scalar_t>(values[i] * inv_sum);
  }
}

// mask: nullptr (causal: masked outputs are 0 already) or as in the forward kernel.
template <typename scalar_t, int kIters>
__global__ void __launch_bounds__(kThreadsPerBlock)
    scaled_softmax_backward_kernel(scalar_t* __restrict__ grad_input,
                                   const scalar_t* __restrict__ grad_output,
                                   const scalar_t* __restrict__ softmax_output,
                                   const uint8_t* __restrict__ mask, float scale, int64_t rows,
                                   int sq, int sk, int heads, int mask_batches) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarpSize;
  const scalar_t* g = grad_output + row * sk;
  const scalar_t* y = softmax_output + row * sk;
  scalar_t* dx = grad_input + row * sk;
  const uint8_t* m = nullptr;
  if (mask != nullptr) {
    const int q = static_cast<int>(row % sq);
    const int64_t batch = row / (static_cast<int64_t>(heads) * sq);
    const int64_t mask_batch = mask_batches == 1 ? 0 : batch;
    m = mask + (mask_batch * sq + q) * static_cast<int64_t>(sk);
  }

  float gy[kIters];
  float ys[kIters];
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int j = lane + i * kWarpSize;
    float gv = 0.0f;
    float yv = 0.0f;
    if (j < sk) {
      gv = static_cast<float>(g[j]);
      yv = static_cast<float>(y[j]);
    }
    gy[i] = gv * yv;
    ys[i] = yv;
    dot += gv * yv;
  }
  dot = warp_sum(dot);

#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int j = lane + i * kWarpSize;
    if (j < sk) {
      float d = scale * (gy[i] - ys[i] * dot);
      if (m != nullptr && m[j] != 0) d = 0.0f;
      dx[j] = static_cast<scalar_t>(d);
    }
  }
}

inline int iterations_for(int sk) {
  int iters = 1;
  while (iters * kWarpSize < sk) iters *= 2;
  return iters;
}

inline dim3 grid_for(int64_t rows) {
  return dim3(static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
}

// Calls body.template operator()<kIters>() with kIters chosen for sk (1 ... 128).
#define MEGATRON_DISPATCH_ITERS(SK, ...)                          \
  switch (::megatron_softmax::iterations_for(SK)) {               \
    case 1: { constexpr int kIters = 1; __VA_ARGS__(); break; }   \
    case 2: { constexpr int kIters = 2; __VA_ARGS__(); break; }   \
    case 4: { constexpr int kIters = 4; __VA_ARGS__(); break; }   \
    case 8: { constexpr int kIters = 8; __VA_ARGS__(); break; }   \
    case 16: { constexpr int kIters = 16; __VA_ARGS__(); break; } \
    case 32: { constexpr int kIters = 32; __VA_ARGS__(); break; } \
    case 64: { constexpr int kIters = 64; __VA_ARGS__(); break; } \
    case 128: { constexpr int kIters = 128; __VA_ARGS__(); break; } \
    default: TORCH_CHECK(false, "fused softmax: at most ", ::megatron_softmax::kMaxKeys, " keys"); \
  }

}  // namespace megatron_softmax
