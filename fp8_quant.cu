// Fused FP8 quantization for training (fp8.py's quantize_act and quantize_act_t on CUDA): one pass over the
// high-precision tensor instead of PyTorch's chain of float copy, abs, amax, divide, clamp and cast.
// Same arithmetic as the reference on the GPU, so the results are bit-identical: scale = max(amax, 1e-4) / 448
// in fp32, done as torch does a division by a Python number (times the fp32 reciprocal), q = e4m3(x / scale)
// with IEEE division and round-to-nearest-even, saturated at +-448. (For finite inputs: fmaxf skips a NaN, so a
// tile holding one gets a finite scale here and a NaN scale in the reference; its q holds the NaN either way.)
//
//   rows: x (R, C) -> q (R, C), s (R, C/128)               1x128 tiles along the last dim (Fprop, Dgrad)
//   cols: x (R, C) -> q (C, R'), s (C, R'/128), R' = R rounded up to 128, rows past R read as 0:
//         the tiles of x^T, i.e. 128x1 tiles of x along the tokens, with the transpose fused in (Wgrad)

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

namespace fp8q {

constexpr float INV_E4M3_MAX = 1.f / 448.f, AMAX_EPS = 1e-4f;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// 4 consecutive values as one 16-byte (fp32) or 8-byte (bf16) load
__device__ __forceinline__ void load4(const float* p, float* v) {
  float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float* v) {
  uint2 t = *reinterpret_cast<const uint2*>(p);
  float2 a = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&t.x));
  float2 b = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&t.y));
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}

__device__ __forceinline__ uint32_t e4m3(float v) {
  return static_cast<uint32_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}
__device__ __forceinline__ uint32_t pack4(float a, float b, float c, float d, float scale) {
  return e4m3(a / scale) | e4m3(b / scale) << 8 | e4m3(c / scale) << 16 | e4m3(d / scale) << 24;
}

// One warp per 1x128 tile: each lane holds 4 consecutive values; the tile amax is a warp max.
// ld == 0: scales row-major, tile t at s[t]. ld > 0: M-major, tile (row r, block kb) at s[kb * ld + r], the layout
// fp8_gemm.cu's Fprop kernel reads (kb_row: scales per row, K/128).
template <typename T>
__global__ void __launch_bounds__(256) rows(const T* __restrict__ x, uint32_t* __restrict__ q,
                                            float* __restrict__ s, long long tiles, int kb_row, int ld) {
  long long tile = (long long)blockIdx.x * 8 + threadIdx.x / 32;
  if (tile >= tiles) return;
  const int lane = threadIdx.x & 31;
  float v[4];
  load4(x + tile * 128 + lane * 4, v);
  float m = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  const float scale = fmaxf(m, AMAX_EPS) * INV_E4M3_MAX;
  q[tile * 32 + lane] = pack4(v[0], v[1], v[2], v[3], scale);
  if (lane == 0) s[ld ? (tile % kb_row) * ld + tile / kb_row : tile] = scale;
}

