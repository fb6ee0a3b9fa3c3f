// common.cuh: element types, conversions and warp reductions shared by every kernel in kernels/.
//
// The wrapper (kernels/fused.py) builds ONE NVRTC program per (dtype, head_dim) by concatenating
// a #define preamble, this file and every kernels/*.cu file. NVRTC is not given usable CUDA
// headers on a bare machine, so nothing here #includes anything: bf16 is stored as a raw
// unsigned short and converted by bit manipulation (round-to-nearest-even, like PyTorch).
//
// The preamble defines:
//   ELEM_BF16 or ELEM_F32   the storage type of weights, activations and the KV cache
//   HEAD_DIM                attention head size, a multiple of 32, at most 256
//   RMAX                    most rows a GEMV kernel handles (its accumulators live in registers)

#if defined(ELEM_BF16)
typedef unsigned short elem_t;
#elif defined(ELEM_F32)
typedef float elem_t;
#else
#error "define ELEM_BF16 or ELEM_F32"
#endif

#define NEG_INF __int_as_float(0xff800000)

// `extern __shared__ type name[]`: the dynamic shared memory of a launch. A macro, because C++ cannot declare
// that at block scope: the tests compile this same text with g++ and define it there (tests/cuda_cpu.h).
#ifndef DYNAMIC_SHARED
#define DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// 16-byte aligned bundles for vector loads (own types: no vector_types.h under NVRTC)
struct alignas(16) u32x4 { unsigned int a, b, c, d; };
struct alignas(16) f32x4 { float a, b, c, d; };

__device__ __forceinline__ float bf16_to_f32(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }

__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)0x7fc0;  // NaN stays a (quiet) NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                      // round to nearest, ties to even
    return (unsigned short)(u >> 16);
}

#if defined(ELEM_BF16)
__device__ __forceinline__ float to_f32(elem_t v) { return bf16_to_f32(v); }
__device__ __forceinline__ elem_t from_f32(float f) { return f32_to_bf16(f); }
// 8 consecutive elements starting at p (p must be 16-byte aligned) -> f[0..8)
__device__ __forceinline__ void load8(const elem_t* p, float* f) {
    u32x4 v = *reinterpret_cast<const u32x4*>(p);
    unsigned int w[4] = {v.a, v.b, v.c, v.d};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);           // low half is the lower address (little endian)
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
#else
__device__ __forceinline__ float to_f32(elem_t v) { return v; }
__device__ __forceinline__ elem_t from_f32(float f) { return f; }
// 8 consecutive elements starting at p (p must be 16-byte aligned: two 16-byte loads) -> f[0..8)
__device__ __forceinline__ void load8(const elem_t* p, float* f) {
    f32x4 v0 = reinterpret_cast<const f32x4*>(p)[0];
    f32x4 v1 = reinterpret_cast<const f32x4*>(p)[1];
    f[0] = v0.a; f[1] = v0.b; f[2] = v0.c; f[3] = v0.d;
    f[4] = v1.a; f[5] = v1.b; f[6] = v1.c; f[7] = v1.d;
}
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// LayerNorm of one row of n floats by one warp: two passes (mean, then centred variance) in fp32,
// biased variance and eps 1e-5 like F.layer_norm. Writes w * (x - mean) * rstd + b to out.
__device__ __forceinline__ void warp_layernorm_row(const float* x, const float* w, const float* b,
                                                   float* out, int n, int lane) {
    float s = 0.f;
    for (int k = lane; k < n; k += 32) s += x[k];
    const float mean = warp_sum(s) / (float)n;
    float v = 0.f;
    for (int k = lane; k < n; k += 32) { float d = x[k] - mean; v += d * d; }
    const float rstd = 1.0f / sqrtf(warp_sum(v) / (float)n + 1e-5f);  // IEEE sqrt and divide
    for (int k = lane; k < n; k += 32) out[k] = (x[k] - mean) * rstd * w[k] + b[k];
}
