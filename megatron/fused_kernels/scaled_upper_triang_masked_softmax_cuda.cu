// Launchers of the causal (upper-triangular masked) softmax: [attn_batches, sq, sq].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "softmax_common.h"

namespace megatron_softmax {

at::Tensor upper_triang_forward_cuda(const at::Tensor& input, float scale) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t rows = input.size(0) * input.size(1);
  const int sq = static_cast<int>(input.size(1));
  const int sk = static_cast<int>(input.size(2));
  at::Tensor output = at::empty_like(input);
  if (rows == 0) return output;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(
      input.scalar_type(), "scaled_upper_triang_masked_softmax_forward", [&] {
        MEGATRON_DISPATCH_ITERS(sk, [&] {
          scaled_softmax_forward_kernel<scalar_t, kIters, true>
              <<<grid_for(rows), kThreadsPerBlock, 0, stream>>>(
                  output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), nullptr, scale,
                  rows, sq, sk, 1, 1);
        });
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return output;
}

at::Tensor upper_triang_backward_cuda(const at::Tensor& grad_output,
                                      const at::Tensor& softmax_output, float scale) {
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  const int64_t rows = grad_output.size(0) * grad_output.size(1);
  const int sq = static_cast<int>(grad_output.size(1));
  const int sk = static_cast<int>(grad_output.size(2));
  at::Tensor grad_input = at::empty_like(grad_output);
  if (rows == 0) return grad_input;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(
      grad_output.scalar_type(), "scaled_upper_triang_masked_softmax_backward", [&] {
        MEGATRON_DISPATCH_ITERS(sk, [&] {
          scaled_softmax_backward_kernel<scalar_t, kIters>
              <<<grid_for(rows), kThreadsPerBlock, 0, stream>>>(
                  grad_input.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                  softmax_output.data_ptr<scalar_t>(), nullptr, scale, rows, sq, sk, 1, 1);
        });
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_input;
}

}  // namespace megatron_softmax
