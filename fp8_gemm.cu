// Fine-grained FP8 GEMM for Hopper (sm_90a), built by fp8.py through torch.utils.cpp_extension.
//
//   C[M, N] (bf16; fp32 for wgrad) = sum over 128-wide K blocks kb of
//                                    sa[m, kb] * sb[n / 128, kb] * (A[m, kb-block] . B[n, kb-block])
//
// A (M x K) e4m3 with one fp32 scale per token per 128 channels (1x128 tiles), B (N x K) e4m3 with one scale
// per 128x128 block; both K-major ("NT"), the layout of DeepSeek-V3's kernel.py and DeepGEMM. The tensor cores
// sum one 128-wide K block into a fresh fp32 accumulator; the CUDA cores then multiply that partial sum by its
// two scales and add it into a second fp32 accumulator: the report's promotion with N_C = 128 (TR §3.3).
//
// Kernels kept side by side as tiers of one learning path (fp8.py --bench times each):
//   tier 1  mma.sync.m16n8k32 (warp-level MMA), cp.async multi-stage pipeline, 128x128x128 tiles. On sm_90 the
//           e4m3 mma.sync has no tensor-core path of its own: SASS shows F2FP conversions + HMMA.16816 (fp16).
//   tier 2  wgmma (warpgroup MMA, QGMMA in SASS) fed by TMA into 128B-swizzled shared memory, mbarrier
//           pipeline, warp specialization (1 producer warpgroup issuing TMA, 2 math warpgroups), persistent
//           grid with a grouped tile order, setmaxnreg to move registers from the producer to the math warps.
//   tier 3  tier 2 + the bf16 tile leaves through swizzled shared memory and an asynchronous TMA store.
//   tier 4  tier 3 + two accumulators: the wgmmas of K block kb+1 run while the CUDA cores promote block kb.
//   tier 5  tier 4 in 2-CTA clusters (2 tiles along M) sharing the B tile through TMA multicast: each CTA
//           loads half of B, so L2 -> SM traffic per tile drops from 32 to 24 KiB per K block.
//   tier 6  the same in 2x2 clusters, A and B both multicast: 16 KiB per K block.
//   tier 7  2-CTA clusters along N sharing the A tile (tier 5 with the roles of A and B swapped).
//   tier 8  tier 3 with a 128 x 256 tile (each math warpgroup 64 x 256 as two m64n128 halves, one accumulator):
//           48 instead of 64 KiB loaded per 8.4 MFLOP, at the cost of tier 4's second accumulator.
//   tier 9  tier 4 with the A scales M-major ((K/128, ld) in memory): the producer copies each K block's 128 row
//           scales into the stage with the tiles, and the math warps read them from shared memory instead of
//           global memory. Three builds picked per shape: 5 stages; 6 stages when a tile has at most 4 K blocks
//           (its output then goes out one 64-column box at a time, to make room); and a split tail, where the
//           tiles of a last, mostly empty round are each split along K over several CTAs (split_parts). The
//           fastest tier (BENCHMARKS.md, runs 16-27).
// Training uses tier 9 (FP8Linear's Fprop and Dgrad) and three variants of tier 4 (see t2::gemm): 1D1D (wgrad:
// 1x128 scales on B too), M-grouped (routed-expert Fprop and Dgrad over stacked expert weights) and K-grouped
// 1D1D (routed-expert wgrad).
// Requirements checked on the host: K % 128 == 0, contiguous tensors (tier 9: M-major A scales), bf16 output
// (fp32 for the wgrad variants).

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <stdint.h>

#ifndef FP8_GEMM_NO_TORCH
// Light headers (not torch/extension.h): the JIT build takes ~20 s instead of ~80 s.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fp8g {

constexpr int BM = 128, BN = 128, BK = 128;  // tile; BK = N_C = the scale block along K

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One float from shared memory with ld.shared (a plain load through a generic pointer compiles to a generic LD).
__device__ __forceinline__ float lds(const float* p) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(smem_u32(p)));
  return v;
}

// fp32 output (the wgrad variants): two adjacent outputs of one row, one 8-byte store when aligned.
__device__ __forceinline__ void store_pair(float* C, int M, int N, int row, int col, float x, float y) {
  if (row >= M) return;
  float* p = C + (size_t)row * N + col;
  if (col + 1 < N && (N & 1) == 0) {
    *reinterpret_cast<float2*>(p) = make_float2(x, y);
  } else {
    if (col < N) p[0] = x;
    if (col + 1 < N) p[1] = y;
  }
}

__device__ __forceinline__ void store_pair(__nv_bfloat16* C, int M, int N, int row, int col, float x, float y) {
  // Two adjacent outputs of one row; a 4-byte store when both are in range and aligned (N even).
  if (row >= M) return;
  __nv_bfloat16* p = C + (size_t)row * N + col;
  if (col + 1 < N && (N & 1) == 0) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
  } else {
    if (col < N) p[0] = __float2bfloat16_rn(x);
    if (col + 1 < N) p[1] = __float2bfloat16_rn(y);
  }
}

// =====================================================================================================
// Tier 1: mma.sync.m16n8k32 e4m3, 8 warps as 2 (M) x 4 (N), each warp 64 x 32 of the 128 x 128 tile.
// =====================================================================================================
namespace t1 {
constexpr int THREADS = 256, STAGES = 3;
constexpr int TILE_BYTES = BM * BK;               // 16 KiB per operand per stage
constexpr int SMEM = STAGES * 2 * TILE_BYTES;     // 96 KiB

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  // src-size 0 zero-fills the 16 bytes: rows past M (or N) read as zeros.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

// One 128-row x 128-byte tile; 16-byte chunk c of row r goes to chunk c ^ (r & 7), so that the 8 row
// addresses of one ldmatrix phase fall in 8 different bank groups (no bank conflicts).
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
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
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
    if (nxt < Kb) { load_tile(sA(nxt % STAGES), A, M, m0, K, nxt * BK); load_tile(sB(nxt % STAGES), B, N, n0, K, nxt * BK); }
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
}  // namespace t1

// =====================================================================================================
// Tier 2: TMA + mbarrier pipeline + wgmma m64n128k32, 1 producer and 2 math warpgroups, persistent grid.
// =====================================================================================================
namespace t2 {
constexpr int THREADS = 384, MATH_WARPS = 8;
constexpr int TILE_BYTES = BM * BK;                           // 16 KiB, == BN * BK
constexpr int C_BYTES = 2 * 64 * BN * 2;                      // bf16 output tile for the TMA-store epilogue
constexpr int SB_BYTES = BN * 4;                              // SB_ROW: one K block's 128 column scales of B
constexpr int SA_BYTES = BM * 4;                              // SA_T: one K block's 128 row scales of A
// stages + output tile + column scales + barriers + 1024-B alignment slack
// Tier 9 with 6 stages writes its output one 64-column box at a time: half the output buffer, room for the 6th.
__host__ __device__ constexpr int c_rounds(bool sa_t, int STAGES) { return sa_t && STAGES == 6 ? 2 : 1; }
constexpr int smem_bytes(bool epi_tma, int STAGES, bool sb_row = false, bool sa_t = false) {
  return STAGES * 2 * TILE_BYTES + (epi_tma ? C_BYTES / c_rounds(sa_t, STAGES) : 0) + (sb_row ? STAGES * SB_BYTES : 0) +
         (sa_t ? STAGES * SA_BYTES : 0) + 2 * STAGES * 8 + 1024;
}
constexpr int GROUP_N = 8;                                    // tile raster: bands of 8 N tiles, M inner

__device__ __forceinline__ void mbar_init(uint64_t* b, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(smem_u32(b)), "r"(parity) : "memory");
  }
}
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int k, int row) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n"
      ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(k), "r"(row)
      : "memory");
}

// Plain bulk copy (no tensor map) of `bytes` contiguous bytes, 16-byte aligned, counted on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}

__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int col, int row) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n"
               ::"l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(src)), "r"(col), "r"(row) : "memory");
}

// wgmma shared-memory descriptor for a K-major tile written by TMA with 128-byte swizzle: rows of 128 bytes,
// 8-row swizzle atoms 1024 bytes apart (stride byte offset); the leading byte offset is unused in this mode.
__device__ __forceinline__ uint64_t desc(const uint8_t* p) {
  uint64_t d = (uint64_t)((smem_u32(p) & 0x3FFFF) >> 4);
  d |= (uint64_t)(1024 >> 4) << 32;
  d |= (uint64_t)1 << 62;  // layout type 1 = 128B swizzle
  return d;
}

__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// D (64 x 128 fp32, 64 registers per thread) (+)= A (64 x 32 e4m3, smem) . B (128 x 32 e4m3, smem)^T
__device__ __forceinline__ void wgmma_m64n128k32(float* d, uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(accumulate));
}

__device__ __forceinline__ void tile_coords(int t, int num_m, int num_n, int& m0, int& n0) {
  int band = t / (GROUP_N * num_m), first_n = band * GROUP_N;
  int width = min(num_n - first_n, GROUP_N), local = t - band * GROUP_N * num_m;
  m0 = (local / width) * BM;
  n0 = (first_n + local % width) * BN;
}

__device__ __forceinline__ void named_barrier(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }

template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

