// Step 3: step 2 (02_tma_wgmma.cu) with the output leaving through shared memory and an asynchronous TMA store.
// In step 2 each math thread stores its 64 results from registers, scattered over 16 rows, and the warpgroup starts
// the next tile only when those stores have been issued. Here each math warpgroup writes its 64 x 128 bf16 result
// into a 16 KiB staging buffer (two 64-column boxes, 128-byte swizzled as TMA expects), one thread hands it to
// TMA with cp.async.bulk.tensor, and the warpgroup goes on to the next tile's K loop while the store runs; it waits
// for the store to have read the buffer only before writing the buffer again. TMA clips rows past M and columns
// past N, so edge tiles need no masking; it needs output rows of a multiple of 16 bytes (N % 8 == 0).
// Step 4 hides the promotion behind the next K block's wgmmas.

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <stdint.h>

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

namespace step3 {

constexpr int BM = 128, BN = 128, BK = 128;
constexpr int THREADS = 384, MATH_WARPS = 8, STAGES = 6;
constexpr int TILE_BYTES = BM * BK;                           // 16 KiB, == BN * BK
constexpr int C_BYTES = 2 * 64 * BN * 2;                      // the bf16 output tile, staged for the TMA store
constexpr int SMEM = STAGES * 2 * TILE_BYTES + C_BYTES + 2 * STAGES * 8 + 1024;  // + barriers, alignment slack
constexpr int GROUP_N = 8;                                    // tile order: bands of 8 N tiles, M inner

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
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
__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int col, int row) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n"
               ::"l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(src)), "r"(col), "r"(row) : "memory");
}
// Barrier of the 128 threads of one warpgroup (id 1 or 2; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }

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
// Step k moves 32 bytes along K: +2 in the descriptors' address field (16-byte units).
__device__ __forceinline__ void issue_block(float* acc, const uint8_t* a, const uint8_t* b) {
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  const uint64_t da = desc(a), db = desc(b);
#pragma unroll
  for (int k = 0; k < BK / 32; ++k) wgmma_m64n128k32(acc, da + 2 * k, db + 2 * k, k > 0);
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

// Tile t of the banded order: its top-left corner.
__device__ __forceinline__ void tile_coords(int t, int num_m, int num_n, int& m0, int& n0) {
  int band = t / (GROUP_N * num_m), first_n = band * GROUP_N;
  int width = min(num_n - first_n, GROUP_N), local = t - band * GROUP_N * num_m;
  m0 = (local / width) * BM;
  n0 = (first_n + local % width) * BN;
}

__global__ void __launch_bounds__(THREADS, 1) gemm(const __grid_constant__ CUtensorMap tmA,
                                                   const __grid_constant__ CUtensorMap tmB,
                                                   const __grid_constant__ CUtensorMap tmC,
                                                   const float* __restrict__ SA, const float* __restrict__ SB,
                                                   int M, int N, int K) {
  extern __shared__ uint8_t smem_raw[];
  // 128B-swizzled TMA destinations and wgmma operands want 1024-byte aligned tiles.
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* sA = smem;                                   // [STAGES][128 rows][128 B]
  uint8_t* sB = smem + STAGES * TILE_BYTES;             // [STAGES][128 rows][128 B]
  uint8_t* sC = smem + 2 * STAGES * TILE_BYTES;         // [2 math wg][2 boxes][64 rows][128 B]
  uint64_t* full = reinterpret_cast<uint64_t*>(sC + C_BYTES);
  uint64_t* empty = full + STAGES;                      // math warps done reading
  const int Kb = K / BK, num_m = (M + BM - 1) / BM, num_n = (N + BN - 1) / BN, tiles = num_m * num_n;
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) { mbar_init(&full[s], 1); mbar_init(&empty[s], MATH_WARPS); }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {  // ---------------- producer warpgroup: one thread issues all TMA loads ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      uint32_t it = 0;  // K blocks issued so far: stage it % STAGES, pass it / STAGES over the ring
      for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
        int m0, n0;
        tile_coords(t, num_m, num_n, m0, n0);
        for (int kb = 0; kb < Kb; ++kb, ++it) {
          int s = it % STAGES;
          mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);  // first pass: a fresh barrier passes parity 1
          mbar_expect_tx(&full[s], 2 * TILE_BYTES);        // rows past M/N are zero-filled, still counted
          tma_load(sA + s * TILE_BYTES, &tmA, &full[s], kb * BK, m0);
          tma_load(sB + s * TILE_BYTES, &tmB, &full[s], kb * BK, n0);
        }
      }
    }
  } else {  // ---------------- math warpgroups: rows [64*(wg-1), 64*wg) of each tile ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int mw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int rw = warp * 16 + (lane >> 2);  // this thread's first row in the warpgroup's 64 (+8 the second)
    const bool leader = (threadIdx.x & 127) == 0;
    uint8_t* cbuf = sC + mw * (C_BYTES / 2);
    uint32_t it = 0;
    float acc[64], fin[64];
    for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
      int m0, n0;
      tile_coords(t, num_m, num_n, m0, n0);
      const int r0 = m0 + mw * 64 + rw, r1 = r0 + 8;
      // rows past M read row M - 1's scales: their A rows are zero-filled by TMA and they are never stored
      const float* pa0 = SA + (size_t)min(r0, M - 1) * Kb;
      const float* pa1 = SA + (size_t)min(r1, M - 1) * Kb;
      const float* pb = SB + (size_t)(n0 / 128) * Kb;
#pragma unroll
      for (int i = 0; i < 64; ++i) fin[i] = 0.f;
      for (int kb = 0; kb < Kb; ++kb, ++it) {
        const int s = it % STAGES;
        const float s0 = pa0[kb] * pb[kb], s1 = pa1[kb] * pb[kb];
        mbar_wait(&full[s], (it / STAGES) & 1);
        issue_block(acc, sA + s * TILE_BYTES + mw * 64 * BK, sB + s * TILE_BYTES);
        wgmma_wait<0>();
        if (lane == 0) mbar_arrive(&empty[s]);  // the stage may be refilled while we promote
        promote(fin, acc, s0, s1);
      }
      if (leader) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // the last store read cbuf
      named_barrier(1 + mw);
#pragma unroll
      for (int j = 0; j < 16; ++j) {  // cols 8j + 2(lane%4): box j/8, 16-byte chunk j%8 swizzled by row%8
        int off = (j >> 3) * 8192 + rw * 128 + (((j & 7) ^ (rw & 7)) << 4) + 4 * (lane & 3);
        *reinterpret_cast<__nv_bfloat162*>(cbuf + off) = __floats2bfloat162_rn(fin[4 * j + 0], fin[4 * j + 1]);
        *reinterpret_cast<__nv_bfloat162*>(cbuf + off + 8 * 128) =
            __floats2bfloat162_rn(fin[4 * j + 2], fin[4 * j + 3]);
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // make the stores visible to TMA
      named_barrier(1 + mw);
      if (leader) {  // rows past M and columns past N are clipped by TMA
        tma_store(&tmC, cbuf, n0, m0 + mw * 64);
        tma_store(&tmC, cbuf + 8192, n0 + 64, m0 + mw * 64);
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      }
    }
    if (leader) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");  // before shared memory goes away
  }
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
}  // namespace step3

