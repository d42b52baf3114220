// The teaching kernels' one Python module (fp8_teaching.load() builds it). Every step computes the same
// C = A . B^T as fp8.fp8_gemm_ref:
//   a (M, K) e4m3, a_scale (M, K/128) fp32 row-major, b (N, K) e4m3, b_scale (ceil(N/128), K/128) fp32,
//   out (M, N) bf16; all contiguous CUDA tensors, K a positive multiple of 128.
// gemm(step, ...) returns "" or what is wrong, and fp8_teaching.gemm raises it: no C++ exception crosses into
// Python from here. fp8_teaching.gemm checks the operands first (ValueError); the checks here guard direct calls.

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

std::string step1_gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out);
std::string step2_gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out);
std::string step3_gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out);
std::string step4_gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out);

static bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Step 1 reads with cp.async (16-byte chunks of rows); steps 2-4 load by TMA, steps 3-4 store by TMA too.
static const char* check(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                         const at::Tensor& b_scale, const at::Tensor& out, int step) {
  for (const at::Tensor* t : {&a, &a_scale, &b, &b_scale, &out})
    if (!(t->is_cuda() && t->is_contiguous() && t->dim() == 2)) return "contiguous 2-D CUDA tensors expected";
  if (a.scalar_type() != at::kFloat8_e4m3fn || b.scalar_type() != at::kFloat8_e4m3fn ||
      a_scale.scalar_type() != at::kFloat || b_scale.scalar_type() != at::kFloat || out.scalar_type() != at::kBFloat16)
    return "e4m3 operands, fp32 scales and a bf16 out expected";
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  if (K <= 0 || K % 128 != 0 || b.size(1) != K) return "K must be a positive multiple of 128";
  if (a_scale.size(0) != M || a_scale.size(1) != K / 128 || b_scale.size(0) != (N + 127) / 128 ||
      b_scale.size(1) != K / 128 || out.size(0) != M || out.size(1) != N)
    return "a_scale (M, K/128), b_scale (ceil(N/128), K/128) and out (M, N) expected";
  if (!aligned16(a) || !aligned16(b)) return "a and b must be 16-byte aligned";
  if (step >= 3 && (N % 8 != 0 || !aligned16(out))) return "the TMA store needs N % 8 == 0 and an aligned out";
  return nullptr;
}

std::string gemm(int64_t step, at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale,
                 at::Tensor out) {
  if (step < 1 || step > 4) return "step must be 1, 2, 3 or 4";
  if (const char* err = check(a, a_scale, b, b_scale, out, (int)step))
    return "step " + std::to_string(step) + ": " + err;
  if (a.size(0) == 0 || b.size(0) == 0) return "";
  switch (step) {
    case 1: return step1_gemm(a, a_scale, b, b_scale, out);
    case 2: return step2_gemm(a, a_scale, b, b_scale, out);
    case 3: return step3_gemm(a, a_scale, b, b_scale, out);
    default: return step4_gemm(a, a_scale, b, b_scale, out);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm,
        "gemm(step, a, a_scale, b, b_scale, out) -> '' or an error. 1: mma.sync; 2: + TMA, WGMMA, warp "
        "specialization; 3: + TMA store; 4: + promotion overlapped with the next block's WGMMA");
}