// The 4 k32 wgmmas of one 128-wide K block into a fresh accumulator (scale-d = 0 on the first), as one group.
__device__ __forceinline__ void issue_block(float* acc, const uint8_t* a, const uint8_t* b) {
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  // Step k moves 32 bytes along K: +2 in the descriptors' address field (16-byte units), computed once.
  // Only the low word changes (no carry: shared addresses are < 2^18), so the adds stay 32-bit.
  const uint64_t da = desc(a), db = desc(b);
  const uint32_t da_lo = (uint32_t)da, db_lo = (uint32_t)db;
  const uint64_t da_hi = da & ~0xFFFFFFFFull, db_hi = db & ~0xFFFFFFFFull;
#pragma unroll
  for (int k = 0; k < BK / 32; ++k) wgmma_m64n128k32(acc, da_hi | (da_lo + 2 * k), db_hi | (db_lo + 2 * k), k > 0);
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Split tail: hand-over of a partial tile between CTAs, release (after the writer warpgroup's bar.sync) and acquire.
__device__ __forceinline__ void flag_raise(unsigned* f) {
  asm volatile("fence.acq_rel.gpu;\nst.relaxed.gpu.global.u32 [%0], 1;\n" ::"l"(f) : "memory");
}
__device__ __forceinline__ void flag_wait(const unsigned* f) {
  unsigned v = 0;
  do {
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(f) : "memory");
  } while (v == 0);
}

// One step along the ring of STAGES pipeline stages: the next stage, and the full barrier's parity flipped on wrap.
template <int STAGES>
__device__ __forceinline__ void ring_advance(int& s, uint32_t& p) {
  if (++s == STAGES) { s = 0; p ^= 1; }
}

// The K loop of the two-accumulator pipeline (tier 4 and the cluster tiers): block 0 is already issued into
// acc0; step(cur, nxt, kb, last) starts block kb + 1 into `nxt` (unless last), waits for block kb in `cur` and
// promotes it. Unrolled by 2 so that acc0 and acc1 stay registers.
template <class Step>
__device__ __forceinline__ void k_loop_2acc(float* acc0, float* acc1, int n_blocks, Step& step) {
  int kb = 0;
  for (; kb + 2 < n_blocks; kb += 2) {
    step(acc0, acc1, kb, false);
    step(acc1, acc0, kb + 1, false);
  }
  if (kb + 1 < n_blocks) {
    step(acc0, acc1, kb, false);
    step(acc1, acc0, kb + 1, true);
  } else {
    step(acc0, acc1, kb, true);
  }
}

// Promotion on the CUDA cores: fin += (sa * sb) * acc. Register 4j+{0,1} is row r0, 4j+{2,3} row r0 + 8.
__device__ __forceinline__ void promote(float* fin, float* acc, float s0, float s1) {
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    fin[4 * j + 0] += s0 * acc[4 * j + 0];
    fin[4 * j + 1] += s0 * acc[4 * j + 1];
    fin[4 * j + 2] += s1 * acc[4 * j + 2];
    fin[4 * j + 3] += s1 * acc[4 * j + 3];
  }
}

// 1D1D promotion (wgrad: B too has one scale per row, i.e. per output column, per K block):
// fin += (sa[row] * sb[col]) * acc, the 128 column scales of this K block read from shared memory.
__device__ __forceinline__ void promote_cols(float* fin, float* acc, float s0, float s1, const float* sbs, int q) {
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    float2 b;  // cols 8j + 2q + {0, 1}; ld.shared (a plain load of this pointer compiles to a generic LD)
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(b.x), "=f"(b.y) : "r"(smem_u32(sbs + 8 * j + 2 * q)));
    fin[4 * j + 0] += (s0 * b.x) * acc[4 * j + 0];
    fin[4 * j + 1] += (s0 * b.y) * acc[4 * j + 1];
    fin[4 * j + 2] += (s1 * b.x) * acc[4 * j + 2];
    fin[4 * j + 3] += (s1 * b.y) * acc[4 * j + 3];
  }
}

// Tier 2: <false, false>. Tier 3 adds EPI_TMA: the bf16 tile goes through 128B-swizzled shared memory and an
// asynchronous TMA store, so the math warps start the next tile at once. Tier 4 adds OVERLAP: two accumulators,
// the wgmmas of K block kb+1 run on the tensor cores while the CUDA cores promote block kb. STAGES: pipeline
// depth (6 x 32 KiB; 5 stages measured no faster, BENCHMARKS.md).
// Three variants of tier 4 serve training (fp8.py):
//  * SB_ROW (wgrad, "1D1D"): SB holds one scale per row of B per K block, stored transposed as
//    (K/128, N rounded up to 128); the producer copies each K block's 128 scales into the stage next to the tiles.
//  * GROUPS != nullptr (routed experts, "M-grouped"): B stacks one (N, K) weight per expert, SB their
//    (N/128, K/128) block scales, and A's rows come sorted by expert in segments padded to 128 rows;
//    GROUPS[m0 / 128] is the expert of M tile m0, so each tile reads its own expert's rows of B.
//  * KG != nullptr (routed-expert wgrad, "K-grouped"): n_kg independent products over slices of K, the tokens
//    of one expert each: group g = (e, kb0, nkb) sums K blocks [kb0, kb0 + nkb) and writes rows
//    [e*M, e*M + M) of C, which is (experts*M, N); M % 128 == 0. Used with SB_ROW. Every group needs nkb >= 1
//    and kb0 + nkb <= K/128 (fp8.py sees to it).
// OutT = float (with the plain-store epilogue): the wgrad variants write fp32, as the report keeps Wgrad.
template <bool EPI_TMA, bool OVERLAP, int STAGES, bool SB_ROW = false, typename OutT = __nv_bfloat16,
          bool SA_T = false, bool SK = false>
