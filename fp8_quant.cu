// Fused FP8 quantization for training (fp8.py's quantize_act, quantize_act_t and quantize_weight on CUDA): one
// pass over the high-precision tensor instead of PyTorch's chain of pad, float copy, abs, amax, divide, clamp,
// cast and (for the backward's transposed operand) a second copy. Each is bound by memory bandwidth (a few
// flops per byte), so the kernels are written for it: each thread issues several loads (16 bytes each in rows and
// cols) before it uses the first (`python fp8_bench.py --quant` times rows and cols against a copy of the input).
// Same arithmetic as the reference on the GPU, so the results are bit-identical: scale = max(amax, 1e-20) / 448
// in fp32, done as torch does a division by a Python number (times the fp32 reciprocal), q = e4m3(x / scale)
// with x / scale rounded as IEEE division rounds it (by a multiplication and one FMA correction: Divisor below) and
// round-to-nearest-even into E4M3, saturated at +-448. (For finite inputs in rows and cols: fmaxf
// skips a NaN, so a tile holding one gets a finite scale there and a NaN scale in the reference; its q holds the
// NaN either way. blocks keeps the NaN in its amax, as torch's amax does: NaN scale and NaN block, as the reference.)
//
//   rows: x (R, C) -> q (R, C), s (R, C/128)               1x128 tiles along the last dim (Fprop, Dgrad)
//   cols: x (R, C) -> q (C, R'), s (C, R'/128), R' = R rounded up to 128, rows past R read as 0:
//         the tiles of x^T, i.e. 128x1 tiles of x along the tokens, with the transpose fused in (Wgrad)
//   rows_cols: x (R, C) bf16 -> both of the above in one pass (a linear layer's input and output gradient)
//   blocks: w (E, R, C) -> q (E, R, C), s (E, ceil(R/128), ceil(C/128)), and optionally qt (E, C, R'):
//         128x128 blocks of each of E matrices (E = 1: one weight; a stack of experts), edge blocks cropped;
//         qt = each q transposed, zero columns past R (Fprop's W and Dgrad's W^T in one pass)

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

namespace fp8q {

constexpr float INV_E4M3_MAX = 1.f / 448.f, AMAX_EPS = 1e-20f;  // fp8.py's AMAX_EPS

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

// two values into E4M3 in one conversion: lo in byte 0, hi in byte 1
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  return static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3));
}
// x / scale for every value of a tile, as IEEE division rounds it, in three instructions a value (a multiply, two
// FMAs) instead of a division's ten or so and a branch (rows_cols divides every value twice). With r = RN(1/scale),
// made once per tile, q = RN(x·r) is within an ulp of x / scale, and one correction q' = RN(q + RN(x − q·scale)·r),
// whose remainder x − q·scale an FMA gives exactly, is the correctly rounded quotient (Markstein's theorem for
// division by FMA; the amax floor keeps scale >= 2^-76, so where the quotient is >= 2^-19, x >= 2^-95 and no
// step of the correction underflows). Where x / scale is below 2^-19 (x tiny against its tile; the remainder can lose
// bits there) q' may differ from the quotient in its last bits, but both round to the same E4M3 zero
// (tests/test_fp8.py: the rule in exact arithmetic on the CPU, the kernels against the reference's division on the
// GPU). Signed zeros: the remainder is made negated, e = RN(q·scale − x), and q' = RN(−e·r + q): for x = ±0,
// q = ±0, e = +0 (a sum of opposite zeros), −e·r = −0 and q' = −0 + q = q, x's sign, as the division gives
// (x − q·scale would be +0 and q' +0 for both). A nonzero x gets a nonzero q' of its sign, or a zero of its sign
// where x·r underflows.
// An infinite scale (an infinity in the tile) has r = 0 and s = 0 here: finite values give ±0, the infinities NaN,
// as the division does (that NaN's sign bit may differ).
struct Divisor {
  float s, r;  // the scale (0 if infinite), RN(1 / scale)
};
__device__ __forceinline__ Divisor divisor(float scale) { return {isinf(scale) ? 0.f : scale, __frcp_rn(scale)}; }
__device__ __forceinline__ float quotient(float x, const Divisor& by) {
  const float q = __fmul_rn(x, by.r);
  return __fmaf_rn(-__fmaf_rn(q, by.s, -x), by.r, q);
}
__device__ __forceinline__ uint32_t pack4(float a, float b, float c, float d, const Divisor& by) {
  return e4m3x2(quotient(a, by), quotient(b, by)) | e4m3x2(quotient(c, by), quotient(d, by)) << 16;
}
__device__ __forceinline__ uint2 pack8(const float* v, const Divisor& by) {
  return make_uint2(pack4(v[0], v[1], v[2], v[3], by), pack4(v[4], v[5], v[6], v[7], by));
}
__device__ __forceinline__ uint4 pack16(const float* v, const Divisor& by) {
  return make_uint4(pack4(v[0], v[1], v[2], v[3], by), pack4(v[4], v[5], v[6], v[7], by),
                    pack4(v[8], v[9], v[10], v[11], by), pack4(v[12], v[13], v[14], v[15], by));
}
// a tile's scale from its amax: max(amax, 1e-20) / 448, as torch computes it (times the fp32 reciprocal)
__device__ __forceinline__ float tile_scale(float amax) { return fmaxf(amax, AMAX_EPS) * INV_E4M3_MAX; }
// the amax of a 1x128 tile held by 16 lanes (`lanes`: their mask), 8 values each
__device__ __forceinline__ float tile16_amax(const float* v, unsigned lanes) {
  float m = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
#pragma unroll
  for (int o = 8; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(lanes, m, o));
  return m;
}

