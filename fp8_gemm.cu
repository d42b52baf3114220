// Fine-grained FP8 GEMM for Hopper (sm_90a): the kernels FP8 training runs, built by fp8.py through
// torch.utils.cpp_extension (with fp8_quant.cu, the fused quantizers).
//
//   C[M, N] = sum over 128-wide K blocks kb of  sa[m, kb] * sb[n, kb] * (A[m, kb-block] . B[n, kb-block])
//
// A (M x K) and B (N x K) are e4m3 and K-major ("NT", the layout of DeepSeek-V3's kernel.py and DeepGEMM). A has
// one fp32 scale per row per 128 of K (1x128 tiles); B one per 128x128 block (weights) or, for Wgrad, one per
// row per 128 of K too ("1D1D"). The tensor cores cannot apply scales that change along K, so each 128-wide K
// block is summed on its own and promoted: the report's FP32 promotion with N_C = 128 (report §3.3).
//
// One output tile's life (128 x 128, one CTA of 384 threads: a producer warpgroup and two math warpgroups):
//  1. TMA loads. The producer's one thread waits until a pipeline stage is free (`empty` barrier), then asks
//     the tensor-memory accelerator for the tile's A slice (128 rows x 128 bytes) and B slice, written into
//     shared memory with a 128-byte swizzle; the stage's `full` barrier counts the bytes as they land. With
//     M-major A scales, a plain bulk copy brings the K block's 128 row scales into the same stage.
//  2. WGMMA over a 128-wide K slice. Each math warpgroup owns 64 rows of the tile; once the stage is full it
//     issues four wgmma.m64n128k32 (K = 4 x 32 = 128) into a fresh fp32 accumulator of 64 registers.
//  3. Promotion with the two scales. The CUDA cores multiply that partial sum by sa[row] * sb and add it into
//     a second set of 64 fp32 registers (`fin`), then release the stage. Two accumulators alternate: the
//     wgmmas of block kb + 1 run on the tensor cores while block kb is promoted, so the promotion is hidden.
//  4. Epilogue. After the last K block `fin` (rounded to bf16, or fp32 for Wgrad) is written through swizzled
//     shared memory and stored by an asynchronous TMA store: the math warps start the next tile at once (the
//     Wgrad kernels that add into C first issue the next tile's first K block, which runs through their store). Rows
//     TMA cannot store (bf16 outputs with N % 8 != 0) go out with plain stores instead. The fp32 Wgrad outputs
//     can also be accumulated (C += the tile: a weight's gradient summed over micro-batches where it lies) by
//     a TMA reduce-add, which L2 carries out: the math warps never wait to read C.
// The grid is persistent: one CTA per SM walks its tiles in a banded order (8 N tiles wide) that keeps the B
// slices of neighbouring CTAs in L2.
//
// The kernels (enum Kernel) differ in how tiles map onto the operands (GemmType, as in DeepGEMM's scheduler),
// where the scales come from and how the output leaves:
//   kFprop         dense; A scales M-major, copied into each stage; bf16 out by TMA store  (FP8Linear Fprop, Dgrad)
//   kFpropPlain    the same with plain stores, for outputs TMA cannot store (N % 8 != 0, unaligned)
//   kExperts       M-grouped: each 128-row tile of A belongs to one expert, whose weight of the stacked B it
//                  uses (routed experts' Fprop, Dgrad), or to none (-1: skipped); A scales row-major, read
//                  from global memory
//   kWgrad         dense 1D1D: B's per-row scales copied into each stage; fp32 out by TMA store, or added into
//                  C by TMA reduce-add (FP8Linear Wgrad)
//   kExpertsWgrad  K-grouped 1D1D: per expert, the sum over its own tokens' K blocks, zeros for an idle expert
//                  (routed experts' Wgrad); out as kWgrad
// The shape heuristics (pipeline depth, split of the last round of tiles) are in one host function, schedule().
// How this kernel grew from a plain mma.sync GEMM, with the measured steps, is in fp8_teaching/.

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <stdint.h>

#include <type_traits>

// Light headers (not torch/extension.h): the JIT build is several times faster.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