__global__ void __launch_bounds__(THREADS, 1) gemm(const __grid_constant__ CUtensorMap tmA,
                                                   const __grid_constant__ CUtensorMap tmB,
                                                   const __grid_constant__ CUtensorMap tmC,
                                                   const float* __restrict__ SA, const float* __restrict__ SB,
                                                   OutT* __restrict__ C, int M, int N, int K,
                                                   const int* __restrict__ GROUPS = nullptr,
                                                   const int* __restrict__ KG = nullptr, int n_kg = 0,
                                                   int sa_ld = 0, float* __restrict__ WS = nullptr,
                                                   unsigned* __restrict__ FLAGS = nullptr, int parts = 0) {
  static_assert(OVERLAP || !SB_ROW, "the 1D1D variant is built on tier 4 (OVERLAP)");
  static_assert(OVERLAP || !SA_T, "A scales in shared memory are a tier-4 variant");
  static_assert(!EPI_TMA || sizeof(OutT) == 2, "the TMA-store epilogue writes bf16; fp32 outputs use plain stores");
  static_assert(!SK || (SA_T && EPI_TMA), "the split tail is built on tier 9");
  extern __shared__ uint8_t smem_raw[];
  // 128B-swizzled TMA destinations and wgmma operands want 1024-byte aligned tiles.
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* sA = smem;                                   // [STAGES][128 rows][128 B]
  uint8_t* sB = smem + STAGES * TILE_BYTES;             // [STAGES][128 rows][128 B]
  uint8_t* sC = smem + 2 * STAGES * TILE_BYTES;         // EPI_TMA: [2 math wg][2 boxes][64 rows][128 B]
  constexpr int C_ROUNDS = c_rounds(SA_T, STAGES);  // EPI_TMA: output boxes of 64 columns in C_ROUNDS rounds
  float* sSB = reinterpret_cast<float*>(sC + (EPI_TMA ? C_BYTES / C_ROUNDS : 0));  // SB_ROW: [STAGES][128]
  float* sSA = sSB + (SB_ROW ? STAGES * BN : 0);                                // SA_T: [STAGES][128]
  uint64_t* full = reinterpret_cast<uint64_t*>(sSA + (SA_T ? STAGES * BM : 0));
  uint64_t* empty = full + STAGES;                                              // math warps done reading
  const int Kb = K / BK, num_m = (M + BM - 1) / BM, num_n = (N + BN - 1) / BN;
  const int tiles = (KG ? n_kg : 1) * num_m * num_n;
  const int n_pad = num_n * BN;  // SB_ROW: row length of the transposed column scales
  // Tile t: its coordinates, its K blocks [kb0, kb0 + nkb) and the row of C where it is stored.
  auto tile = [&](int t, int& m0, int& n0, int& kb0, int& nkb, int& c_row) {
    const int g = KG ? t / (num_m * num_n) : 0;
    tile_coords(t - g * num_m * num_n, num_m, num_n, m0, n0);
    kb0 = KG ? KG[3 * g + 1] : 0;
    nkb = KG ? KG[3 * g + 2] : Kb;
    c_row = (KG ? KG[3 * g] * M : 0) + m0;
  };
  // SK with parts > 1: the split tail. Of the tiles left after the last full round (rest <= G / 2 of them),
  // each is split along K into `parts` runs of K blocks, run side by side by `parts` neighbouring CTAs: CTA
  // b < rest * parts takes run b % parts of tile dp_end + b / parts. Run 0's CTA owns the tile: the others
  // write their FP32 partial sums to their slot of WS and raise their flag, the owner waits for them, adds
  // them and stores the tile, and lowers the flags for the next launch. (The host picks `parts`.)
  // The split run is computed once and made warp-uniform by a shuffle (all threads, before the roles split):
  // the producer's per-block code must stay in uniform registers, or its issue slows the whole pipeline.
  const bool sk = SK && parts > 1;
  const int G = gridDim.x;
  const int dp_end = sk ? tiles / G * G : tiles;  // tiles [0, dp_end): one per CTA per round
  int sp_t = -1, sp_k0 = 0, sp_nk = 0;           // this CTA's split run: tile, first K block, K blocks
  if (sk && (int)blockIdx.x < (tiles - dp_end) * parts) {
    const int p = blockIdx.x % parts;
    sp_t = dp_end + blockIdx.x / parts;
    sp_k0 = p * Kb / parts;
    sp_nk = (p + 1) * Kb / parts - sp_k0;
  }
  sp_t = __shfl_sync(0xffffffff, sp_t, 0);
  sp_k0 = __shfl_sync(0xffffffff, sp_k0, 0);
  sp_nk = __shfl_sync(0xffffffff, sp_nk, 0);
  // The math warps' work in order: tiles blockIdx.x, + G, ... below dp_end, then the split run, if any (K blocks
  // [sp_k0, sp_k0 + sp_nk) of tile sp_t); fn(t, kb0, nkb) with nkb < 0 for a whole tile. One call site, so the
  // per-tile code (the K loop, the epilogue) is inlined once: two call sites doubled the split build's code.
  auto each_work = [&](auto&& fn) {
    bool split_left = SK && sp_t >= 0;
    for (int t = blockIdx.x;; t += G) {
      int kb0 = 0, nkb = -1;
      if (t >= dp_end) {
        if (!split_left) break;
        split_left = false;
        t = sp_t, kb0 = sp_k0, nkb = sp_nk;  // t >= dp_end: the next step leaves the loop
      }
      fn(t, kb0, nkb);
    }
  };
  // Warpgroup index through a shuffle: the compiler then knows it is warp-uniform and keeps what derives
  // from it (the math warpgroup's shared-memory offsets, its wgmma descriptors) in uniform registers.
  const int wg = __shfl_sync(0xffffffff, threadIdx.x / 128, 0);

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) { mbar_init(&full[s], 1); mbar_init(&empty[s], MATH_WARPS); }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {  // ---------------- producer warpgroup: one thread issues all TMA loads ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmA)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmB)) : "memory");
      uint32_t it = 0;
      // K blocks [kb0, kb0 + nkb) of tile t (the split run), or the tile's own (nkb < 0)
      auto load_tile = [&](int t, int kb0_, int nkb_) {
        int m0, n0, kb0, nkb, c_row;
        tile(t, m0, n0, kb0, nkb, c_row);
        if (nkb_ >= 0) kb0 = kb0_, nkb = nkb_;
        const int b_row = GROUPS ? GROUPS[m0 / BM] * N + n0 : n0;  // row of B where this tile's columns start
        for (int kb = kb0; kb < kb0 + nkb; ++kb, ++it) {
          int s = it % STAGES;
          mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);  // first pass: a fresh barrier passes parity 1
          // rows past M/N are zero-filled, still counted
          mbar_expect_tx(&full[s], 2 * TILE_BYTES + (SB_ROW ? SB_BYTES : 0) + (SA_T ? SA_BYTES : 0));
          tma_load(sA + s * TILE_BYTES, &tmA, &full[s], kb * BK, m0);
          tma_load(sB + s * TILE_BYTES, &tmB, &full[s], kb * BK, b_row);
          if constexpr (SB_ROW) bulk_load(sSB + s * BN, SB + (size_t)kb * n_pad + n0, SB_BYTES, &full[s]);
          if constexpr (SA_T) bulk_load(sSA + s * BM, SA + (size_t)kb * sa_ld + m0, SA_BYTES, &full[s]);
        }
      };
      // Not each_work: with its loop, the producer's coordinates left the uniform registers (SASS). This code is
      // small, so two call sites cost little.
      for (int t = blockIdx.x; t < dp_end; t += G) load_tile(t, 0, -1);
      if (SK && sp_t >= 0) load_tile(sp_t, sp_k0, sp_nk);
    }
  } else {  // ---------------- math warpgroups: rows [64*(wg-1), 64*wg) of each tile ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int mw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int rw = warp * 16 + (lane >> 2);  // this thread's first row in the warpgroup's 64 (+8 the second)
    const bool leader = (threadIdx.x & 127) == 0;
    // The ring position of the next K block to consume: its stage and its full barrier's parity, which flips
    // each time the ring wraps (kept as two counters: `it % 6` would cost a multiply-shift at every use).
    auto advance = ring_advance<STAGES>;
    int st = 0;
    uint32_t ph = 0;
    float acc0[64], acc1[64], fin[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc0[i] = acc1[i] = 0.f;
    auto a_of = [&](int s) { return sA + s * TILE_BYTES + mw * 64 * BK; };
    auto b_of = [&](int s) { return sB + s * TILE_BYTES; };
    // One tile's work: where it goes in C, how many K blocks it sums, and where this thread's scales start:
    // its two rows of A and B's block row (the expert's own blocks when grouped). Rows past M read row M - 1's
    // scales: their A rows are zero-filled by TMA and they are never stored.
    struct Work {
      int m0, n0, kb0, nkb, c_row;
      const float *pa0, *pa1, *pb;
    };
    auto work_of = [&](int t, int kb0_, int nkb_) {  // nkb_ >= 0: K blocks [kb0_, kb0_ + nkb_) only
      Work w;
      tile(t, w.m0, w.n0, w.kb0, w.nkb, w.c_row);
      if (nkb_ >= 0) w.kb0 = kb0_, w.nkb = nkb_;
      const int kb0 = w.kb0;
      const int r0 = w.m0 + mw * 64 + rw;
      w.pa0 = SA + (size_t)min(r0, M - 1) * Kb + kb0;
      w.pa1 = SA + (size_t)min(r0 + 8, M - 1) * Kb + kb0;
      w.pb = SB + (size_t)((GROUPS ? GROUPS[w.m0 / BM] * ((N + BN - 1) / BN) : 0) + w.n0 / 128) * Kb + kb0;
      return w;
    };
    // The scales of block kb of a tile (SB_ROW: B's is 1 here, its column scales come in promote_cols).
    float na0, na1, nb;
    auto load_scales = [&](const Work& w, int kb) {
      nb = SB_ROW ? 1.f : w.pb[kb];
      if constexpr (!SA_T) {
        na0 = w.pa0[kb];
        na1 = w.pa1[kb];
      }
    };
    auto store_tile = [&](const Work& w) {
      const int r0 = w.m0 + mw * 64 + rw, r1 = r0 + 8;
      if constexpr (EPI_TMA) {
        constexpr int BOXES = 2 / C_ROUNDS;  // 64-column boxes of 64 rows x 128 B per round
        uint8_t* cbuf = sC + mw * (C_BYTES / 2 / C_ROUNDS);
#pragma unroll
        for (int h = 0; h < C_ROUNDS; ++h) {
          if (leader) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // the last store read it
          named_barrier(1 + mw);
#pragma unroll
          for (int jj = 0; jj < 8 * BOXES; ++jj) {  // cols 8j + 2(lane%4): box j/8, 16-byte chunk j%8 swizzled by row%8
            const int j = h * 8 * BOXES + jj;
            int off = (jj >> 3) * 8192 + rw * 128 + (((j & 7) ^ (rw & 7)) << 4) + 4 * (lane & 3);
            *reinterpret_cast<__nv_bfloat162*>(cbuf + off) = __floats2bfloat162_rn(fin[4 * j + 0], fin[4 * j + 1]);
            *reinterpret_cast<__nv_bfloat162*>(cbuf + off + 8 * 128) =
                __floats2bfloat162_rn(fin[4 * j + 2], fin[4 * j + 3]);
          }
          asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // make the stores visible to TMA
          named_barrier(1 + mw);
          if (leader) {  // rows past M and columns past N are clipped by TMA
#pragma unroll
            for (int b = 0; b < BOXES; ++b)
              tma_store(&tmC, cbuf + b * 8192, w.n0 + 64 * (h * BOXES + b), w.c_row + mw * 64);
            asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
          }
        }
      } else {
        OutT* Cg = C + (size_t)(w.c_row - w.m0) * N;  // K-grouped: this expert's block of rows (else C itself)
#pragma unroll
        for (int j = 0; j < 16; ++j) {  // register 4j+{0,1} -> (row r0, cols 8j + 2(lane%4) + {0,1}); 4j+{2,3} -> r1
          int col = w.n0 + 8 * j + 2 * (lane & 3);
          store_pair(Cg, M, N, r0, col, fin[4 * j + 0], fin[4 * j + 1]);
          store_pair(Cg, M, N, r1, col, fin[4 * j + 2], fin[4 * j + 3]);
        }
      }
    };
    if constexpr (!OVERLAP) {
      for (int t = blockIdx.x; t < tiles; t += G) {
        const Work w = work_of(t, 0, -1);
#pragma unroll
        for (int i = 0; i < 64; ++i) fin[i] = 0.f;
        for (int kb = 0; kb < w.nkb; ++kb) {
          load_scales(w, kb);
          const float s0 = na0 * nb, s1 = na1 * nb;
          mbar_wait(&full[st], ph);
          issue_block(acc0, a_of(st), b_of(st));
          wgmma_wait<0>();
          if (lane == 0) mbar_arrive(&empty[st]);  // stage may be refilled while we promote
          promote(fin, acc0, s0, s1);
          advance(st, ph);
        }
        store_tile(w);
      }
    } else {
      // Step kb: start block kb+1 into `nxt`, wait for block kb (in `cur`) only, release its stage, promote.
      // The last step has no next block (k_loop_2acc drives the steps). The scales are loaded one step ahead,
      // so that their global-load latency hides behind a whole block of MMAs rather than stalling the
      // promotion (Nsight Compute showed that stall when they were loaded at the start of the step).
      // Measured and dropped: issuing the next tile's first block before this tile's epilogue (BENCHMARKS.md).
      // Each tile (t, the split run's K blocks or nkb < 0: all of them): its K loop, then its epilogue.
      auto run_tile = [&](int t, int kb0_, int nkb_) {
        const Work w = work_of(t, kb0_, nkb_);
#pragma unroll
        for (int i = 0; i < 64; ++i) fin[i] = 0.f;
        auto step = [&](float* cur, float* nxt, int kb, bool last) {
          if constexpr (SA_T) {  // this block's A scales came with its stage, which is not released yet
            na0 = lds(sSA + st * BM + mw * 64 + rw);
            na1 = lds(sSA + st * BM + mw * 64 + rw + 8);
          }
          const float s0 = na0 * nb, s1 = na1 * nb;
          int sn = st;
          uint32_t pn = ph;
          advance(sn, pn);  // block kb + 1's stage
          if (!last) {
            load_scales(w, kb + 1);
            mbar_wait(&full[sn], pn);
            issue_block(nxt, a_of(sn), b_of(sn));
            wgmma_wait<1>();
          } else {
            wgmma_wait<0>();
          }
          if constexpr (SB_ROW) {  // the stage also holds this block's column scales: release it after them
            promote_cols(fin, cur, s0, s1, sSB + st * BN, lane & 3);
            if (lane == 0) mbar_arrive(&empty[st]);
          } else {
            if (lane == 0) mbar_arrive(&empty[st]);
            promote(fin, cur, s0, s1);
          }
          st = sn;
          ph = pn;
        };
        load_scales(w, 0);
        mbar_wait(&full[st], ph);
        issue_block(acc0, a_of(st), b_of(st));
        k_loop_2acc(acc0, acc1, w.nkb, step);
        if (nkb_ < 0) {
          store_tile(w);
        } else if (w.kb0 > 0) {  // a later part of a split tile: hand this warpgroup's partial sums to the owner
          float* p = WS + (size_t)(blockIdx.x * 2 + mw) * 8192 + (threadIdx.x & 127) * 4;  // [16][128 threads][4]
#pragma unroll
          for (int j = 0; j < 16; ++j)
            __stcg(reinterpret_cast<float4*>(p + 512 * j), make_float4(fin[4 * j], fin[4 * j + 1], fin[4 * j + 2],
                                                                       fin[4 * j + 3]));
          named_barrier(1 + mw);
          if (leader) flag_raise(&FLAGS[blockIdx.x * 2 + mw]);
        } else {  // the owner: wait for the CTAs that ran the rest of the tile, add their sums, store the tile
          if (leader)
            for (int c = blockIdx.x + 1; c < (int)blockIdx.x + parts; ++c) {
              flag_wait(&FLAGS[c * 2 + mw]);
              FLAGS[c * 2 + mw] = 0;  // lowered for the next launch (each flag has one reader per launch)
            }
          named_barrier(1 + mw);
          for (int c = blockIdx.x + 1; c < (int)blockIdx.x + parts; ++c) {
            const float* p = WS + (size_t)(c * 2 + mw) * 8192 + (threadIdx.x & 127) * 4;
#pragma unroll
            for (int j = 0; j < 16; ++j) {
              const float4 v = __ldcg(reinterpret_cast<const float4*>(p + 512 * j));
              fin[4 * j] += v.x;
              fin[4 * j + 1] += v.y;
              fin[4 * j + 2] += v.z;
              fin[4 * j + 3] += v.w;
            }
          }
          store_tile(w);
        }
      };
      each_work(run_tile);
    }
    if (EPI_TMA && leader) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");  // before smem goes away
  }
}
}  // namespace t2

