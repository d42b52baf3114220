// The teaching kernels' one Python module (fp8_teaching.load() builds it). Every step computes the same
// C = A . B^T as fp8.fp8_gemm_ref:
//   a (M, K) e4m3, a_scale (M, K/128) fp32 row-major, b (N, K) e4m3, b_scale (ceil(N/128), K/128) fp32,
//   out (M, N) bf16; all contiguous CUDA tensors, K a positive multiple of 128.
// fp8_teaching.gemm checks the operands and raises ValueError; the checks here are a last guard for direct calls.

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

void step1_gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out);
void step2_gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out);
void step3_gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out);
void step4_gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out);

static bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// step 1 reads with cp.async (16-byte chunks of rows); steps 2-4 load by TMA, steps 3-4 store by TMA too.
static void check(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale,
                  const at::Tensor& out, int step) {
  for (const at::Tensor* t : {&a, &a_scale, &b, &b_scale, &out})
    TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->dim() == 2, "step", step, ": contiguous 2-D CUDA tensors");
  TORCH_CHECK(a.scalar_type() == at::kFloat8_e4m3fn && b.scalar_type() == at::kFloat8_e4m3fn &&
                  a_scale.scalar_type() == at::kFloat && b_scale.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kBFloat16, "step", step, ": e4m3 operands, fp32 scales, bf16 out");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_CHECK(K > 0 && K % 128 == 0 && b.size(1) == K, "step", step, ": K must be a positive multiple of 128");
  TORCH_CHECK(a_scale.size(0) == M && a_scale.size(1) == K / 128 && b_scale.size(0) == (N + 127) / 128 &&
                  b_scale.size(1) == K / 128 && out.size(0) == M && out.size(1) == N,
              "step", step, ": a_scale (M, K/128), b_scale (ceil(N/128), K/128), out (M, N)");
  TORCH_CHECK(aligned16(a) && aligned16(b), "step", step, ": a and b 16-byte aligned");
  TORCH_CHECK(step < 3 || (N % 8 == 0 && aligned16(out)), "step", step, ": the TMA store needs N % 8 == 0");
}

template <void (*F)(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor), int STEP>
void checked(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out) {
  check(a, a_scale, b, b_scale, out, STEP);
  if (a.size(0) > 0 && b.size(0) > 0) F(a, a_scale, b, b_scale, out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step1", &checked<step1_gemm, 1>, "mma.sync, cp.async pipeline, promotion in registers");
  m.def("step2", &checked<step2_gemm, 2>, "+ TMA, mbarrier pipeline, WGMMA, warp specialization, persistent grid");
  m.def("step3", &checked<step3_gemm, 3>, "+ the output through shared memory and a TMA store");
  m.def("step4", &checked<step4_gemm, 4>, "+ two accumulators: promotion overlapped with the next block's WGMMA");
}