// 8 bf16 values held in 16 bytes, as floats
__device__ __forceinline__ void unpack8(uint4 t, float* v) {
  const uint32_t w[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}
// 8 consecutive values as one 16-byte load (bf16) or two (fp32)
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* v) {
  unpack8(*reinterpret_cast<const uint4*>(p), v);
}
__device__ __forceinline__ void load8(const float* p, float* v) { load4(p, v), load4(p + 4, v + 4); }

// Sixteen threads per 1x128 tile, 8 consecutive values each; the tile amax is a max over the 16 lanes. A block of
// 256 threads takes 16 tiles per round and ROWS_ROUNDS rounds, all of whose loads it issues before the first max:
// more bytes in flight per thread is what brings a pass like this one near the memory's bandwidth.
// ld == 0: scales row-major, tile t at s[t]. ld > 0: M-major, tile (row r, block kb) at s[kb * ld + r], the layout
// fp8_gemm.cu's Fprop kernel reads (kb_row: scales per row, K/128).
constexpr int ROWS_ROUNDS = 2;
template <typename T>
__global__ void __launch_bounds__(256) rows(const T* __restrict__ x, uint2* __restrict__ q,
                                            float* __restrict__ s, long long tiles, int kb_row, int ld) {
  const int sub = threadIdx.x & 15;
  const unsigned half = 0xffffu << (threadIdx.x & 16);  // the 16 lanes of this thread's tile, for the shuffles
  const long long first = (long long)blockIdx.x * 16 * ROWS_ROUNDS + threadIdx.x / 16;
  float v[ROWS_ROUNDS][8];
#pragma unroll
  for (int i = 0; i < ROWS_ROUNDS; ++i) {
    const long long tile = first + 16 * i;
    if (tile < tiles) load8(x + tile * 128 + sub * 8, v[i]);
  }
#pragma unroll
  for (int i = 0; i < ROWS_ROUNDS; ++i) {
    const long long tile = first + 16 * i;  // the same for the 16 lanes of a tile: they leave together
    if (tile >= tiles) break;
    const float scale = tile_scale(tile16_amax(v[i], half));
    q[tile * 16 + sub] = pack8(v[i], divisor(scale));
    if (sub == 0) s[ld ? (tile % kb_row) * ld + tile / kb_row : tile] = scale;
  }
}