namespace fp8g {

constexpr int BM = 128, BN = 128, BK = 128;  // tile; BK = N_C, the scale block along K
constexpr int THREADS = 384, MATH_WARPS = 8;
constexpr int TILE_BYTES = BM * BK;          // one stage's A (or B) slice: 16 KiB
constexpr int SCALES_BYTES = 128 * 4;        // one K block's 128 row scales (of A, or of B for Wgrad)
constexpr int GROUP_N = 8;                   // tile order: bands of 8 N tiles, M inner

enum class GemmType { kDense, kMGrouped, kKGrouped };
enum class Kernel { kFprop, kFpropPlain, kExperts, kWgrad, kExpertsWgrad };  // the kernels of the header

// What each kernel is made of, fixed at compile time: how tiles map onto the operands, whether A's scales ride in
// the pipeline stages (M-major) or are read from global memory, whether B has one scale per row (1D1D) or per
// 128x128 block, whether the output leaves by TMA store, and the output type.
template <Kernel K>
struct Traits {
  static constexpr GemmType type = K == Kernel::kExperts        ? GemmType::kMGrouped
                                   : K == Kernel::kExpertsWgrad ? GemmType::kKGrouped
                                                                : GemmType::kDense;
  static constexpr bool a_scales_in_stage = K == Kernel::kFprop || K == Kernel::kFpropPlain;  // M-major A scales
  static constexpr bool b_row_scales = K == Kernel::kWgrad || K == Kernel::kExpertsWgrad;     // 1D1D
  static constexpr bool tma_store = K != Kernel::kFpropPlain;
  using Out = std::conditional_t<b_row_scales, float, __nv_bfloat16>;  // Wgrad stays fp32, as in the report
};

// Shared memory: the stages (A and B slices, then the scales they carry), the output tile, the barriers. The
// output tile (2 math warpgroups x 64 rows x 128 columns: 32 KiB bf16, 64 KiB fp32) leaves in boxes of 64 rows x
// 128 bytes through a buffer of what the stages leave room for: the whole tile, or 1 / c_rounds of it sent in
// c_rounds rounds (6 stages: 2 rounds for the M-major kFprop, 4 for the fp32 Wgrad kernels; 16 KiB either way;
// 4 stages: the whole 64 KiB fp32 tile in one round, as the Wgrad kernels that add into C run).
constexpr int SMEM_LIMIT = 227 * 1024;  // what a Hopper SM gives one block
template <Kernel K, int STAGES>
struct Layout {
  using T = Traits<K>;
  static constexpr int stage_scale_bytes =
      (T::b_row_scales ? SCALES_BYTES : 0) + (T::a_scales_in_stage ? SCALES_BYTES : 0);
  static constexpr int other_bytes = STAGES * (2 * TILE_BYTES + stage_scale_bytes) + 2 * STAGES * 8 + 1024;
  static constexpr int tile_out_bytes = 2 * 64 * BN * (int)sizeof(typename T::Out);
  static constexpr int c_rounds = !T::tma_store                                     ? 1
                                  : other_bytes + tile_out_bytes <= SMEM_LIMIT     ? 1
                                  : other_bytes + tile_out_bytes / 2 <= SMEM_LIMIT ? 2
                                                                                   : 4;
  static constexpr int c_bytes = T::tma_store ? tile_out_bytes / c_rounds : 0;
  static constexpr int bytes = other_bytes + c_bytes;
  static_assert(bytes <= SMEM_LIMIT, "more shared memory than a Hopper SM gives one block");
};

// Everything but the tensor maps. groups: kMGrouped, the expert of each 128-row tile of A (-1: no expert, the
// tile is skipped); kKGrouped, n_groups triples (expert, first K block, number of K blocks; 0 blocks: an idle
// expert, whose tiles are all zeros). split_*: the split tail of kFprop (schedule()). accumulate (the fp32
// Wgrad variants): C += the product instead of C = it (a weight's gradient summed over micro-batches in place).
template <typename OutT>
struct Problem {
  const float* sa;
  const float* sb;
  OutT* c;
  int m, n, k;
  const int* groups;
  int n_groups;
  int sa_ld;  // M-major A scales: (K/128, sa_ld) in memory
  float* split_ws;
  unsigned* split_flags;
  int split_parts;
  int accumulate;
};

// ------------------------------------------------------------ PTX wrappers
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One float from shared memory with ld.shared (a plain load through a generic pointer compiles to a generic LD).
__device__ __forceinline__ float lds(const float* p) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(smem_u32(p)));
  return v;
}

// Two adjacent bf16 outputs of one row (kFpropPlain): one 4-byte store when both are in range and aligned.
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

__device__ __forceinline__ void mbar_init(uint64_t* b, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
// A math warp hands a stage back to the producer after reading the stage's B column scales with ld.shared (the
// generic proxy). The next bulk load into the stage writes through the async proxy, which the barrier alone does
// not order after those reads: without the proxy fence a read still queued behind the epilogue's global loads
// (when the Wgrad epilogue still read C with them) returned the next block's scales (8 columns of one warp's rows
// wrong, seen on the H200). The fence stays: the barrier still does not order the two proxies.
__device__ __forceinline__ void release_stage(uint64_t* b, int lane) {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncwarp();
  if (lane == 0) mbar_arrive(b);
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(smem_u32(b)), "r"(parity) : "memory");
  }
}
// A box of a tensor map (k, row) into shared memory, counted on `bar`.
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
// The same box added into global memory (C += box, element by element in L2; fp32 here).
__device__ __forceinline__ void tma_reduce_add(const CUtensorMap* map, const void* src, int col, int row) {
  asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3}], [%1];\n"
               ::"l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(src)), "r"(col), "r"(row) : "memory");
}
__device__ __forceinline__ void named_barrier(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }

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

// ------------------------------------------------------------ WGMMA and promotion
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

template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

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

// 1D1D promotion (Wgrad: B too has one scale per row, i.e. per output column, per K block):
// fin += (sa[row] * sb[col]) * acc, the 128 column scales of this K block read from shared memory.
__device__ __forceinline__ void promote_cols(float* fin, float* acc, float s0, float s1, const float* sbs, int q) {
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    float2 b;  // cols 8j + 2q + {0, 1}
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(b.x), "=f"(b.y) : "r"(smem_u32(sbs + 8 * j + 2 * q)));
    fin[4 * j + 0] += (s0 * b.x) * acc[4 * j + 0];
    fin[4 * j + 1] += (s0 * b.y) * acc[4 * j + 1];
    fin[4 * j + 2] += (s1 * b.x) * acc[4 * j + 2];
    fin[4 * j + 3] += (s1 * b.y) * acc[4 * j + 3];
  }
}

// The K loop with two accumulators: block 0 is already issued into acc0; step(cur, nxt, kb, last) starts block
// kb + 1 into `nxt` (unless last), waits for block kb in `cur` and promotes it. Unrolled by 2 so that acc0 and
// acc1 stay registers.
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

// Tile t of the banded order: its top-left corner.
__device__ __forceinline__ void tile_coords(int t, int num_m, int num_n, int& m0, int& n0) {
  int band = t / (GROUP_N * num_m), first_n = band * GROUP_N;
  int width = min(num_n - first_n, GROUP_N), local = t - band * GROUP_N * num_m;
  m0 = (local / width) * BM;
  n0 = (first_n + local % width) * BN;
}