// Operands as in step 1; a, b and out 16-byte aligned, N % 8 == 0 (TMA). Checked in fp8_teaching.gemm (and
// bind.cu); returns "" or what went wrong.
std::string step3_gemm(at::Tensor a, at::Tensor a_scale, at::Tensor b, at::Tensor b_scale, at::Tensor out) {
  using namespace step3;
  const int M = a.size(0), K = a.size(1), N = b.size(0);
  static int sms = 0;
  if (!sms) {
    cudaFuncSetAttribute(gemm, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
    int dev;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  }
  CUtensorMap ma, mb, mc;
  if (!(make_map(&ma, a.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, M, K, BM, BK) &&
        make_map(&mb, b.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, N, K, BN, BK) &&
        make_map(&mc, out.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, M, N, 64, 64)))
    return "step3: cuTensorMapEncodeTiled failed";
  const int tiles = ((M + BM - 1) / BM) * ((N + BN - 1) / BN);
  gemm<<<tiles < sms ? tiles : sms, THREADS, SMEM, c10::cuda::getCurrentCUDAStream()>>>(
      ma, mb, mc, a_scale.data_ptr<float>(), b_scale.data_ptr<float>(), M, N, K);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : std::string("step3: launch failed: ") + cudaGetErrorString(e);
}