// A block transposes a 128 (rows of x) x 64 (columns of x) tile through shared memory. Loading: each thread
// brings 16-byte vectors of a row (8 bf16 or 4 fp32 values), all of them issued before the first store into shared
// memory (when every row of x starts 16-byte aligned; one value at a time otherwise). Then four threads share a
// column of the tile, thread `part` its rows 32 part .. 32 part + 31: it reads them into registers once, takes
// their amax (a max with its 3 partners), and writes them as 32 consecutive bytes of q's row.
// Word (r, c) of the tile is stored at tile[r][(c + 8 (r / 32)) % 64] (row stride 65): then the 32 lanes of a warp
// (8 columns x 4 parts) reading row 32 part + i hit 32 different banks, (i + c + 8 part) % 32.
template <typename T>
__global__ void __launch_bounds__(256) cols(const T* __restrict__ x, uint8_t* __restrict__ q,
                                            float* __restrict__ s, int R, int C, int R_pad, bool vec) {
  constexpr int VEC = 16 / sizeof(T), PER_ROW = 64 / VEC, ROWS = 256 / PER_ROW, ROUNDS = 128 / ROWS;
  __shared__ float tile[128][65];
  const int r0 = blockIdx.y * 128, c0 = blockIdx.x * 64;
  auto put = [&](int r, int c, float v) { tile[r][(c + 8 * (r / 32)) & 63] = v; };
  if (vec) {  // coalesced along the columns of x; a vector is in range when its first column is
    const int c = (threadIdx.x % PER_ROW) * VEC, r1 = threadIdx.x / PER_ROW;
    float v[ROUNDS][VEC];
#pragma unroll
    for (int i = 0; i < ROUNDS; ++i) {
      const int r = r1 + ROWS * i;
      if (r0 + r < R && c0 + c < C) {
        if constexpr (VEC == 8) load8(x + (size_t)(r0 + r) * C + c0 + c, v[i]);
        else load4(x + (size_t)(r0 + r) * C + c0 + c, v[i]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < ROUNDS; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j) put(r1 + ROWS * i, c + j, v[i][j]);
  } else {
    for (int i = threadIdx.x; i < 128 * 64; i += 256) {
      const int r = i / 64, c = i % 64;
      put(r, c, (r0 + r < R && c0 + c < C) ? to_f32(x[(size_t)(r0 + r) * C + c0 + c]) : 0.f);
    }
  }
  __syncthreads();
  const int c = threadIdx.x / 4, part = threadIdx.x % 4;
  float v[32];
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    v[i] = tile[32 * part + i][(c + 8 * part) & 63];
    m = fmaxf(m, fabsf(v[i]));
  }
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
  if (c0 + c >= C) return;
  const float scale = tile_scale(m);
  if (part == 0) s[(size_t)(c0 + c) * (R_pad / 128) + blockIdx.y] = scale;
  uint4* out = reinterpret_cast<uint4*>(q + (size_t)(c0 + c) * R_pad + r0 + part * 32);  // 32 bytes of row c0 + c
  const Divisor by = divisor(scale);
  out[0] = pack16(v, by), out[1] = pack16(v + 16, by);
}

// Both tilings of one bf16 input in one pass: x (R, C) -> rows' (q, s) and cols' (qt, st), the same bytes as the
// two kernels above. A linear layer needs both of its input X (1x128 tiles along C for Fprop, 128x1 along the tokens
// R for Wgrad) and of its output gradient dY (Dgrad, Wgrad); this reads each once instead of twice. A block of 512
// threads takes a 128 x 128 square, whose rows are whole 1x128 tiles: 16 threads per row, 8 values (one 16-byte
// load) each, 4 rows per thread, all loads issued first; each row is quantized from registers as `rows` does. The
// square's bf16 values then go through shared memory, and each thread takes two adjacent columns (one 4-byte word
// per row) over 16 rows: warp w, lane l has columns 8w + 2(l % 4) + {0, 1} and rows 16 part .. 16 part + 15,
// part = l / 4, so a column's 128-row tile is spread over the 8 parts of 4 lanes of one warp (its amax: 3 shuffles).
// Row r's 16-byte chunk k is stored at chunk k ^ (r / 16 % 8): the 8 parts of a warp, which read the same chunk of
// rows 16 apart, then hit 8 different chunks, all 32 banks once. Rows past R are read as 0 (the padding of qt) and
// get no row tile. Two blocks per SM: at most 64 registers a thread, nothing spilled (three, at 40 registers, spill
// and ran up to 4% slower on the V3 shapes, H200). The kernel is held back by its instruction issue as much as by
// memory, so each value costs few: three for its quotient (Divisor), half a conversion (e4m3x2), the columns' amax
// taken on bf16 pairs (one max for two values), full-warp shuffle masks (a partial one adds convergence code
// around each shuffle): 1.21-1.27x faster on the V3 shapes than with a conversion, a copysign and a float max per
// value (H200).
__global__ void __launch_bounds__(512, 2) rows_cols(const __nv_bfloat16* __restrict__ x, uint2* __restrict__ q,
                                                 float* __restrict__ s, int ld, uint8_t* __restrict__ qt,
                                                 float* __restrict__ st, int R, int C, int R_pad) {
  __shared__ uint4 tile[128][16];
  const int kb = blockIdx.x, kb_row = C / 128, r0 = blockIdx.y * 128, c0 = kb * 128;
  const int sub = threadIdx.x & 15, r1 = threadIdx.x >> 4;  // chunk `sub` of rows r1 + 32 i
  uint4 raw[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = r0 + r1 + 32 * i;
    raw[i] = r < R ? *reinterpret_cast<const uint4*>(x + (size_t)r * C + c0 + sub * 8) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = r0 + r1 + 32 * i, tr = r1 + 32 * i;  // row of x, row of the square
    tile[tr][sub ^ ((tr >> 4) & 7)] = raw[i];
    float v[8];
    unpack8(raw[i], v);
    const float m = tile16_amax(v, 0xffffffffu);  // every lane is here: its shuffles stay in its 16-lane half
    if (r < R) {  // the same for the 16 lanes of a row
      const float scale = tile_scale(m);
      q[((size_t)r * kb_row + kb) * 16 + sub] = pack8(v, divisor(scale));
      if (sub == 0) s[ld ? (size_t)kb * ld + r : (size_t)r * kb_row + kb] = scale;
    }
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, part = lane >> 2;
  const int c = 8 * warp + 2 * (lane & 3);  // this thread's first column in the square; chunk `warp` of a row
  // row 16 part + i's word holding columns c, c + 1: 64 words a row, chunk warp ^ part, word lane % 4 in it
  const uint32_t* tw = reinterpret_cast<const uint32_t*>(tile) + 16 * part * 64 + 4 * (warp ^ part) + (lane & 3);
  uint32_t w[16];  // two bf16: column c (low half), c + 1 (high half)
  // the two columns' amax as one pair of bf16 (a max of bf16 values is exact, and like fmaxf it skips a NaN)
  __nv_bfloat162 m2 = __float2bfloat162_rn(0.f);
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    w[i] = tw[64 * i];
    m2 = __hmax2(m2, __habs2(*reinterpret_cast<const __nv_bfloat162*>(&w[i])));
  }
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {  // the 8 parts of columns c, c + 1
    const uint32_t other = __shfl_xor_sync(0xffffffffu, *reinterpret_cast<const uint32_t*>(&m2), o);
    m2 = __hmax2(m2, *reinterpret_cast<const __nv_bfloat162*>(&other));
  }
  const float2 m = __bfloat1622float2(m2);
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // column c + h: 16 bytes of its row of qt
    const float scale = tile_scale(h ? m.y : m.x);
    if (part == 0) st[(size_t)(c0 + c + h) * (R_pad / 128) + blockIdx.y] = scale;
    float v[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(&w[i])[h]);
    *reinterpret_cast<uint4*>(qt + (size_t)(c0 + c + h) * R_pad + r0 + 16 * part) = pack16(v, divisor(scale));
  }
}