// ------------------------------------------------------------ the kernel
template <Kernel KIND, int STAGES, bool SPLIT_TAIL, bool ACC>
__global__ void __launch_bounds__(THREADS, 1) gemm_kernel(const __grid_constant__ CUtensorMap tmA,
                                                          const __grid_constant__ CUtensorMap tmB,
                                                          const __grid_constant__ CUtensorMap tmC,
                                                          const Problem<typename Traits<KIND>::Out> p) {
  using T = Traits<KIND>;
  using L = Layout<KIND, STAGES>;
  using OutT = typename T::Out;
  static_assert(!SPLIT_TAIL || KIND == Kernel::kFprop, "the split tail is built for kFprop");
  static_assert(!ACC || Traits<KIND>::b_row_scales, "C += the tile is built for the fp32 Wgrad kernels");
  constexpr bool MGROUPED = T::type == GemmType::kMGrouped, KGROUPED = T::type == GemmType::kKGrouped;
  const float* __restrict__ SA = p.sa;
  const float* __restrict__ SB = p.sb;
  const int* __restrict__ GROUPS = p.groups;
  const int M = p.m, N = p.n, K = p.k;
  extern __shared__ uint8_t smem_raw[];
  // 128B-swizzled TMA destinations and wgmma operands want 1024-byte aligned tiles.
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* sA = smem;                                          // [STAGES][128 rows][128 B]
  uint8_t* sB = smem + STAGES * TILE_BYTES;                    // [STAGES][128 rows][128 B]
  uint8_t* sC = smem + 2 * STAGES * TILE_BYTES;                // tma_store: [2 math wg][boxes][64 rows][128 B]
  float* sSB = reinterpret_cast<float*>(sC + L::c_bytes);      // b_row_scales: [STAGES][128]
  float* sSA = sSB + (T::b_row_scales ? STAGES * BN : 0);      // a_scales_in_stage: [STAGES][128]
  uint64_t* full = reinterpret_cast<uint64_t*>(sSA + (T::a_scales_in_stage ? STAGES * BM : 0));
  uint64_t* empty = full + STAGES;                             // math warps done reading
  const int Kb = K / BK, num_m = (M + BM - 1) / BM, num_n = (N + BN - 1) / BN;
  const int tiles = (KGROUPED ? p.n_groups : 1) * num_m * num_n;
  const int n_pad = num_n * BN;  // b_row_scales: row length of the transposed column scales
  // Tile t: its coordinates, its K blocks [kb0, kb0 + nkb) and the row of C where it is stored. A grouped tile
  // with no K blocks (M-grouped: a tile of group -1, the unused tail of the tile layout; K-grouped: an idle
  // expert) is skipped, by the producer and the math warps alike: neither touches the ring for it, so their
  // stages and barrier phases stay in step. M-grouped, nothing is written (those rows of C are never read);
  // K-grouped, the math warps store the tile's zeros (or, accumulating, leave C as it is).
  auto tile = [&](int t, int& m0, int& n0, int& kb0, int& nkb, int& c_row) {
    const int g = KGROUPED ? t / (num_m * num_n) : 0;
    tile_coords(t - g * num_m * num_n, num_m, num_n, m0, n0);
    kb0 = KGROUPED ? GROUPS[3 * g + 1] : 0;
    nkb = KGROUPED ? GROUPS[3 * g + 2] : MGROUPED && GROUPS[m0 / BM] < 0 ? 0 : Kb;
    c_row = (KGROUPED ? GROUPS[3 * g] * M : 0) + m0;
  };
  // The split tail (split_parts > 1). Of the tiles left after the last full round (rest <= G / 2 of them), each
  // is split along K into `parts` runs of K blocks, run side by side by `parts` neighbouring CTAs: CTA
  // b < rest * parts takes run b % parts of tile dp_end + b / parts. Run 0's CTA owns the tile: the others
  // write their fp32 partial sums to their slot of split_ws and raise their flag; the owner waits for them,
  // adds them, stores the tile and lowers the flags for the next launch.
  // The split run is computed once and made warp-uniform by a shuffle (all threads, before the roles split):
  // the producer's per-block code must stay in uniform registers, or its issue slows the whole pipeline.
  const int parts = p.split_parts;
  const bool sk = SPLIT_TAIL && parts > 1;
  const int G = gridDim.x;
  const int dp_end = sk ? tiles / G * G : tiles;  // tiles [0, dp_end): one per CTA per round
  int sp_t = -1, sp_k0 = 0, sp_nk = 0;           // this CTA's split run: tile, first K block, K blocks
  if (sk && (int)blockIdx.x < (tiles - dp_end) * parts) {
    const int part = blockIdx.x % parts;
    sp_t = dp_end + blockIdx.x / parts;
    sp_k0 = part * Kb / parts;
    sp_nk = (part + 1) * Kb / parts - sp_k0;
  }
  sp_t = __shfl_sync(0xffffffff, sp_t, 0);
  sp_k0 = __shfl_sync(0xffffffff, sp_k0, 0);
  sp_nk = __shfl_sync(0xffffffff, sp_nk, 0);
  // The math warps' work in order: tiles blockIdx.x, + G, ... below dp_end, then the split run, if any (K blocks
  // [sp_k0, sp_k0 + sp_nk) of tile sp_t); fn(t, kb0, nkb) with nkb < 0 for a whole tile. One call site, so the
  // per-tile code (the K loop, the epilogue) is inlined once.
  auto each_work = [&](auto&& fn) {
    bool split_left = SPLIT_TAIL && sp_t >= 0;
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

  if (wg == 0) {  // ---------------- producer warpgroup: one thread issues all loads (step 1) ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmA)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmB)) : "memory");
      uint32_t it = 0;
      // K blocks [kb0, kb0 + nkb) of tile t (a split run), or the tile's own (nkb < 0)
      auto load_tile = [&](int t, int kb0_, int nkb_) {
        int m0, n0, kb0, nkb, c_row;
        tile(t, m0, n0, kb0, nkb, c_row);
        if (nkb_ >= 0) kb0 = kb0_, nkb = nkb_;
        if ((MGROUPED || KGROUPED) && nkb == 0) return;  // a skipped tile (see tile())
        const int b_row = MGROUPED ? GROUPS[m0 / BM] * N + n0 : n0;  // row of B where this tile's columns start
        for (int kb = kb0; kb < kb0 + nkb; ++kb, ++it) {
          int s = it % STAGES;
          mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);  // first pass: a fresh barrier passes parity 1
          // rows past M/N are zero-filled, still counted
          mbar_expect_tx(&full[s], 2 * TILE_BYTES + L::stage_scale_bytes);
          tma_load(sA + s * TILE_BYTES, &tmA, &full[s], kb * BK, m0);
          tma_load(sB + s * TILE_BYTES, &tmB, &full[s], kb * BK, b_row);
          if constexpr (T::b_row_scales) bulk_load(sSB + s * BN, SB + (size_t)kb * n_pad + n0, SCALES_BYTES, &full[s]);
          if constexpr (T::a_scales_in_stage)
            bulk_load(sSA + s * BM, SA + (size_t)kb * p.sa_ld + m0, SCALES_BYTES, &full[s]);
        }
      };
      // Not each_work: inside its loop the producer's coordinates leave the uniform registers. This code is
      // small, so two call sites cost little.
      for (int t = blockIdx.x; t < dp_end; t += G) load_tile(t, 0, -1);
      if (SPLIT_TAIL && sp_t >= 0) load_tile(sp_t, sp_k0, sp_nk);
    }
  } else {  // ---------------- math warpgroups: rows [64*(wg-1), 64*wg) of each tile (steps 2-4) ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int mw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int rw = warp * 16 + (lane >> 2);  // this thread's first row in the warpgroup's 64 (+8 the second)
    const bool leader = (threadIdx.x & 127) == 0;
    // The ring position of the next K block to consume: its stage and its full barrier's parity, which flips
    // each time the ring wraps (two counters: `it % STAGES` would cost a multiply-shift at every use).
    int st = 0;
    uint32_t ph = 0;
    auto advance = [](int& s, uint32_t& ph_) {
      if (++s == STAGES) { s = 0; ph_ ^= 1; }
    };
    float acc0[64], acc1[64], fin[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc0[i] = acc1[i] = 0.f;
    auto a_of = [&](int s) { return sA + s * TILE_BYTES + mw * 64 * BK; };
    auto b_of = [&](int s) { return sB + s * TILE_BYTES; };
    // One tile's work: where it goes in C, which K blocks it sums, and where this thread's scales start: its
    // two rows of A and B's block row (the expert's own blocks when M-grouped). Rows past M read row M - 1's
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
      w.pb = SB + (size_t)((MGROUPED ? GROUPS[w.m0 / BM] * num_n : 0) + w.n0 / 128) * Kb + kb0;
      return w;
    };
    // The scales of block kb of a tile from global memory (b_row_scales: B's is 1 here, its column scales
    // come in promote_cols; a_scales_in_stage: A's come from the stage).
    float na0, na1, nb;
    auto load_scales = [&](const Work& w, int kb) {
      nb = T::b_row_scales ? 1.f : w.pb[kb];
      if constexpr (!T::a_scales_in_stage) {
        na0 = w.pa0[kb];
        na1 = w.pa1[kb];
      }
    };
    auto store_tile = [&](const Work& w) {  // step 4
      if constexpr (T::tma_store) {
        // Boxes of 64 rows x 128 bytes (64 bf16 or 32 fp32 columns) with TMA's 128-byte swizzle: 16-byte chunk c
        // of row r lies at chunk c ^ (r % 8), so that a warp's 8 rows spread over all 32 banks (bf16: each bank
        // once; fp32, 256 bytes a warp: each bank twice, the two wavefronts such a store needs anyway).
        constexpr int OB = (int)sizeof(OutT), BOX_COLS = 128 / OB, BOXES = BN / BOX_COLS / L::c_rounds;
        constexpr int JS = 16 / L::c_rounds;  // register groups j (columns 8j..8j+7) per round
        uint8_t* cbuf = sC + mw * (L::c_bytes / 2);
#pragma unroll
        for (int h = 0; h < L::c_rounds; ++h) {
          if (leader) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // the last store read it
          named_barrier(1 + mw);
#pragma unroll
          for (int jj = 0; jj < JS; ++jj) {  // this thread's cols 8j + 2(lane%4) + {0, 1}: byte OB * that in the row
            const int j = h * JS + jj, byte = OB * (8 * j + 2 * (lane & 3)) % 128;
            const int off = (jj * 8 * OB / 128) * 8192 + rw * 128 + (((byte >> 4) ^ (rw & 7)) << 4) + (byte & 15);
            if constexpr (std::is_same_v<OutT, float>) {
              *reinterpret_cast<float2*>(cbuf + off) = make_float2(fin[4 * j + 0], fin[4 * j + 1]);
              *reinterpret_cast<float2*>(cbuf + off + 8 * 128) = make_float2(fin[4 * j + 2], fin[4 * j + 3]);
            } else {
              *reinterpret_cast<__nv_bfloat162*>(cbuf + off) = __floats2bfloat162_rn(fin[4 * j + 0], fin[4 * j + 1]);
              *reinterpret_cast<__nv_bfloat162*>(cbuf + off + 8 * 128) =
                  __floats2bfloat162_rn(fin[4 * j + 2], fin[4 * j + 3]);
            }
          }
          asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // make the stores visible to TMA
          named_barrier(1 + mw);
          if (leader) {  // rows past M and columns past N are clipped by TMA
#pragma unroll
            for (int b = 0; b < BOXES; ++b) {
              const int col = w.n0 + BOX_COLS * (h * BOXES + b), row = w.c_row + mw * 64;
              if constexpr (ACC) tma_reduce_add(&tmC, cbuf + b * 8192, col, row);
              else tma_store(&tmC, cbuf + b * 8192, col, row);
            }
            asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
          }
        }
      } else {  // kFpropPlain
        const int r0 = w.m0 + mw * 64 + rw, r1 = r0 + 8;
#pragma unroll
        for (int j = 0; j < 16; ++j) {  // register 4j+{0,1} -> (row r0, cols 8j + 2(lane%4) + {0,1}); 4j+{2,3} -> r1
          int col = w.n0 + 8 * j + 2 * (lane & 3);
          store_pair(p.c, M, N, r0, col, fin[4 * j + 0], fin[4 * j + 1]);
          store_pair(p.c, M, N, r1, col, fin[4 * j + 2], fin[4 * j + 3]);
        }
      }
    };
    // The Wgrad kernels that add into C (ACC) store a whole tile only once the next tile's first K block is
    // issued (`prev`, `pending`): the tensor cores run that block through the epilogue's TMA reduce-add instead
    // of idling (H200, v3-layers' shapes: 1.03x the K-grouped kernel, 1.07-1.09x the dense one, with 6 stages and
    // four rounds of stores). The others store at once: deferred, the same kernels writing a fresh C ran ~6%
    // slower and the Fprop kernel ~1-3%. Where a block is issued or not (a skipped tile), the two paths are kept
    // apart: a store of `fin` on a path that merges with one where a WGMMA is in flight made ptxas serialize every
    // WGMMA (its warning C7514), and the grouped kernels 10-22% slower.
    constexpr bool DEFER = ACC;
    Work prev;
    bool pending = false;
    auto fresh_fin = [&]() {  // the last tile stored, if it waits; fin zeroed for the next sum
      if (DEFER && pending) store_tile(prev);
      pending = false;
#pragma unroll
      for (int i = 0; i < 64; ++i) fin[i] = 0.f;
    };
    // Each tile (t, a split run's K blocks, or nkb < 0: all of them): its K loop, then its epilogue.
    auto run_tile = [&](int t, int kb0_, int nkb_) {
      const Work w = work_of(t, kb0_, nkb_);
      if ((MGROUPED || KGROUPED) && w.nkb == 0) {  // a skipped tile, as the producer skips it (see tile())
        fresh_fin();
        if (KGROUPED && !ACC) store_tile(w);  // an idle expert's gradient: zeros
        return;
      }
      load_scales(w, 0);
      mbar_wait(&full[st], ph);
      issue_block(acc0, a_of(st), b_of(st));  // block 0 (step 2), then the last tile's epilogue behind it
      fresh_fin();
      // Step kb: start block kb + 1 into `nxt` (step 2), wait for block kb (in `cur`) only, release its stage
      // and promote it (step 3). Scales from global memory are loaded one step ahead, so that their latency
      // hides behind a whole block of MMAs rather than stalling the promotion.
      auto step = [&](float* cur, float* nxt, int kb, bool last) {
        if constexpr (T::a_scales_in_stage) {  // this block's A scales came with its stage, not released yet
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
        if constexpr (T::b_row_scales) {  // the stage also holds this block's column scales: release it after
          promote_cols(fin, cur, s0, s1, sSB + st * BN, lane & 3);
          release_stage(&empty[st], lane);
        } else {  // A's scales were read at the top of the step, ahead of the WGMMA wait, and no wrong block has
                  // been seen here; the fence cost up to 10% on the long-K Fprop shape, so it is left out
          if (lane == 0) mbar_arrive(&empty[st]);
          promote(fin, cur, s0, s1);
        }
        st = sn;
        ph = pn;
      };
      k_loop_2acc(acc0, acc1, w.nkb, step);
      if (nkb_ < 0) {
        if (DEFER) {  // stored behind the next tile's first block, or after the last tile
          prev = w;
          pending = true;
        } else {
          store_tile(w);
        }
      } else if (w.kb0 > 0) {  // a later part of a split tile: hand this warpgroup's partial sums to the owner
        float* ws = p.split_ws + (size_t)(blockIdx.x * 2 + mw) * 8192 + (threadIdx.x & 127) * 4;  // [16][128][4]
#pragma unroll
        for (int j = 0; j < 16; ++j)
          __stcg(reinterpret_cast<float4*>(ws + 512 * j),
                 make_float4(fin[4 * j], fin[4 * j + 1], fin[4 * j + 2], fin[4 * j + 3]));
        named_barrier(1 + mw);
        if (leader) flag_raise(&p.split_flags[blockIdx.x * 2 + mw]);
      } else {  // the owner: wait for the CTAs that ran the rest of the tile, add their sums, store the tile
        if (leader)
          for (int c = blockIdx.x + 1; c < (int)blockIdx.x + parts; ++c) {
            flag_wait(&p.split_flags[c * 2 + mw]);
            p.split_flags[c * 2 + mw] = 0;  // lowered for the next launch (each flag has one reader per launch)
          }
        named_barrier(1 + mw);
        for (int c = blockIdx.x + 1; c < (int)blockIdx.x + parts; ++c) {
          const float* ws = p.split_ws + (size_t)(c * 2 + mw) * 8192 + (threadIdx.x & 127) * 4;
#pragma unroll
          for (int j = 0; j < 16; ++j) {
            const float4 v = __ldcg(reinterpret_cast<const float4*>(ws + 512 * j));
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
    if (DEFER && pending) store_tile(prev);
    if (T::tma_store && leader) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");  // before smem goes
  }
}

// ------------------------------------------------------------ host side
static int num_sms() {
  static int sms = 0;
  if (!sms) {
    int dev;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  }
  return sms;
}

// 2-D tensor map over a row-major (rows x cols) matrix; box of box_rows x box_cols elements, 128-byte swizzle.
static bool make_map(CUtensorMap* map, const void* ptr, CUtensorMapDataType dtype, int elem_bytes, int rows,
                     int cols, int box_rows, int box_cols) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (!encode) {
    cudaDriverEntryPointQueryResult q;
    void* fn = nullptr;
    cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    if (!encode) return false;
  }
  cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  cuuint64_t strides[1] = {(cuuint64_t)cols * elem_bytes};
  cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows}, estr[2] = {1, 1};
  CUresult r = encode(map, dtype, 2, const_cast<void*>(ptr), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// The split tail's workspace on one device: a slot of 128 x 128 fp32 partial sums and two flags (one per math
// warpgroup) per CTA. Allocated by the first split launch on the device, outside any CUDA-graph capture, with
// the flags zeroed before that launch. The kernel lowers each flag it reads, so launches on one stream, and
// graph replays, can reuse it. Split launches on two streams at once (or from two host threads) must not share
// it: one owner could take the other's flag and the other wait forever.
static const char* split_workspace(cudaStream_t stream, float** ws, unsigned** flags) {
  static float* ws_of[64] = {};
  static unsigned* flags_of[64] = {};
  int dev;
  cudaGetDevice(&dev);
  if (dev >= 64) return "split tail: device index >= 64";
  if (!ws_of[dev]) {
    cudaStreamCaptureStatus cap;
    if (cudaStreamIsCapturing(stream, &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone)
      return "split tail: the first call on a device must run outside CUDA-graph capture (it allocates)";
    const size_t sms = num_sms();
    float* w = nullptr;
    unsigned* f = nullptr;
    if (cudaMalloc(&w, sms * BM * BN * sizeof(float)) != cudaSuccess ||
        cudaMalloc(&f, sms * 2 * sizeof(unsigned)) != cudaSuccess ||
        cudaMemset(f, 0, sms * 2 * sizeof(unsigned)) != cudaSuccess ||
        cudaDeviceSynchronize() != cudaSuccess) {  // the zeroed flags, before any stream's first split launch
      cudaFree(w);
      cudaFree(f);
      cudaGetLastError();
      return "split tail: workspace allocation failed";
    }
    ws_of[dev] = w, flags_of[dev] = f;
  }
  *ws = ws_of[dev], *flags = flags_of[dev];
  return nullptr;
}

// The shape heuristics, in one place. Stages: 6 (6 x 32 KiB of operands); kFprop keeps 5 where a tile has more
// than 4 K blocks, the 6th stage's room going to the output tile; with at most 4 K blocks the ring has room for
// all of the next tile's blocks during this one's epilogue, and 6 stages pay. Split tail (kFprop only): when the
// last round of tiles leaves rest <= G / 2 of the G SMs busy and there are fewer than 8 full rounds, each of
// those tiles is split along K into parts = G / rest runs (at most 8, each of at least 8 K blocks) run side by
// side. Measured and dropped: a stream-K split (every CTA one run of the same length, across tile boundaries),
// whose CTAs work at different K offsets and lose the L2 reuse between neighbouring tiles; and splitting the
// last round at any number of rounds.
struct Schedule {
  int stages, split_parts;
};
static Schedule schedule(Kernel kind, int tiles, int k_blocks, int sms) {
  if (kind != Kernel::kFprop || k_blocks <= 4) return {6, 0};
  const int rest = tiles % sms;
  int parts = 0;
  if (rest != 0 && tiles / sms < 8) {
    parts = sms / rest;
    parts = parts < 8 ? parts : 8;
    parts = parts < k_blocks / 8 ? parts : k_blocks / 8;
  }
  return {5, parts >= 2 ? parts : 0};
}

// One launch of gemm_kernel<KIND, STAGES, SPLIT_TAIL, ACC>. b_rows: rows of B (E*N when M-grouped); c_rows: rows
// of C (E*M when K-grouped).
template <Kernel KIND, int STAGES, bool SPLIT_TAIL, bool ACC = false>
static const char* launch(const uint8_t* A, const uint8_t* B, Problem<typename Traits<KIND>::Out> p, int b_rows,
                          int c_rows, cudaStream_t stream) {
  auto kern = gemm_kernel<KIND, STAGES, SPLIT_TAIL, ACC>;
  constexpr int smem = Layout<KIND, STAGES>::bytes;
  static bool attr = false;  // once per build (and per process: the device current at first use)
  if (!attr) {
    cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    attr = true;
  }
  constexpr int kOutBytes = sizeof(typename Traits<KIND>::Out);
  constexpr bool kOutF32 = std::is_same_v<typename Traits<KIND>::Out, float>;
  CUtensorMap ma, mb, mc = {};
  if (!make_map(&ma, A, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, p.m, p.k, BM, BK) ||
      !make_map(&mb, B, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, b_rows, p.k, BN, BK) ||
      (Traits<KIND>::tma_store && !make_map(&mc, p.c, kOutF32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                                             : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                                            kOutBytes, c_rows, p.n, 64, 128 / kOutBytes)))  // boxes 64 x 128 B
    return "cuTensorMapEncodeTiled failed";
  const int sms = num_sms();
  const int tiles = (Traits<KIND>::type == GemmType::kKGrouped ? p.n_groups : 1) * ((p.m + BM - 1) / BM) *
                    ((p.n + BN - 1) / BN);
  if (p.split_parts > 1)
    if (const char* err = split_workspace(stream, &p.split_ws, &p.split_flags)) return err;
  const int grid = tiles < sms ? (p.split_parts > 1 ? tiles * p.split_parts : tiles) : sms;
  kern<<<grid, THREADS, smem, stream>>>(ma, mb, mc, p);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// Picks the build for the shape (schedule()) and launches it. Returns an error string, or nullptr.
template <Kernel KIND>
static const char* run(const uint8_t* A, const uint8_t* B, Problem<typename Traits<KIND>::Out> p, int b_rows,
                       int c_rows) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int tiles = (p.n_groups > 0 ? p.n_groups : 1) * ((p.m + BM - 1) / BM) * ((p.n + BN - 1) / BN);
  const Schedule s = schedule(KIND, tiles, p.k / BK, num_sms());
  if constexpr (KIND == Kernel::kFprop) {
    p.split_parts = s.split_parts;
    if (s.stages == 6) return launch<KIND, 6, false>(A, B, p, b_rows, c_rows, stream);
    if (s.split_parts) return launch<KIND, 5, true>(A, B, p, b_rows, c_rows, stream);
    return launch<KIND, 5, false>(A, B, p, b_rows, c_rows, stream);
  } else if constexpr (Traits<KIND>::b_row_scales) {  // accumulating or not: two builds, each as fast as it can be
    // Adding into C: 4 stages, so that the whole fp32 tile goes out in one round of reduce-adds (H200, v3-layers'
    // shapes, against 6 stages and four rounds of 16 KiB: the dense and K-grouped kernels alone 1.016x and 1.034x,
    // the FP8 step 1.004x)
    if (p.accumulate) return launch<KIND, 4, false, true>(A, B, p, b_rows, c_rows, stream);
    return launch<KIND, 6, false>(A, B, p, b_rows, c_rows, stream);
  } else {
    return launch<KIND, 6, false>(A, B, p, b_rows, c_rows, stream);
  }
}
}  // namespace fp8g

// ------------------------------------------------------------ torch bindings
using fp8g::Kernel;

static const uint8_t* bytes_of(const at::Tensor& t) { return reinterpret_cast<const uint8_t*>(t.data_ptr()); }
static bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// What every binding needs: a (M, K), b (rows, K) e4m3 K-major with K a multiple of 128, fp32 scales, out of
// the given type, all on the GPU; a_scale (M, K/128), contiguous unless M-major.
static void check_operands(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                           const at::Tensor& b_scale, const at::Tensor& out, const char* name,
                           at::ScalarType out_type) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && a_scale.is_cuda() && b_scale.is_cuda() && out.is_cuda(), name,
              ": all tensors must be on the GPU");
  TORCH_CHECK(a.scalar_type() == at::kFloat8_e4m3fn && b.scalar_type() == at::kFloat8_e4m3fn, name,
              ": a and b must be float8_e4m3fn");
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && b_scale.scalar_type() == at::kFloat, name,
              ": scales must be float32");
  TORCH_CHECK(out.scalar_type() == out_type, name,
              out_type == at::kFloat ? ": out must be float32" : ": out must be bfloat16");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && b_scale.is_contiguous() && out.is_contiguous() &&
                  out.dim() == 2, name, ": a, b, b_scale and a 2-D out must be contiguous");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && a.size(1) > 0 && a.size(1) % 128 == 0, name,
              ": a (M, K), b (rows, K) with K a positive multiple of 128 expected");
  TORCH_CHECK(aligned16(a) && aligned16(b), name, ": a and b must be 16-byte aligned (TMA)");
  TORCH_CHECK(a_scale.dim() == 2 && a_scale.size(0) == a.size(0) && a_scale.size(1) == a.size(1) / 128, name,
              ": a_scale must be (M, K/128)");
}

