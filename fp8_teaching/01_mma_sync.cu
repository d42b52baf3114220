// Step 1: a plain FP8 GEMM with per-block promotion, on warp-level MMA (mma.sync). The correctness baseline of the
// ladder in README.md; the next steps keep its arithmetic and change how the data moves.
//
//   C[M, N] (bf16) = sum over 128-wide K blocks kb of  sa[m, kb] * sb[n / 128, kb] * (A[m, kb-block] . B[n, kb-block])
//
// A (M x K) e4m3 with one fp32 scale per row per 128 of K (1x128 tiles), row-major scales (M, K/128); B (N x K)
// e4m3 with one scale per 128x128 block, (ceil(N/128), K/128); both K-major. One CTA of 8 warps computes a 128 x 128
// tile of C. For each 128-wide K block:
//   * cp.async copies the A and B slices (128 rows x 128 bytes each) into shared memory, 3 stages deep, so the
//     copies of the next blocks run while this one is multiplied;
//   * each warp (2 x 4 warps, 64 x 32 of the tile each) loads its fragments with ldmatrix and runs
//     mma.sync.m16n8k32 e4m3 over the block's 4 k32 steps into a fresh fp32 accumulator;
//   * promotion: the CUDA cores multiply that partial sum by sa[row] * sb and add it into the result registers.
// On sm_90 the e4m3 mma.sync has no tensor-core path of its own: the machine code converts the operands (F2FP) and
// runs fp16 MMAs (HMMA.16816), so this step is slow; step 2 moves to the Hopper instructions (TMA, WGMMA).

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

namespace step1 {

constexpr int BM = 128, BN = 128, BK = 128;      // tile; BK = N_C, the scale block along K
constexpr int THREADS = 256, STAGES = 3;
constexpr int TILE_BYTES = BM * BK;               // 16 KiB per operand per stage
constexpr int SMEM = STAGES * 2 * TILE_BYTES;     // 96 KiB

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  // src-size 0 zero-fills the 16 bytes: rows past M (or N) read as zeros.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

// One 128-row x 128-byte tile; 16-byte chunk c of row r goes to chunk c ^ (r & 7), so that the 8 row addresses
// of one ldmatrix phase fall in 8 different bank groups (no bank conflicts).
__device__ __forceinline__ void load_tile(uint8_t* s, const uint8_t* g, int rows, int row0, int K, int k0) {
  for (int i = threadIdx.x; i < BM * 8; i += THREADS) {
    int r = i >> 3, c = i & 7, row = row0 + r;
    bool ok = row < rows;
    const uint8_t* src = g + (size_t)(ok ? row : 0) * K + k0 + c * 16;
    cp_async16(smem_u32(s + r * BK + ((c ^ (r & 7)) << 4)), src, ok);
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void mma_e4m3(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two adjacent outputs of one row; a 4-byte store when both are in range and aligned (N even).
__device__ __forceinline__ void store_pair(__nv_bfloat16* C, int M, int N, int row, int col, float x, float y) {
  if (row >= M) return;
  __nv_bfloat16* p = C + (size_t)row * N + col;
  if (col + 1 < N && (N & 1) == 0) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
  } else {
    if (col < N) p[0] = __float2bfloat16_rn(x);
    if (col + 1 < N) p[1] = __float2bfloat16_rn(y);
  }
}

__global__ void __launch_bounds__(THREADS) gemm(const uint8_t* __restrict__ A, const float* __restrict__ SA,
                                                const uint8_t* __restrict__ B, const float* __restrict__ SB,
                                                __nv_bfloat16* __restrict__ C, int M, int N, int K) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int Kb = K / BK, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
  auto sA = [&](int s) { return smem + s * 2 * TILE_BYTES; };
  auto sB = [&](int s) { return smem + s * 2 * TILE_BYTES + TILE_BYTES; };

  float fin[4][4][4] = {};  // promoted fp32 result: [m16 tile][n8 tile][fragment]
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < Kb) { load_tile(sA(s), A, M, m0, K, s * BK); load_tile(sB(s), B, N, n0, K, s * BK); }
    asm volatile("cp.async.commit_group;\n");
  }
  for (int kb = 0; kb < Kb; ++kb) {
    int nxt = kb + STAGES - 1;  // refill the stage that was consumed one iteration ago
    if (nxt < Kb) {
      load_tile(sA(nxt % STAGES), A, M, m0, K, nxt * BK);
      load_tile(sB(nxt % STAGES), B, N, n0, K, nxt * BK);
    }
    asm volatile("cp.async.commit_group;\n");
    // Scales for this K block, fetched before the wait so their latency hides behind it.
    float sb = SB[(n0 / 128) * Kb + kb], sa[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        int row = m0 + wm + i * 16 + h * 8 + g;
        sa[i][h] = row < M ? SA[(size_t)row * Kb + kb] * sb : 0.f;
      }
    asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1));
    __syncthreads();
    const uint8_t *a_s = sA(kb % STAGES), *b_s = sB(kb % STAGES);
    float acc[4][4][4] = {};  // tensor-core partial sum of this 128-wide K block
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {  // 4 x k32
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // A 16x32: matrices (rows 0-7|8-15) x (k bytes 0-15|16-31)
        int r = wm + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = kk * 2 + (lane >> 4);
        ldmatrix_x4(af[i], smem_u32(a_s + r * BK + ((c ^ (r & 7)) << 4)));
      }
#pragma unroll
      for (int p = 0; p < 2; ++p) {  // two n8 tiles per x4: (n 0-7|8-15) x (k 0-15|16-31)
        int r = wn + p * 16 + (lane & 7) + (lane >> 4) * 8, c = kk * 2 + ((lane >> 3) & 1);
        uint32_t t[4];
        ldmatrix_x4(t, smem_u32(b_s + r * BK + ((c ^ (r & 7)) << 4)));
        bf[2 * p][0] = t[0]; bf[2 * p][1] = t[1]; bf[2 * p + 1][0] = t[2]; bf[2 * p + 1][1] = t[3];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_e4m3(acc[i][j], af[i], bf[j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)  // promotion: fin += (sa * sb) * acc on the CUDA cores
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) fin[i][j][e] += sa[i][e >> 1] * acc[i][j][e];
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int row = m0 + wm + i * 16 + g, col = n0 + wn + j * 8 + 2 * q;
      store_pair(C, M, N, row, col, fin[i][j][0], fin[i][j][1]);
      store_pair(C, M, N, row + 8, col, fin[i][j][2], fin[i][j][3]);
    }
}
}  // namespace step1

// a (M, K) e4m3, a_scale (M, K/128), b (N, K) e4m3, b_scale (ceil(N/128), K/128), out (M, N) bf16; the checks
// are in fp8_teaching.gemm (and bind.cu). Returns "" or what went wrong.
std::string step1_gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out) {
  const int M = a.size(0), K = a.size(1), N = b.size(0);
  static bool attr = false;
  if (!attr) {
    cudaFuncSetAttribute(step1::gemm, cudaFuncAttributeMaxDynamicSharedMemorySize, step1::SMEM);
    attr = true;
  }
  dim3 grid((N + step1::BN - 1) / step1::BN, (M + step1::BM - 1) / step1::BM);
  step1::gemm<<<grid, step1::THREADS, step1::SMEM, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint8_t*>(a.data_ptr()), a_scale.data_ptr<float>(),
      reinterpret_cast<const uint8_t*>(b.data_ptr()), b_scale.data_ptr<float>(),
      reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), M, N, K);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : std::string("step1: launch failed: ") + cudaGetErrorString(e);
}