// max that keeps a NaN (as torch's amax does), so that a weight block holding one gets a NaN scale as in the
// reference (fmaxf would skip it)
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

// Column j of a 4x4 byte block given as 4 row words (byte j of row word k -> byte k of the result).
__device__ __forceinline__ uint32_t byte_column(const uint32_t* rows4, int j) {
  uint32_t col = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) col |= (rows4[k] >> (8 * j) & 0xffu) << (8 * k);
  return col;
}

// One CTA per 128x128 block: blockIdx.x its block column, .y its block row, .z the matrix (expert) of a stack.
// Warp w, lane l holds the block's rows 4g..4g+3 (g = w + 8i, i = 0..3) by columns 4l..4l+3: 64 values in
// registers. A warp reads each row as one coalesced 512-byte (fp32) load and writes it as a 128-byte store.
// For qt each thread transposes its 4x4 sub-blocks in registers into shared memory, tile_t[c][.] = column c of
// the block (32 words of 4 rows); word g of column c sits at g ^ (c / 4), an XOR swizzle that puts the 32 lanes
// of a warp in 32 different banks both when they store (one column word each) and when they read a column back
// (one row word each) for the coalesced store into qt. Rows past R quantize as 0 (padding never raises the amax)
// and are written as zeros into qt's padding; columns past C are read as 0 and not written. Each value is divided
// as the activations' are (Divisor: 1.20-1.23x faster than an IEEE division per value on the V3 weights in fp32,
// 1.59x in bf16, whose build spills 24 bytes around the reciprocal's slow-path call; H200).
template <typename T>
__global__ void __launch_bounds__(256) blocks(const T* __restrict__ w, uint8_t* __restrict__ q,
                                              uint8_t* __restrict__ qt, float* __restrict__ s, int R, int C,
                                              int R_pad) {
  __shared__ float warp_amax[8];
  __shared__ uint32_t tile_t[128][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r0 = blockIdx.y * 128, c0 = blockIdx.x * 128, c = c0 + 4 * lane;
  const bool vec = C % 4 == 0;  // whole 4-value groups: vector loads and 4-byte stores stay aligned
  w += (size_t)blockIdx.z * R * C;
  q += (size_t)blockIdx.z * R * C;
  float v[16][4];  // v[4i + k][j] = w[r0 + 4(warp + 8i) + k][c + j]
  float m = 0.f;
#pragma unroll
  for (int n = 0; n < 16; ++n) {
    const int r = r0 + 4 * (warp + 8 * (n / 4)) + n % 4;
    if (vec && r < R && c < C) {
      load4(w + (size_t)r * C + c, v[n]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) v[n][j] = (r < R && c + j < C) ? to_f32(w[(size_t)r * C + c + j]) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) m = max_nan(m, fabsf(v[n][j]));
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) m = max_nan(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) warp_amax[warp] = m;
  __syncthreads();
  m = warp_amax[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) m = max_nan(m, warp_amax[i]);
  // the reference: amax.clamp(min=1e-20) / 448, which torch computes as a product with the fp32 reciprocal
  const float scale = (m != m ? m : fmaxf(m, AMAX_EPS)) * INV_E4M3_MAX;
  if (threadIdx.x == 0) s[((size_t)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] = scale;
  const Divisor by = divisor(scale);  // a NaN scale gives NaN quotients, as the division does
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int g = warp + 8 * i;
    uint32_t rows4[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int r = r0 + 4 * g + k;
      const float* x = v[4 * i + k];
      rows4[k] = r < R ? pack4(x[0], x[1], x[2], x[3], by) : 0u;
      if (r >= R || c >= C) continue;
      if (vec) {
        *reinterpret_cast<uint32_t*>(q + (size_t)r * C + c) = rows4[k];
      } else {
        for (int j = 0; j < 4 && c + j < C; ++j) q[(size_t)r * C + c + j] = rows4[k] >> (8 * j) & 0xffu;
      }
    }
    if (qt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) tile_t[4 * lane + j][g ^ lane] = byte_column(rows4, j);
    }
  }
  if (!qt) return;
  __syncthreads();
  qt += (size_t)blockIdx.z * C * R_pad;
#pragma unroll 4
  for (int k = 0; k < 16; ++k) {  // warp w writes columns 16w..16w+15 of the block as rows of qt
    const int cc = 16 * warp + k;
    if (c0 + cc < C)
      *reinterpret_cast<uint32_t*>(qt + (size_t)(c0 + cc) * R_pad + r0 + 4 * lane) = tile_t[cc][lane ^ (cc / 4)];
  }
}
}  // namespace fp8q