// The bindings launch on a's GPU (made the current device for the call, in C++: cheaper than a Python context)
// and its current stream; fp8.py checks that all operands are on one device.

// out (M, N) bf16 = a (M, K) [a_scale (M, K/128), M-major] . b (N, K) [b_scale (ceil(N/128), K/128)]^T:
// FP8Linear's Fprop and Dgrad. a_scale is a view with strides (1, ld) of a (K/128, ld) buffer, ld >= M rounded up
// to 128 and a multiple of 4, padded rows included (fp8.mmajor_scales lays it out).
void gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out) {
  check_operands(a, a_scale, b, b_scale, out, "fp8 gemm", at::kBFloat16);
  const c10::cuda::CUDAGuard guard(a.device());
  const int M = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_CHECK(b_scale.dim() == 2 && b_scale.size(0) == (N + 127) / 128 && b_scale.size(1) == K / 128,
              "fp8 gemm: b_scale must be (ceil(N/128), K/128)");
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "fp8 gemm: out must be (M, N)");
  if (M == 0 || N == 0) return;
  const int ld = (int)a_scale.stride(1);
  const int64_t need = (int64_t)(K / 128 - 1) * ld + (M + 127) / 128 * 128;  // floats the bulk copies read
  TORCH_CHECK(a_scale.stride(0) == 1 && ld % 4 == 0 && ld >= (M + 127) / 128 * 128 && aligned16(a_scale) &&
                  (int64_t)a_scale.storage().nbytes() / 4 - a_scale.storage_offset() >= need,
              "fp8 gemm: a_scale must be M-major, strides (1, ld) with ld >= M rounded up to 128 and a multiple of 4 "
              "(fp8.mmajor_scales makes it)");
  fp8g::Problem<__nv_bfloat16> p{a_scale.data_ptr<float>(), b_scale.data_ptr<float>(),
                                 reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), M, N, K, nullptr, 0, ld,
                                 nullptr, nullptr, 0};
  const bool tma_store_ok = N % 8 == 0 && aligned16(out);  // TMA stores 16-byte aligned rows
  const char* err = tma_store_ok ? fp8g::run<Kernel::kFprop>(bytes_of(a), bytes_of(b), p, N, M)
                                 : fp8g::run<Kernel::kFpropPlain>(bytes_of(a), bytes_of(b), p, N, M);
  TORCH_CHECK(err == nullptr, "fp8 gemm: launch failed: ", err ? err : "");
}