// =====================================================================================================
// Tier 5+: tier 4 run by clusters of CM x CN CTAs that share operand tiles through TMA multicast.
// =====================================================================================================
// At ~1000 TFLOP/s a 128x128 tile pulls 32 KiB from L2 per 128-wide K block on each of the 132 SMs, about
// 8 TB/s in all: near what L2 can deliver. CTAs of one cluster work on neighbouring tiles: the CM CTAs of a
// column share one B tile and the CN CTAs of a row one A tile. Each CTA loads 1/CM of the B tile and 1/CN of
// the A tile and multicasts them to the CTAs that share them, so L2 reads per CTA drop to
// 16 KiB * (1/CM + 1/CN). A stage may be refilled only when every CTA it is written into is done with it:
// each math warp arrives on the `empty` barrier of all CM + CN - 1 CTAs that share its row or column.
// Cluster rank r sits at (cm, cn) = (r % CM, r / CM). Tiles past M or N ("phantom" tiles of a group at the
// edge) still load and release their stages, for their partners, but do no math and store nothing.
// Measured (BENCHMARKS.md, runs 30-32): these kernels are bound by their one producer thread. Its loop keeps
// the tile coordinates in regular registers (over 50 SASS instructions per K block, an R2UR at each TMA
// issue), and it almost never waits for a free stage; the math warps wait for full ones.
namespace t5 {
constexpr int STAGES = 6, SMEM = t2::smem_bytes(true, STAGES);

__device__ __forceinline__ uint32_t sreg_cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t sreg_cluster_id() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%clusterid.x;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t sreg_num_clusters() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%nclusterid.x;\n" : "=r"(r));
  return r;
}
// Every thread of every CTA of the cluster: barrier init visible cluster-wide before any multicast or remote
// arrive; at the end, no CTA leaves while a partner may still write into its shared memory.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
// Arrive on the barrier at the same shared-memory offset in CTA `rank` of the cluster (itself included).
// Default (release, CTA-scope) semantics: what the arrival publishes is "wgmma has finished reading the stage",
// already ordered by wgmma.wait_group; a .release.cluster arrive costs a MEMBAR.ALL.GPU per call in SASS.
__device__ __forceinline__ void arrive_at(uint64_t* b, uint32_t rank) {
  asm volatile("{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
               "mbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n"
               ::"r"(smem_u32(b)), "r"(rank) : "memory");
}
// TMA load whose box lands at the same offset in every CTA of `mask`, each signalling its own barrier there.
__device__ __forceinline__ void tma_load_mc(void* dst, const CUtensorMap* map, uint64_t* bar, int k, int row,
                                            uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;\n"
      ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(k), "r"(row), "h"(mask)
      : "memory");
}