// Whether t's data starts on a multiple of `bytes` (the kernels' vector loads and stores need it).
static bool aligned(const at::Tensor& t, int bytes) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0; }

// q, s preallocated by fp8.py: q uint8 view of the float8 output, s float32.
// s: the (R, C/128) scales row-major (ld = 0), or a contiguous (C/128, ld) buffer, ld >= R, for M-major scales.
void quant_rows(at::Tensor x, at::Tensor q, at::Tensor s, int64_t ld) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && q.is_contiguous() && s.is_contiguous(),
              "quant_rows: contiguous CUDA tensors expected");
  const c10::cuda::CUDAGuard guard(x.device());  // launch on x's GPU, its current stream
  TORCH_CHECK(x.numel() % 128 == 0 && q.numel() == x.numel(), "quant_rows: bad sizes");
  TORCH_CHECK(aligned(x, 16) && aligned(q, 8),
              "quant_rows: x must be 16-byte aligned (16-byte loads), q 8-byte aligned");
  const long long tiles = x.numel() / 128;
  const int kb_row = x.dim() ? (int)(x.size(-1) / 128) : 0;
  TORCH_CHECK(ld == 0 ? s.numel() == tiles
                      : (x.dim() == 2 && ld >= x.size(0) && s.numel() == (long long)kb_row * ld),
              "quant_rows: bad scale buffer");
  if (!tiles) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = (unsigned)((tiles + 16 * fp8q::ROWS_ROUNDS - 1) / (16 * fp8q::ROWS_ROUNDS));
  auto qp = reinterpret_cast<uint2*>(q.data_ptr());
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
  const c10::cuda::CUDAGuard guard(x.device());  // launch on x's GPU, its current stream
  const int R = x.size(0), C = x.size(1), R_pad = (R + 127) / 128 * 128;
  TORCH_CHECK(q.dim() == 2 && q.size(0) == C && q.size(1) == R_pad && s.dim() == 2 && s.size(0) == C &&
                  s.size(1) == R_pad / 128, "quant_cols: q must be (C, R rounded up to 128), s (C, that / 128)");
  if (!R || !C) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(aligned(q, 16), "quant_cols: q must be 16-byte aligned");
  dim3 grid((C + 63) / 64, R_pad / 128);
  auto qp = reinterpret_cast<uint8_t*>(q.data_ptr());
  // 16-byte loads when every row of x starts 16-byte aligned
  const bool vec = aligned(x, 16) && C * x.element_size() % 16 == 0;
  if (x.scalar_type() == at::kBFloat16)
    fp8q::cols<<<grid, 256, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), qp, s.data_ptr<float>(),
                                         R, C, R_pad, vec);
  else if (x.scalar_type() == at::kFloat)
    fp8q::cols<<<grid, 256, 0, stream>>>(x.data_ptr<float>(), qp, s.data_ptr<float>(), R, C, R_pad, vec);
  else
    TORCH_CHECK(false, "quant_cols: x must be bfloat16 or float32");
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "quant_cols: launch failed");
}