// The 1D1D operands of Wgrad: b_scale_t holds one scale per row of b per 128 of K, transposed and zero-padded
// to (K/128, N rounded up to 128); out fp32 with rows a multiple of 8 (TMA: 16-byte aligned rows).
static void check_wgrad(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                        const at::Tensor& b_scale_t, const at::Tensor& out, const char* name) {
  check_operands(a, a_scale, b, b_scale_t, out, name, at::kFloat);
  const int K = a.size(1), N = b.size(0);
  TORCH_CHECK(a_scale.is_contiguous() && aligned16(out) && out.size(1) % 8 == 0, name,
              ": a_scale contiguous, out 16-byte aligned with rows a multiple of 8 (TMA)");
  TORCH_CHECK(b_scale_t.dim() == 2 && b_scale_t.size(0) == K / 128 && b_scale_t.size(1) == (N + 127) / 128 * 128, name,
              ": b_scale_t must be (K/128, N rounded up to 128)");
}

// out (M, N) fp32 = a (M, K) [a_scale (M, K/128)] . b (N, K) [b_scale_t]^T: FP8Linear's Wgrad, both operands in
// 1x128 tiles along K (the tokens). accumulate: out += the product (the weight's gradient summed in place).
void gemm_wgrad(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale_t, at::Tensor out,
                bool accumulate) {
  check_wgrad(a, a_scale, b, b_scale_t, out, "fp8 gemm_wgrad");
  const c10::cuda::CUDAGuard guard(a.device());
  const int M = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "fp8 gemm_wgrad: out must be (M, N)");
  if (M == 0 || N == 0) return;
  fp8g::Problem<float> p{a_scale.data_ptr<float>(), b_scale_t.data_ptr<float>(), out.data_ptr<float>(), M, N, K,
                         nullptr, 0, 0, nullptr, nullptr, 0, accumulate};
  const char* err = fp8g::run<Kernel::kWgrad>(bytes_of(a), bytes_of(b), p, N, M);
  TORCH_CHECK(err == nullptr, "fp8 gemm_wgrad: launch failed: ", err ? err : "");
}