template <int CM, int CN>
__global__ void __launch_bounds__(t2::THREADS, 1) gemm(const __grid_constant__ CUtensorMap tmA,
                                                       const __grid_constant__ CUtensorMap tmB,
                                                       const __grid_constant__ CUtensorMap tmC,
                                                       const float* __restrict__ SA, const float* __restrict__ SB,
                                                       int M, int N, int K) {
  using namespace t2;
  constexpr int A_ROWS = BM / CN, B_ROWS = BN / CM;  // rows of the A / B slice this CTA loads
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* sA = smem;                                   // [STAGES][128 rows][128 B]
  uint8_t* sB = smem + STAGES * TILE_BYTES;             // [STAGES][128 rows][128 B]
  uint8_t* sC = smem + 2 * STAGES * TILE_BYTES;         // [2 math wg][2 boxes][64 rows][128 B]
  uint64_t* full = reinterpret_cast<uint64_t*>(sC + C_BYTES);
  uint64_t* empty = full + STAGES;
  const int Kb = K / BK, num_m = (M + BM - 1) / BM, num_n = (N + BN - 1) / BN;
  const int num_gm = (num_m + CM - 1) / CM, num_gn = (num_n + CN - 1) / CN, groups = num_gm * num_gn;
  const int rank = (int)sreg_cluster_rank(), cm = rank % CM, cn = rank / CM;
  const int wg = __shfl_sync(0xffffffff, threadIdx.x / 128, 0);  // warp-uniform (see t2::gemm)
  auto origin = [&](int g, int& m0, int& n0) {  // this CTA's tile in group g (banded order over groups)
    int gm0, gn0;
    tile_coords(g, num_gm, num_gn, gm0, gn0);    // origins of a BM x BN grid: group index = origin / BM|BN
    m0 = (gm0 / BM * CM + cm) * BM;
    n0 = (gn0 / BN * CN + cn) * BN;
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) { mbar_init(&full[s], 1); mbar_init(&empty[s], MATH_WARPS * (CM + CN - 1)); }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  cluster_sync();

  if (wg == 0) {  // ---------------- producer: one thread loads this CTA's slices, multicast ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmA)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmB)) : "memory");
      uint16_t mask_a = 0, mask_b = 0;  // CTAs sharing this CTA's A tile (same cm) / B tile (same cn)
#pragma unroll
      for (int j = 0; j < CN; ++j) mask_a |= uint16_t(1u << (cm + CM * j));
#pragma unroll
      for (int i = 0; i < CM; ++i) mask_b |= uint16_t(1u << (i + CM * cn));
      uint32_t it = 0;
      for (int g = (int)sreg_cluster_id(); g < groups; g += (int)sreg_num_clusters()) {
        int m0, n0;
        origin(g, m0, n0);
        // A slice that would start past M (or N) starts at the last row instead, so that no box lies wholly
        // outside the tensor: the rows it brings feed only output rows (columns) that the TMA store clips.
        // Partial boxes are zero-filled past M/N and still count their bytes.
        const int arow = min(m0 + cn * A_ROWS, M - 1), brow = min(n0 + cm * B_ROWS, N - 1);
        for (int kb = 0; kb < Kb; ++kb, ++it) {
          int s = it % STAGES;
          mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);
          mbar_expect_tx(&full[s], 2 * TILE_BYTES);  // all slices of A and B, from this CTA and its partners
          uint8_t* da = sA + s * TILE_BYTES + cn * A_ROWS * BK;
          uint8_t* db = sB + s * TILE_BYTES + cm * B_ROWS * BK;
          if constexpr (CN == 1) tma_load(da, &tmA, &full[s], kb * BK, arow);
          else tma_load_mc(da, &tmA, &full[s], kb * BK, arow, mask_a);
          if constexpr (CM == 1) tma_load(db, &tmB, &full[s], kb * BK, brow);
          else tma_load_mc(db, &tmB, &full[s], kb * BK, brow, mask_b);
        }
      }
    }
  } else {  // ---------------- math warpgroups: tier 4's loop, releasing stages cluster-wide ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int mw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int rw = warp * 16 + (lane >> 2);
    const bool leader = (threadIdx.x & 127) == 0;
    auto release = [&](int s) {  // this warp is done with stage s: tell every CTA that writes into it
      if (lane == 0) {
#pragma unroll
        for (int j = 0; j < CN; ++j) arrive_at(&empty[s], cm + CM * j);
#pragma unroll
        for (int r = 0; r < CM; ++r)
          if (r != cm) arrive_at(&empty[s], r + CM * cn);
      }
    };
    int st = 0;  // ring position of the next K block: stage and full-barrier parity (as in t2::gemm)
    uint32_t ph = 0;
    auto advance = t2::ring_advance<STAGES>;
    auto a_of = [&](int s) { return sA + s * TILE_BYTES + mw * 64 * BK; };
    auto b_of = [&](int s) { return sB + s * TILE_BYTES; };
    float acc0[64], acc1[64], fin[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc0[i] = acc1[i] = 0.f;
    for (int g = (int)sreg_cluster_id(); g < groups; g += (int)sreg_num_clusters()) {
      int m0, n0;
      origin(g, m0, n0);
      if (m0 >= M || n0 >= N) {  // phantom tile: keep the stages flowing for the partners
        for (int kb = 0; kb < Kb; ++kb) {
          mbar_wait(&full[st], ph);
          release(st);
          advance(st, ph);
        }
        continue;
      }
      const int r0 = m0 + mw * 64 + rw, r1 = r0 + 8;
      // Scales one step ahead, as in t2::gemm; rows past M read row M - 1's (never stored).
      const float* pa0 = SA + (size_t)min(r0, M - 1) * Kb;
      const float* pa1 = SA + (size_t)min(r1, M - 1) * Kb;
      const float* pb = SB + (size_t)(n0 / 128) * Kb;
      float na0 = pa0[0], na1 = pa1[0], nb = pb[0];
#pragma unroll
      for (int i = 0; i < 64; ++i) fin[i] = 0.f;
      auto step = [&](float* cur, float* nxt, int kb, bool last) {
        const float s0 = na0 * nb, s1 = na1 * nb;
        int sn = st;
        uint32_t pn = ph;
        advance(sn, pn);
        if (!last) {
          nb = pb[kb + 1];
          na0 = pa0[kb + 1];
          na1 = pa1[kb + 1];
          mbar_wait(&full[sn], pn);
          issue_block(nxt, a_of(sn), b_of(sn));
          wgmma_wait<1>();
        } else {
          wgmma_wait<0>();
        }
        release(st);
        promote(fin, cur, s0, s1);
        st = sn;
        ph = pn;
      };
      mbar_wait(&full[st], ph);
      issue_block(acc0, a_of(st), b_of(st));
      t2::k_loop_2acc(acc0, acc1, Kb, step);
      uint8_t* cbuf = sC + mw * (C_BYTES / 2);
      if (leader) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
      named_barrier(1 + mw);
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        int off = (j >> 3) * 8192 + rw * 128 + (((j & 7) ^ (rw & 7)) << 4) + 4 * (lane & 3);
        *reinterpret_cast<__nv_bfloat162*>(cbuf + off) = __floats2bfloat162_rn(fin[4 * j + 0], fin[4 * j + 1]);
        *reinterpret_cast<__nv_bfloat162*>(cbuf + off + 8 * 128) =
            __floats2bfloat162_rn(fin[4 * j + 2], fin[4 * j + 3]);
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      named_barrier(1 + mw);
      if (leader) {
        tma_store(&tmC, cbuf, n0, m0 + mw * 64);
        tma_store(&tmC, cbuf + 8192, n0 + 64, m0 + mw * 64);
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      }
    }
    if (leader) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
  cluster_sync();
}
}  // namespace t5

// =====================================================================================================
// Tier 8: a 128 x 256 tile. Each math warpgroup owns 64 rows x 256 columns as two 128-column halves.
// =====================================================================================================
// Per 128-wide K block a 128x128 tile moves 32 KiB into shared memory for 4.2 MFLOP; a 128x256 tile moves
// 48 KiB for 8.4 MFLOP, 25% fewer bytes per FLOP through L2 and the shared-memory write port. The price is
// registers: 128 promoted fp32 columns per thread leave room for one 64-register accumulator, not tier 4's
// two, so within a warpgroup each half is issued, awaited and promoted in turn; the tensor cores stay busy
// during one warpgroup's promotion with the other warpgroup's wgmmas (DeepGEMM's scheme). The two halves use
// the B scales of two consecutive 128-row weight blocks. 4 stages of 48 KiB; the output leaves per warpgroup
// in two 64 x 128 rounds through a 16 KiB staging buffer.
namespace t8 {
constexpr int BN2 = 256, STAGES = 4;
constexpr int A_BYTES = BM * BK, B_BYTES = BN2 * BK, C_WG = 64 * 128 * 2;
constexpr int SMEM = STAGES * (A_BYTES + B_BYTES) + 2 * C_WG + 2 * STAGES * 8 + 1024;

__global__ void __launch_bounds__(t2::THREADS, 1) gemm(const __grid_constant__ CUtensorMap tmA,
                                                       const __grid_constant__ CUtensorMap tmB,
                                                       const __grid_constant__ CUtensorMap tmC,
                                                       const float* __restrict__ SA, const float* __restrict__ SB,
                                                       int M, int N, int K) {
  using namespace t2;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* sA = smem;                                   // [STAGES][128 rows][128 B]
  uint8_t* sB = smem + STAGES * A_BYTES;                // [STAGES][256 rows][128 B]
  uint8_t* sC = sB + STAGES * B_BYTES;                  // [2 math wg][2 boxes][64 rows][128 B]
  uint64_t* full = reinterpret_cast<uint64_t*>(sC + 2 * C_WG);
  uint64_t* empty = full + STAGES;
  const int Kb = K / BK, num_m = (M + BM - 1) / BM, num_n = (N + BN2 - 1) / BN2, tiles = num_m * num_n;
  const int nb = (N + 127) / 128;  // rows of SB
  const int wg = threadIdx.x / 128;
  auto coords = [&](int t, int& m0, int& n0) {  // t2::tile_coords' banded order, 256-wide N tiles
    int band = t / (GROUP_N * num_m), first_n = band * GROUP_N;
    int width = min(num_n - first_n, GROUP_N), local = t - band * GROUP_N * num_m;
    m0 = (local / width) * BM;
    n0 = (first_n + local % width) * BN2;
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) { mbar_init(&full[s], 1); mbar_init(&empty[s], MATH_WARPS); }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {  // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmA)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmB)) : "memory");
      uint32_t it = 0;
      for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
        int m0, n0;
        coords(t, m0, n0);
        for (int kb = 0; kb < Kb; ++kb, ++it) {
          int s = it % STAGES;
          mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);
          mbar_expect_tx(&full[s], A_BYTES + B_BYTES);
          tma_load(sA + s * A_BYTES, &tmA, &full[s], kb * BK, m0);
          tma_load(sB + s * B_BYTES, &tmB, &full[s], kb * BK, n0);
        }
      }
    }
  } else {  // ---------------- math warpgroups: rows [64*(wg-1), 64*wg), all 256 columns ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int mw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int rw = warp * 16 + (lane >> 2);
    const bool leader = (threadIdx.x & 127) == 0;
    uint32_t it = 0;
    float acc[64], fin[128];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
      int m0, n0;
      coords(t, m0, n0);
      const int r0 = m0 + mw * 64 + rw, r1 = r0 + 8, bn = n0 / 128;
#pragma unroll
      for (int i = 0; i < 128; ++i) fin[i] = 0.f;
      for (int kb = 0; kb < Kb; ++kb, ++it) {
        const float sb0 = SB[bn * Kb + kb], sb1 = bn + 1 < nb ? SB[(bn + 1) * Kb + kb] : 0.f;
        const float sa0 = r0 < M ? SA[(size_t)r0 * Kb + kb] : 0.f, sa1 = r1 < M ? SA[(size_t)r1 * Kb + kb] : 0.f;
        const uint8_t* a = sA + (it % STAGES) * A_BYTES + mw * 64 * BK;
        const uint8_t* b = sB + (it % STAGES) * B_BYTES;
        mbar_wait(&full[it % STAGES], (it / STAGES) & 1);
        issue_block(acc, a, b);                 // columns [0, 128)
        wgmma_wait<0>();
        promote(fin, acc, sa0 * sb0, sa1 * sb0);
        issue_block(acc, a, b + 128 * BK);      // columns [128, 256)
        wgmma_wait<0>();
        if (lane == 0) mbar_arrive(&empty[it % STAGES]);
        promote(fin + 64, acc, sa0 * sb1, sa1 * sb1);
      }
      uint8_t* cbuf = sC + mw * C_WG;
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // two rounds of 64 rows x 128 columns through the 16 KiB buffer
        if (leader) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
        named_barrier(1 + mw);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          int off = (j >> 3) * 8192 + rw * 128 + (((j & 7) ^ (rw & 7)) << 4) + 4 * (lane & 3);
          *reinterpret_cast<__nv_bfloat162*>(cbuf + off) =
              __floats2bfloat162_rn(fin[64 * h + 4 * j + 0], fin[64 * h + 4 * j + 1]);
          *reinterpret_cast<__nv_bfloat162*>(cbuf + off + 8 * 128) =
              __floats2bfloat162_rn(fin[64 * h + 4 * j + 2], fin[64 * h + 4 * j + 3]);
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        named_barrier(1 + mw);
        if (leader) {  // boxes wholly right of N are skipped, partial ones clipped by TMA
          const int c0 = n0 + 128 * h;
          if (c0 < N) tma_store(&tmC, cbuf, c0, m0 + mw * 64);
          if (c0 + 64 < N) tma_store(&tmC, cbuf + 8192, c0 + 64, m0 + mw * 64);
          asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        }
      }
    }
    if (leader) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
}
}  // namespace t8