// x (R, C) bf16, C a multiple of 128: q, s as quant_rows (ld as there), qt, st as quant_cols, all preallocated.
void quant_rows_cols(at::Tensor x, at::Tensor q, at::Tensor s, int64_t ld, at::Tensor qt, at::Tensor st) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() &&
                  q.is_contiguous() && s.is_contiguous() && qt.is_contiguous() && st.is_contiguous(),
              "quant_rows_cols: contiguous 2-D bfloat16 x and contiguous outputs expected");
  const c10::cuda::CUDAGuard guard(x.device());  // launch on x's GPU, its current stream
  const int R = x.size(0), C = x.size(1), R_pad = (R + 127) / 128 * 128;
  TORCH_CHECK(C % 128 == 0 && q.numel() == x.numel(), "quant_rows_cols: C must be a multiple of 128, q x's size");
  TORCH_CHECK(ld == 0 ? s.numel() == (long long)R * (C / 128) : (ld >= R && s.numel() == (long long)(C / 128) * ld),
              "quant_rows_cols: bad scale buffer");
  TORCH_CHECK(qt.dim() == 2 && qt.size(0) == C && qt.size(1) == R_pad && st.dim() == 2 && st.size(0) == C &&
                  st.size(1) == R_pad / 128,
              "quant_rows_cols: qt must be (C, R rounded up to 128), st (C, that / 128)");
  TORCH_CHECK(aligned(x, 16) && aligned(q, 8) && aligned(qt, 16),
              "quant_rows_cols: x and qt must be 16-byte aligned, q 8-byte aligned");
  TORCH_CHECK(R_pad / 128 <= 65535, "quant_rows_cols: at most 65535 row blocks (grid limit)");
  if (!R || !C) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid(C / 128, R_pad / 128);
  fp8q::rows_cols<<<grid, 512, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
                                            reinterpret_cast<uint2*>(q.data_ptr()), s.data_ptr<float>(), (int)ld,
                                            reinterpret_cast<uint8_t*>(qt.data_ptr()), st.data_ptr<float>(), R, C,
                                            R_pad);
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "quant_rows_cols: launch failed");
}