// Routed experts' Wgrad: out[e] (M, N) = the 1D1D product over the K blocks [kb0, kb0 + nkb) of each group
// (e, kb0, nkb) of kg (G, 3) int32 on the GPU; out (E*M, N) fp32, M % 128 == 0. A group with nkb = 0 (an idle
// expert) gets zeros; the rows of experts named by no group are left as they are. accumulate: out[e] += the
// product (an idle expert's rows left as they are). kg is read by the kernel only, never by the host (no wait
// for the GPU).
void gemm_experts_wgrad(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale_t, at::Tensor kg,
                        at::Tensor out, bool accumulate) {
  check_wgrad(a, a_scale, b, b_scale_t, out, "fp8 gemm_experts_wgrad");
  const c10::cuda::CUDAGuard guard(a.device());
  const int M = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_CHECK(M > 0 && M % 128 == 0 && out.size(0) % M == 0 && out.size(1) == N,
              "fp8 gemm_experts_wgrad: M must be a multiple of 128 and out (E*M, N)");
  TORCH_CHECK(kg.is_cuda() && kg.scalar_type() == at::kInt && kg.is_contiguous() && kg.dim() == 2 && kg.size(1) == 3,
              "fp8 gemm_experts_wgrad: kg must be a contiguous (G, 3) int32 CUDA tensor");
  if (N == 0 || kg.size(0) == 0) return;
  fp8g::Problem<float> p{a_scale.data_ptr<float>(), b_scale_t.data_ptr<float>(), out.data_ptr<float>(), M, N, K,
                         kg.data_ptr<int>(), (int)kg.size(0), 0, nullptr, nullptr, 0, accumulate};
  const char* err = fp8g::run<Kernel::kExpertsWgrad>(bytes_of(a), bytes_of(b), p, N, (int)out.size(0));
  TORCH_CHECK(err == nullptr, "fp8 gemm_experts_wgrad: launch failed: ", err ? err : "");
}

