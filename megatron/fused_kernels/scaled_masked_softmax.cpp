// Python bindings of the softmax with an explicit mask: scores [b, np, sq, sk], mask
// [b or 1, 1, sq, sk] (bool or uint8, nonzero = masked, the score becomes -10000).
// forward(input, mask, scale) -> probs; backward(grad, probs, mask, scale) -> grad of input.
#include <torch/extension.h>

namespace megatron_softmax {
at::Tensor masked_forward_cuda(const at::Tensor& input, const at::Tensor& mask, float scale);
at::Tensor masked_backward_cuda(const at::Tensor& grad_output, const at::Tensor& softmax_output,
                                const at::Tensor& mask, float scale);
}  // namespace megatron_softmax

namespace {

void check_scores(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "scaled_masked_softmax: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 4, "scaled_masked_softmax: ", name, " must be [b, np, sq, sk], got ",
              t.dim(), " dims");
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "scaled_masked_softmax: ", name, " must be fp16 or bf16");
  TORCH_CHECK(t.size(3) <= 4096, "scaled_masked_softmax: at most 4096 keys, got ", t.size(3));
}

void check_mask(const at::Tensor& scores, const at::Tensor& mask) {
  TORCH_CHECK(mask.is_cuda() && mask.device() == scores.device(),
              "scaled_masked_softmax: mask must be on the scores' device");
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte,
              "scaled_masked_softmax: mask must be bool or uint8");
  TORCH_CHECK(mask.dim() == 4 && mask.size(1) == 1 && mask.size(2) == scores.size(2) &&
                  mask.size(3) == scores.size(3),
              "scaled_masked_softmax: mask must be [b or 1, 1, sq, sk]");
  TORCH_CHECK(mask.size(0) == 1 || mask.size(0) == scores.size(0),
              "scaled_masked_softmax: mask batch must be 1 or ", scores.size(0), ", got ",
              mask.size(0));
}

at::Tensor forward(const at::Tensor& input, const at::Tensor& mask, double scale) {
  check_scores(input, "input");
  check_mask(input, mask);
  return megatron_softmax::masked_forward_cuda(input.contiguous(), mask.contiguous(),
                                               static_cast<float>(scale));
}

at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& softmax_output,
                    const at::Tensor& mask, double scale) {
  check_scores(grad_output, "grad_output");
  check_scores(softmax_output, "softmax_output");
  check_mask(grad_output, mask);
  TORCH_CHECK(grad_output.sizes() == softmax_output.sizes(),
              "scaled_masked_softmax: grad and probs differ in shape");
  TORCH_CHECK(grad_output.scalar_type() == softmax_output.scalar_type(),
              "scaled_masked_softmax: grad and probs differ in dtype");
  return megatron_softmax::masked_backward_cuda(grad_output.contiguous(),
                                                softmax_output.contiguous(), mask.contiguous(),
                                                static_cast<float>(scale));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "masked scaled softmax, forward (CUDA)");
  m.def("backward", &backward, "masked scaled softmax, backward (CUDA)");
}