// ------------------------------------------------ host side ------------------------------------------------
static PFN_cuTensorMapEncodeTiled_v12000 get_encode() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (!fn) {
    cudaDriverEntryPointQueryResult q;
    void* p = nullptr;
    cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }
  return fn;
}

// 2-D map over a row-major (rows x cols) matrix; box of box_rows x box_cols elements, 128-byte swizzle.
static bool make_map(CUtensorMap* map, const void* ptr, CUtensorMapDataType dtype, int elem_bytes, int rows,
                     int cols, int box_rows, int box_cols) {
  auto encode = get_encode();
  if (!encode) return false;
  cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  cuuint64_t strides[1] = {(cuuint64_t)cols * elem_bytes};
  cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows}, estr[2] = {1, 1};
  CUresult r = encode(map, dtype, 2, const_cast<void*>(ptr), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// b_rows: rows of B (N, or experts x N when grouped); groups: the expert of each M tile, or nullptr.
// Split-tail workspace of one device: a slot of 128 x 128 FP32 partial sums and two flags (one per math
// warpgroup) per CTA. Allocated by the first split launch on the device, outside any CUDA-graph capture, with
// the flags zeroed before that launch (a device synchronization, once). The kernel lowers each flag it reads,
// so launches on one stream, and graph replays, can reuse it. Split launches on two streams at once (or from
// two host threads) must not share it: one owner could take the other's flag and the other wait forever.
struct SkSpace {
  float* ws = nullptr;
  unsigned* flags = nullptr;
};
static const char* sk_space(int sms, cudaStream_t stream, SkSpace& out) {
  static SkSpace per_dev[64];
  int dev;
  cudaGetDevice(&dev);
  if (dev >= 64) return "split tail: device index >= 64";
  SkSpace& s = per_dev[dev];
  if (!s.ws) {
    cudaStreamCaptureStatus cap;
    if (cudaStreamIsCapturing(stream, &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone)
      return "split tail: the first call on a device must run outside CUDA-graph capture (it allocates)";
    SkSpace n;
    if (cudaMalloc(&n.ws, (size_t)sms * BM * BN * sizeof(float)) != cudaSuccess ||
        cudaMalloc(&n.flags, (size_t)sms * 2 * sizeof(unsigned)) != cudaSuccess ||
        cudaMemset(n.flags, 0, (size_t)sms * 2 * sizeof(unsigned)) != cudaSuccess ||
        cudaDeviceSynchronize() != cudaSuccess) {  // the zeroed flags, before any stream's first split launch
      cudaFree(n.ws);
      cudaFree(n.flags);
      cudaGetLastError();
      return "split tail: workspace allocation failed";
    }
    s = n;
  }
  out = s;
  return nullptr;
}

// The split tail of tier 9: when the last round leaves rest <= G / 2 tiles for G SMs, each of them is split
// along K into parts = G / rest runs (at most 8, each of at least 8 K blocks), run side by side by
// rest * parts CTAs. Only where that round is a large share of the work: fewer than 8 full rounds. Returns
// the parts, or 0 for no split. Measured and dropped (BENCHMARKS.md, runs 22-29): a stream-K split (every
// CTA one run of the same length, across tile boundaries), whose CTAs work at different K offsets and lose
// the L2 reuse between neighbouring tiles; and a split of the last round at any number of rounds (8192^3).
static int split_parts(int tiles, int sms, int kb) {
  const int rest = tiles % sms;
  if (rest == 0 || tiles / sms >= 8) return 0;
  int parts = sms / rest;
  parts = parts < 8 ? parts : 8;
  parts = parts < kb / 8 ? parts : kb / 8;
  return parts >= 2 ? parts : 0;
}

static int num_sms() {
  static int sms = 0;
  if (!sms) {
    int dev;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  }
  return sms;
}

template <bool EPI_TMA, bool OVERLAP, int STAGES, bool SB_ROW = false, typename OutT = __nv_bfloat16,
          bool SA_T = false, bool SK = false>
static const char* launch_t2(const uint8_t* A, const float* SA, const uint8_t* B, const float* SB,
                             OutT* C, int M, int N, int K, cudaStream_t stream, int b_rows = -1,
                             const int* groups = nullptr, const int* kg = nullptr, int n_kg = 0, int c_rows = -1,
                             int sa_ld = 0) {
  auto kern = t2::gemm<EPI_TMA, OVERLAP, STAGES, SB_ROW, OutT, SA_T, SK>;
  constexpr int smem = t2::smem_bytes(EPI_TMA, STAGES, SB_ROW, SA_T);
  static_assert(smem <= 227 * 1024, "more shared memory than an H100 SM gives one block");
  static bool attr = false;  // once per build (and per process: the device current at first use)
  if (!attr) {
    cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    attr = true;
  }
  const int sms = num_sms();
  CUtensorMap ma, mb, mc = {};
  if (!make_map(&ma, A, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, M, K, BM, BK) ||
      !make_map(&mb, B, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, b_rows < 0 ? N : b_rows, K, BN, BK) ||
      (EPI_TMA && !make_map(&mc, C, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, c_rows < 0 ? M : c_rows, N, 64, 64)))
    return "cuTensorMapEncodeTiled failed";
  int tiles = (kg ? n_kg : 1) * ((M + BM - 1) / BM) * ((N + BN - 1) / BN);
  SkSpace sks;
  const int n_parts = SK ? split_parts(tiles, sms, K / BK) : 0;
  if (n_parts > 1)
    if (const char* err = sk_space(sms, stream, sks)) return err;
  const int grid = tiles < sms ? (n_parts > 1 ? tiles * n_parts : tiles) : sms;
  kern<<<grid, t2::THREADS, smem, stream>>>(ma, mb, mc, SA, SB, C, M, N, K, groups, kg, n_kg, sa_ld, sks.ws,
                                            sks.flags, n_parts);
  return nullptr;
}

// Tier 5+: a 1-D grid of clusters of CM x CN CTAs, no more clusters than fit on the GPU at once (a GPC's SM
// count need not be a multiple of the cluster size), each walking the tile groups of the banded order.
template <int CM, int CN>
static const char* launch_t5(const uint8_t* A, const float* SA, const uint8_t* B, const float* SB,
                             __nv_bfloat16* C, int M, int N, int K, cudaStream_t stream) {
  constexpr int CS = CM * CN;
  auto kern = t5::gemm<CM, CN>;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = CS;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(t2::THREADS);
  cfg.dynamicSmemBytes = t5::SMEM;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  static int max_clusters = 0;
  if (!max_clusters) {
    cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, t5::SMEM);
    int dev, sms;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cfg.gridDim = dim3(sms / CS * CS);
    if (cudaOccupancyMaxActiveClusters(&max_clusters, kern, &cfg) != cudaSuccess || max_clusters <= 0) {
      cudaGetLastError();  // clear it: fall back to the SM count
      max_clusters = sms / CS;
    }
  }
  CUtensorMap ma, mb, mc;
  if (!make_map(&ma, A, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, M, K, BM / CN, BK) ||
      !make_map(&mb, B, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, N, K, BN / CM, BK) ||
      !make_map(&mc, C, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, M, N, 64, 64))
    return "cuTensorMapEncodeTiled failed";
  int groups = ((M + BM * CM - 1) / (BM * CM)) * ((N + BN * CN - 1) / (BN * CN));
  cfg.gridDim = dim3((groups < max_clusters ? groups : max_clusters) * CS);
  cudaError_t e = cudaLaunchKernelEx(&cfg, kern, ma, mb, mc, SA, SB, M, N, K);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

static const char* launch_t8(const uint8_t* A, const float* SA, const uint8_t* B, const float* SB,
                             __nv_bfloat16* C, int M, int N, int K, cudaStream_t stream) {
  static int sms = 0;
  if (!sms) {
    cudaFuncSetAttribute(t8::gemm, cudaFuncAttributeMaxDynamicSharedMemorySize, t8::SMEM);
    int dev;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  }
  CUtensorMap ma, mb, mc;
  if (!make_map(&ma, A, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, M, K, BM, BK) ||
      !make_map(&mb, B, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, N, K, t8::BN2, BK) ||
      !make_map(&mc, C, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, M, N, 64, 64))
    return "cuTensorMapEncodeTiled failed";
  int tiles = ((M + BM - 1) / BM) * ((N + t8::BN2 - 1) / t8::BN2);
  t8::gemm<<<tiles < sms ? tiles : sms, t2::THREADS, t8::SMEM, stream>>>(ma, mb, mc, SA, SB, M, N, K);
  return nullptr;
}

// Returns an error string, or nullptr on success.
static const char* launch(int tier, const uint8_t* A, const float* SA, const uint8_t* B, const float* SB,
                          __nv_bfloat16* C, int M, int N, int K, cudaStream_t stream, int sa_ld = 0) {
  // The TMA store needs 16-byte aligned output rows; otherwise tiers 3-8 fall back to tier 2's plain stores.
  // Tier 9 cannot (tier 2 reads row-major scales): the torch binding converts its scales and falls back itself.
  const bool no_tma_store = N % 8 != 0 || reinterpret_cast<uintptr_t>(C) % 16 != 0;
  if (tier == 9 && (no_tma_store || sa_ld % 4 != 0 || sa_ld < (M + BM - 1) / BM * BM))
    return "tier 9 needs N % 8 == 0, a 16-byte aligned output and M-major scales with ld >= M rounded up to 128";
  if (tier >= 3 && tier <= 8 && no_tma_store) tier = 2;
  const char* err = nullptr;
  if (tier == 1) {
    static bool attr = false;
    if (!attr) { cudaFuncSetAttribute(t1::gemm, cudaFuncAttributeMaxDynamicSharedMemorySize, t1::SMEM); attr = true; }
    dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM);
    t1::gemm<<<grid, t1::THREADS, t1::SMEM, stream>>>(A, SA, B, SB, C, M, N, K);
  } else if (tier == 2) {
    err = launch_t2<false, false, 6>(A, SA, B, SB, C, M, N, K, stream);
  } else if (tier == 3) {
    err = launch_t2<true, false, 6>(A, SA, B, SB, C, M, N, K, stream);
  } else if (tier == 4) {
    err = launch_t2<true, true, 6>(A, SA, B, SB, C, M, N, K, stream);
  } else if (tier == 5) {
    err = launch_t5<2, 1>(A, SA, B, SB, C, M, N, K, stream);
  } else if (tier == 6) {
    err = launch_t5<2, 2>(A, SA, B, SB, C, M, N, K, stream);
  } else if (tier == 7) {
    err = launch_t5<1, 2>(A, SA, B, SB, C, M, N, K, stream);
  } else if (tier == 8) {
    err = launch_t8(A, SA, B, SB, C, M, N, K, stream);
  } else if (tier == 9) {  // tier 4, A scales M-major (K/128 rows of sa_ld) and brought into each stage by bulk copy
    // Three builds: 6 stages when a tile has at most 4 K blocks (the ring then has room for all of the next
    // tile's blocks during this one's epilogue), the split tail where it pays (split_parts), else 5 stages
    // (BENCHMARKS.md, runs 20-27).
    const int tiles = ((M + BM - 1) / BM) * ((N + BN - 1) / BN), kb = K / BK;
    if (kb <= 4)
      err = launch_t2<true, true, 6, false, __nv_bfloat16, true>(A, SA, B, SB, C, M, N, K, stream, -1, nullptr,
                                                                 nullptr, 0, -1, sa_ld);
    else if (split_parts(tiles, num_sms(), kb))
      err = launch_t2<true, true, 5, false, __nv_bfloat16, true, true>(A, SA, B, SB, C, M, N, K, stream, -1,
                                                                       nullptr, nullptr, 0, -1, sa_ld);
    else
      err = launch_t2<true, true, 5, false, __nv_bfloat16, true>(A, SA, B, SB, C, M, N, K, stream, -1, nullptr,
                                                                 nullptr, 0, -1, sa_ld);
  } else {
    return "unknown tier (1-9)";
  }
  if (err) return err;
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// Tier 4 with 1x128 scales on B too (wgrad), fp32 output through plain stores (no output tile in shared memory,
// so 6 stages fit next to the column scales). SB_T: (K/128, N rounded up to 128), zero-padded.
static const char* launch_1d1d(const uint8_t* A, const float* SA, const uint8_t* B, const float* SB_T,
                               float* C, int M, int N, int K, cudaStream_t stream) {
  const char* err = launch_t2<false, true, 6, true, float>(A, SA, B, SB_T, C, M, N, K, stream);
  if (err) return err;
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// The 1D1D GEMM once per group of K blocks (routed-expert wgrad): kg holds n_kg triples (expert, first K
// block, number of K blocks), all on the GPU; C is (experts * M, N) and M % 128 == 0. Each group must have at
// least one K block inside K (an empty group would wait forever for a stage); fp8.py passes busy experts only.
static const char* launch_1d1d_kgrouped(const uint8_t* A, const float* SA, const uint8_t* B, const float* SB_T,
                                        float* C, int M, int N, int K, const int* kg, int n_kg,
                                        int c_rows, cudaStream_t stream) {
  const char* err = launch_t2<false, true, 6, true, float>(A, SA, B, SB_T, C, M, N, K, stream, -1, nullptr, kg, n_kg,
                                                           c_rows);
  if (err) return err;
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// Tier 4 over experts (routed-expert Fprop/Dgrad). B: (E*N, K), SB: (E*ceil(N/128), K/128), M % 128 == 0.
static const char* launch_grouped(const uint8_t* A, const float* SA, const uint8_t* B, const float* SB,
                                  __nv_bfloat16* C, int M, int N, int K, int E, const int* groups,
                                  cudaStream_t stream) {
  const char* err = launch_t2<true, true, 6>(A, SA, B, SB, C, M, N, K, stream, E * N, groups);
  if (err) return err;
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
}  // namespace fp8g

#ifndef FP8_GEMM_NO_TORCH
// out (M, N) bf16 = a (M, K) e4m3 [a_scale (M, K/128) fp32] . b (N, K) e4m3 [b_scale (ceil(N/128), K/128)]^T
void gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out, int64_t tier) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && a_scale.is_cuda() && b_scale.is_cuda() && out.is_cuda(),
              "fp8_gemm: all tensors must be on the GPU");
  TORCH_CHECK(a.scalar_type() == at::kFloat8_e4m3fn && b.scalar_type() == at::kFloat8_e4m3fn,
              "fp8_gemm: a and b must be float8_e4m3fn");
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && b_scale.scalar_type() == at::kFloat,
              "fp8_gemm: scales must be float32");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16, "fp8_gemm: out must be bfloat16");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && b_scale.is_contiguous() && out.is_contiguous(),
              "fp8_gemm: tensors must be contiguous");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "fp8_gemm: a (M,K), b (N,K) expected");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0,
              "fp8_gemm: a and b must be 16-byte aligned (TMA)");
  const int M = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_CHECK(K > 0 && K % 128 == 0, "fp8_gemm: K must be a positive multiple of 128");
  TORCH_CHECK(a_scale.dim() == 2 && a_scale.size(0) == M && a_scale.size(1) == K / 128,
              "fp8_gemm: a_scale must be (M, K/128)");
  TORCH_CHECK(b_scale.size(0) == (N + 127) / 128 && b_scale.size(1) == K / 128,
              "fp8_gemm: b_scale must be (ceil(N/128), K/128)");
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "fp8_gemm: out must be (M, N)");
  if (M == 0 || N == 0) return;  // (an empty a_scale has no layout to check)
  int sa_ld = 0;
  if (tier == 9) {  // M-major A scales: a (M, K/128) view with strides (1, ld) of a (K/128, ld) buffer
    sa_ld = (int)a_scale.stride(1);
    const int64_t need = (int64_t)(K / 128 - 1) * sa_ld + (M + 127) / 128 * 128;  // floats the bulk copies read
    TORCH_CHECK(a_scale.stride(0) == 1 && sa_ld % 4 == 0 && sa_ld >= (M + 127) / 128 * 128 &&
                    reinterpret_cast<uintptr_t>(a_scale.data_ptr()) % 16 == 0 &&
                    (int64_t)a_scale.storage().nbytes() / 4 - a_scale.storage_offset() >= need,
                "fp8_gemm tier 9: a_scale must be M-major, strides (1, ld) with ld >= M rounded up to 128 and a "
                "multiple of 4 (fp8.mmajor_scales makes it)");
    if (N % 8 != 0 || reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 != 0) {  // no TMA store: tier 2's path
      a_scale = a_scale.contiguous();
      tier = 2;
      sa_ld = 0;
    }
  } else {
    TORCH_CHECK(a_scale.is_contiguous(), "fp8_gemm: a_scale must be contiguous");
  }
  const char* err = fp8g::launch((int)tier, reinterpret_cast<const uint8_t*>(a.data_ptr()),
                                 a_scale.data_ptr<float>(), reinterpret_cast<const uint8_t*>(b.data_ptr()),
                                 b_scale.data_ptr<float>(), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                                 M, N, K, c10::cuda::getCurrentCUDAStream(), sa_ld);
  TORCH_CHECK(err == nullptr, "fp8_gemm kernel launch failed: ", err ? err : "");
}