// Routed experts' Fprop and Dgrad: out (M, N) = a (M, K) . b[e] (N, K)^T for the rows of expert e, where a's rows
// come sorted by expert in segments of whole 128-row tiles, groups (M/128,) int32 names the expert of each tile
// (-1: none; the tile is skipped and its rows of out are left as they are), b stacks the E experts' weights as
// (E*N, K) and b_scale their 128x128 block scales as (E*N/128, K/128).
void gemm_experts(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor groups,
                  at::Tensor out, int64_t n_experts) {
  check_operands(a, a_scale, b, b_scale, out, "fp8 gemm_experts", at::kBFloat16);
  const c10::cuda::CUDAGuard guard(a.device());
  const int M = a.size(0), K = a.size(1), E = n_experts;
  TORCH_CHECK(a_scale.is_contiguous() && aligned16(out) && out.size(1) % 8 == 0,
              "fp8 gemm_experts: a_scale contiguous, out 16-byte aligned with rows a multiple of 8 (TMA)");
  TORCH_CHECK(E > 0 && b.size(0) % E == 0 && (b.size(0) / E) % 128 == 0,
              "fp8 gemm_experts: b must be (E*N, K) with N a multiple of 128");
  const int N = b.size(0) / E;
  TORCH_CHECK(M % 128 == 0, "fp8 gemm_experts: M must be a multiple of 128 (segments padded to whole tiles)");
  TORCH_CHECK(b_scale.dim() == 2 && b_scale.size(0) == E * N / 128 && b_scale.size(1) == K / 128,
              "fp8 gemm_experts: b_scale must be (E*N/128, K/128)");
  TORCH_CHECK(groups.is_cuda() && groups.scalar_type() == at::kInt && groups.is_contiguous() && groups.dim() == 1 &&
                  groups.size(0) == M / 128,
              "fp8 gemm_experts: groups must be a contiguous int32 CUDA tensor of M/128 expert ids");
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "fp8 gemm_experts: out must be (M, N)");
  if (M == 0) return;
  fp8g::Problem<__nv_bfloat16> p{a_scale.data_ptr<float>(), b_scale.data_ptr<float>(),
                                 reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), M, N, K, groups.data_ptr<int>(), 0,
                                 0, nullptr, nullptr, 0};
  const char* err = fp8g::run<Kernel::kExperts>(bytes_of(a), bytes_of(b), p, E * N, M);
  TORCH_CHECK(err == nullptr, "fp8 gemm_experts: launch failed: ", err ? err : "");
}