// A block transposes a 128 (rows of x) x 64 (columns of x) tile through shared memory; four threads share a
// column of the tile. Shared-memory word (r, c) sits in bank (r + c) % 32 (row stride 65), so each loop below
// staggers the rows of the four threads by 8 to keep the 32 lanes of a warp in 32 different banks.
template <typename T>
__global__ void __launch_bounds__(256) cols(const T* __restrict__ x, uint8_t* __restrict__ q,
                                            float* __restrict__ s, int R, int C, int R_pad) {
  __shared__ float tile[128][65];
  const int r0 = blockIdx.y * 128, c0 = blockIdx.x * 64;
  for (int i = threadIdx.x; i < 128 * 64; i += 256) {  // coalesced along the columns of x
    int r = i / 64, c = i % 64;
    tile[r][c] = (r0 + r < R && c0 + c < C) ? to_f32(x[(size_t)(r0 + r) * C + c0 + c]) : 0.f;
  }
  __syncthreads();
  const int c = threadIdx.x / 4, part = threadIdx.x % 4;
  float m = 0.f;  // amax of the column: this thread takes rows 32j + 8 part + (0..7), j = 0..3
#pragma unroll 8
  for (int i = 0; i < 32; ++i) m = fmaxf(m, fabsf(tile[(i / 8) * 32 + part * 8 + i % 8][c]));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
  if (c0 + c >= C) return;
  const float scale = fmaxf(m, AMAX_EPS) * INV_E4M3_MAX;
  if (part == 0) s[(size_t)(c0 + c) * (R_pad / 128) + blockIdx.y] = scale;
  // this thread writes output bytes [32 part, 32 part + 32) of row c0 + c, 4 at a time, starting at 8 part
  uint32_t* out = reinterpret_cast<uint32_t*>(q + (size_t)(c0 + c) * R_pad + r0 + part * 32);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int kk = (k + 2 * part) & 7, r = part * 32 + 4 * kk;
    out[kk] = pack4(tile[r][c], tile[r + 1][c], tile[r + 2][c], tile[r + 3][c], scale);
  }
}
}  // namespace fp8q

// q, s preallocated by fp8.py: q uint8 view of the float8 output, s float32.
// s: the (R, C/128) scales row-major (ld = 0), or a contiguous (C/128, ld) buffer, ld >= R, for M-major scales.
void quant_rows(at::Tensor x, at::Tensor q, at::Tensor s, int64_t ld) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && q.is_contiguous() && s.is_contiguous(),
              "quant_rows: contiguous CUDA tensors expected");
  TORCH_CHECK(x.numel() % 128 == 0 && q.numel() == x.numel(), "quant_rows: bad sizes");
  const long long tiles = x.numel() / 128;
  const int kb_row = x.dim() ? (int)(x.size(-1) / 128) : 0;
  TORCH_CHECK(ld == 0 ? s.numel() == tiles
                      : (x.dim() == 2 && ld >= x.size(0) && s.numel() == (long long)kb_row * ld),
              "quant_rows: bad scale buffer");
  if (!tiles) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = (unsigned)((tiles + 7) / 8);
  auto qp = reinterpret_cast<uint32_t*>(q.data_ptr());
  if (x.scalar_type() == at::kBFloat16)
    fp8q::rows<<<grid, 256, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), qp, s.data_ptr<float>(),
                                         tiles, kb_row, (int)ld);
  else if (x.scalar_type() == at::kFloat)
    fp8q::rows<<<grid, 256, 0, stream>>>(x.data_ptr<float>(), qp, s.data_ptr<float>(), tiles, kb_row, (int)ld);
  else
    TORCH_CHECK(false, "quant_rows: x must be bfloat16 or float32");
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "quant_rows: launch failed");
}

void quant_cols(at::Tensor x, at::Tensor q, at::Tensor s) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous() && q.is_contiguous() && s.is_contiguous(),
              "quant_cols: contiguous 2-D CUDA tensors expected");
  const int R = x.size(0), C = x.size(1), R_pad = (R + 127) / 128 * 128;
  TORCH_CHECK(q.dim() == 2 && q.size(0) == C && q.size(1) == R_pad && s.dim() == 2 && s.size(0) == C &&
                  s.size(1) == R_pad / 128, "quant_cols: q must be (C, R rounded up to 128), s (C, that / 128)");
  if (!R || !C) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid((C + 63) / 64, R_pad / 128);
  auto qp = reinterpret_cast<uint8_t*>(q.data_ptr());
  if (x.scalar_type() == at::kBFloat16)
    fp8q::cols<<<grid, 256, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), qp, s.data_ptr<float>(), R, C, R_pad);
  else if (x.scalar_type() == at::kFloat)
    fp8q::cols<<<grid, 256, 0, stream>>>(x.data_ptr<float>(), qp, s.data_ptr<float>(), R, C, R_pad);
  else
    TORCH_CHECK(false, "quant_cols: x must be bfloat16 or float32");
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "quant_cols: launch failed");
}
