// Python bindings of the causal softmax: scores [attn_batches, sq, sq], keys j > query i
// masked. forward(input, scale) -> probs; backward(grad, probs, scale) -> grad of input.
#include <torch/extension.h>

namespace megatron_softmax {
at::Tensor upper_triang_forward_cuda(const at::Tensor& input, float scale);
at::Tensor upper_triang_backward_cuda(const at::Tensor& grad_output,
                                      const at::Tensor& softmax_output, float scale);
}  // namespace megatron_softmax

namespace {

void check_scores(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "scaled_upper_triang_masked_softmax: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 3, "scaled_upper_triang_masked_softmax: ", name,
              " must be [attn_batches, sq, sk], got ", t.dim(), " dims");
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "scaled_upper_triang_masked_softmax: ", name, " must be fp16 or bf16");
  TORCH_CHECK(t.size(1) == t.size(2),
              "scaled_upper_triang_masked_softmax: needs sq == sk, got ", t.size(1), " and ",
              t.size(2));
  TORCH_CHECK(t.size(2) <= 4096, "scaled_upper_triang_masked_softmax: at most 4096 keys, got ",
              t.size(2));
}

at::Tensor forward(const at::Tensor& input, double scale) {
  check_scores(input, "input");
  return megatron_softmax::upper_triang_forward_cuda(input.contiguous(),
                                                     static_cast<float>(scale));
}

at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& softmax_output,
                    double scale) {
  check_scores(grad_output, "grad_output");
  check_scores(softmax_output, "softmax_output");
  TORCH_CHECK(grad_output.sizes() == softmax_output.sizes(),
              "scaled_upper_triang_masked_softmax: grad and probs differ in shape");
  TORCH_CHECK(grad_output.scalar_type() == softmax_output.scalar_type(),
              "scaled_upper_triang_masked_softmax: grad and probs differ in dtype");
  return megatron_softmax::upper_triang_backward_cuda(
      grad_output.contiguous(), softmax_output.contiguous(), static_cast<float>(scale));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "causal scaled softmax, forward (CUDA)");
  m.def("backward", &backward, "causal scaled softmax, backward (CUDA)");
}