// fp8_quant.cu, built into the same extension
void quant_rows(at::Tensor x, at::Tensor q, at::Tensor s, int64_t ld);
void quant_cols(at::Tensor x, at::Tensor q, at::Tensor s);
void quant_rows_cols(at::Tensor x, at::Tensor q, at::Tensor s, int64_t ld, at::Tensor qt, at::Tensor st);
void quant_blocks(at::Tensor w, at::Tensor q, std::optional<at::Tensor> qt, at::Tensor s);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "fine-grained FP8 GEMM, M-major A scales, bf16 out (Fprop, Dgrad)");
  namespace py = pybind11;
  m.def("gemm_wgrad", &gemm_wgrad, "1x128 scales on both operands, fp32 out (Wgrad, '1D1D'); out += with accumulate",
        py::arg("a"), py::arg("a_scale"), py::arg("b"), py::arg("b_scale_t"), py::arg("out"),
        py::arg("accumulate") = false);
  m.def("gemm_experts", &gemm_experts, "M-grouped: each 128-row tile of a uses its expert's weight");
  m.def("gemm_experts_wgrad", &gemm_experts_wgrad, "K-grouped 1D1D: one fp32 output per expert (experts' Wgrad)",
        py::arg("a"), py::arg("a_scale"), py::arg("b"), py::arg("b_scale_t"), py::arg("kg"), py::arg("out"),
        py::arg("accumulate") = false);
  m.def("quant_rows", &quant_rows, "fused 1x128 quantization along the last dim, scales row- or M-major");
  m.def("quant_cols", &quant_cols, "fused transpose + 1x128 quantization of x^T, rows padded to 128");
  m.def("quant_rows_cols", &quant_rows_cols, "quant_rows and quant_cols of one bf16 x in one pass");
  m.def("quant_blocks", &quant_blocks, "fused 128x128 block quantization of W, with W^T in the same pass");
}