// w (E, R, C) contiguous, E = 1 for one matrix; q (E, R, C) and qt (E, C, R rounded up to 128) uint8 views of the
// float8 outputs, s (E, ceil(R/128), ceil(C/128)) float32, all preallocated by fp8.py; no qt: no transpose.
void quant_blocks(at::Tensor w, at::Tensor q, std::optional<at::Tensor> qt, at::Tensor s) {
  TORCH_CHECK(w.is_cuda() && w.dim() == 3 && w.is_contiguous() && q.is_contiguous() && s.is_contiguous() &&
                  (!qt || qt->is_contiguous()), "quant_blocks: contiguous CUDA tensors expected, w 3-D");
  const c10::cuda::CUDAGuard guard(w.device());  // launch on w's GPU, its current stream
  const int E = w.size(0), R = w.size(1), C = w.size(2), nb = (R + 127) / 128, kb = (C + 127) / 128;
  TORCH_CHECK(q.sizes() == w.sizes() && s.dim() == 3 && s.size(0) == E && s.size(1) == nb && s.size(2) == kb,
              "quant_blocks: q must be (E, R, C), s (E, ceil(R/128), ceil(C/128))");
  TORCH_CHECK(!qt || (qt->dim() == 3 && qt->size(0) == E && qt->size(1) == C && qt->size(2) == nb * 128),
              "quant_blocks: qt must be (E, C, R rounded up to 128)");
  TORCH_CHECK(aligned(w, 16), "quant_blocks: w must be 16-byte aligned");
  TORCH_CHECK(aligned(q, 4) && (!qt || aligned(*qt, 4)),
              "quant_blocks: q and qt must be 4-byte aligned (4-byte stores)");
  TORCH_CHECK(nb <= 65535 && E <= 65535, "quant_blocks: at most 65535 row blocks and 65535 matrices (grid limits)");
  if (!E || !R || !C) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid(kb, nb, E);
  auto qp = reinterpret_cast<uint8_t*>(q.data_ptr());
  auto qtp = qt ? reinterpret_cast<uint8_t*>(qt->data_ptr()) : nullptr;
  if (w.scalar_type() == at::kBFloat16)
    fp8q::blocks<<<grid, 256, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(w.data_ptr()), qp, qtp,
                                           s.data_ptr<float>(), R, C, nb * 128);
  else if (w.scalar_type() == at::kFloat)
    fp8q::blocks<<<grid, 256, 0, stream>>>(w.data_ptr<float>(), qp, qtp, s.data_ptr<float>(), R, C, nb * 128);
  else
    TORCH_CHECK(false, "quant_blocks: w must be bfloat16 or float32");
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "quant_blocks: launch failed");
}