static void check_common(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                         const at::Tensor& b_scale, const at::Tensor& out, const char* name,
                         at::ScalarType out_type = at::kBFloat16) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && a_scale.is_cuda() && b_scale.is_cuda() && out.is_cuda(), name,
              ": all tensors must be on the GPU");
  TORCH_CHECK(a.scalar_type() == at::kFloat8_e4m3fn && b.scalar_type() == at::kFloat8_e4m3fn, name,
              ": a and b must be float8_e4m3fn");
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && b_scale.scalar_type() == at::kFloat, name,
              ": scales must be float32");
  TORCH_CHECK(out.scalar_type() == out_type, name, out_type == at::kFloat ? ": out must be float32"
                                                                         : ": out must be bfloat16");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a_scale.is_contiguous() && b_scale.is_contiguous() &&
                  out.is_contiguous(), name, ": tensors must be contiguous");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && a.size(1) > 0 && a.size(1) % 128 == 0, name,
              ": a (M, K), b (rows, K) with K a multiple of 128 expected");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 && out.dim() == 2 && out.size(1) % 8 == 0,
              name, ": a, b, out must be 16-byte aligned and out rows a multiple of 8 (TMA)");
  TORCH_CHECK(a_scale.dim() == 2 && a_scale.size(0) == a.size(0) && a_scale.size(1) == a.size(1) / 128, name,
              ": a_scale must be (M, K/128)");
}

// out (M, N) = a (M, K) [a_scale (M, K/128)] . b (N, K) [b_scale_t (K/128, N rounded up to 128), one scale
// per row of b per 128 of K, transposed and zero-padded]^T: the wgrad GEMM, both operands in 1x128 tiles,
// out float32.
void gemm_1d1d(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale_t, at::Tensor out) {
  check_common(a, a_scale, b, b_scale_t, out, "fp8_gemm_1d1d", at::kFloat);
  const int M = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_CHECK(b_scale_t.dim() == 2 && b_scale_t.size(0) == K / 128 && b_scale_t.size(1) == (N + 127) / 128 * 128,
              "fp8_gemm_1d1d: b_scale_t must be (K/128, N rounded up to 128)");
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "fp8_gemm_1d1d: out must be (M, N)");
  if (M == 0 || N == 0) return;
  const char* err = fp8g::launch_1d1d(reinterpret_cast<const uint8_t*>(a.data_ptr()), a_scale.data_ptr<float>(),
                                      reinterpret_cast<const uint8_t*>(b.data_ptr()), b_scale_t.data_ptr<float>(),
                                      out.data_ptr<float>(), M, N, K, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "fp8_gemm_1d1d kernel launch failed: ", err ? err : "");
}

// Routed-expert wgrad: out[e] (M, N) = sum over the K blocks [kb0, kb0 + nkb) of group (e, kb0, nkb) of the
// 1D1D product a . b^T (same layouts as gemm_1d1d); kg (G, 3) int32 on the GPU; out (E*M, N) float32,
// M % 128 == 0.
// Rows of out that belong to experts named by no group are left as they are (the caller zero-fills).
void gemm_1d1d_kgrouped(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale_t, at::Tensor kg,
                        at::Tensor out) {
  check_common(a, a_scale, b, b_scale_t, out, "fp8_gemm_1d1d_kgrouped", at::kFloat);
  const int M = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_CHECK(b_scale_t.dim() == 2 && b_scale_t.size(0) == K / 128 && b_scale_t.size(1) == (N + 127) / 128 * 128,
              "fp8_gemm_1d1d_kgrouped: b_scale_t must be (K/128, N rounded up to 128)");
  TORCH_CHECK(M > 0 && M % 128 == 0 && out.size(0) % M == 0 && out.size(1) == N,
              "fp8_gemm_1d1d_kgrouped: M must be a multiple of 128 and out (E*M, N)");
  TORCH_CHECK(kg.is_cuda() && kg.scalar_type() == at::kInt && kg.is_contiguous() && kg.dim() == 2 && kg.size(1) == 3,
              "fp8_gemm_1d1d_kgrouped: kg must be a contiguous (G, 3) int32 CUDA tensor");
  if (M == 0 || N == 0 || kg.size(0) == 0) return;
  const char* err = fp8g::launch_1d1d_kgrouped(
      reinterpret_cast<const uint8_t*>(a.data_ptr()), a_scale.data_ptr<float>(),
      reinterpret_cast<const uint8_t*>(b.data_ptr()), b_scale_t.data_ptr<float>(),
      out.data_ptr<float>(), M, N, K, kg.data_ptr<int>(), kg.size(0), out.size(0),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "fp8_gemm_1d1d_kgrouped kernel launch failed: ", err ? err : "");
}

// Routed experts: out (M, N) = a (M, K) . b[e] (N, K)^T for the rows of expert e, where a's rows are sorted by
// expert in segments of whole 128-row tiles, groups (M/128,) int32 names the expert of each tile, b stacks the
// E experts' weights as (E*N, K) and b_scale their 128x128 block scales as (E*N/128, K/128); N % 128 == 0.
void gemm_grouped(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor groups,
                  at::Tensor out, int64_t n_experts) {
  check_common(a, a_scale, b, b_scale, out, "fp8_gemm_grouped");
  const int M = a.size(0), K = a.size(1), E = n_experts;
  TORCH_CHECK(E > 0 && b.size(0) % E == 0 && (b.size(0) / E) % 128 == 0,
              "fp8_gemm_grouped: b must be (E*N, K) with N a multiple of 128");
  const int N = b.size(0) / E;
  TORCH_CHECK(M % 128 == 0, "fp8_gemm_grouped: M must be a multiple of 128 (segments padded to whole tiles)");
  TORCH_CHECK(b_scale.dim() == 2 && b_scale.size(0) == E * N / 128 && b_scale.size(1) == K / 128,
              "fp8_gemm_grouped: b_scale must be (E*N/128, K/128)");
  TORCH_CHECK(groups.is_cuda() && groups.scalar_type() == at::kInt && groups.is_contiguous() &&
                  groups.dim() == 1 && groups.size(0) == M / 128,
              "fp8_gemm_grouped: groups must be a contiguous int32 CUDA tensor of M/128 expert ids");
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "fp8_gemm_grouped: out must be (M, N)");
  if (M == 0) return;
  const char* err = fp8g::launch_grouped(reinterpret_cast<const uint8_t*>(a.data_ptr()), a_scale.data_ptr<float>(),
                                         reinterpret_cast<const uint8_t*>(b.data_ptr()), b_scale.data_ptr<float>(),
                                         reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), M, N, K, E,
                                         groups.data_ptr<int>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "fp8_gemm_grouped kernel launch failed: ", err ? err : "");
}

// fp8_quant.cu, built into the same extension
void quant_rows(at::Tensor x, at::Tensor q, at::Tensor s, int64_t ld);
void quant_cols(at::Tensor x, at::Tensor q, at::Tensor s);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm,
        "fine-grained FP8 GEMM; tier 1: mma.sync, 2: TMA + wgmma + warp specialization, 3: + TMA-store epilogue, "
        "4: + promotion overlapped with the next wgmma, 5-7: tier 4 in clusters with TMA multicast (2x1 B, 2x2 A+B, "
        "1x2 A), 8: 128x256 tile, 9: tier 4 with M-major A scales brought in by the producer (fp8.mmajor_scales)");
  m.def("gemm_1d1d", &gemm_1d1d, "tier 4 with 1x128 scales on both operands (wgrad)");
  m.def("gemm_1d1d_kgrouped", &gemm_1d1d_kgrouped, "gemm_1d1d over groups of K blocks, one output per expert (wgrad)");
  m.def("gemm_grouped", &gemm_grouped, "tier 4 over experts: each 128-row tile of a uses its expert's weight");
  m.def("quant_rows", &quant_rows,
        "fused 1x128 quantization along the last dim, scales row- or M-major (fp8_quant.cu)");
  m.def("quant_cols", &quant_cols, "fused transpose + 1x128 quantization of x^T, rows padded to 128 (fp8_quant.cu)");
}
#endif
