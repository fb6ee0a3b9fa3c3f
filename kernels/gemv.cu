// gemv.cu: skinny matrix products for decoding, out[r, n] = epilogue(sum_k in[r, k] * W[n, k] + bias[n]),
// for the few rows (r < R <= RMAX) a decode step has at small P*B. W is an nn.Linear weight (N, K),
// row-major, so each output reads one contiguous weight row: the kernel streams every weight byte
// once, which is all a bandwidth-bound decode step can hope for. cuBLAS takes over above RMAX rows.
//
// One warp per output n; a lane reads 8 consecutive weights (one 16-byte load in bf16) per step of
// 256 along K and multiplies them with the same 8 inputs of every row; a warp reduction finishes.
// Prologue options: LayerNorm of the fp32 residual rows, computed by every block into shared
// memory (R * K floats, one warp per row), so no separate LayerNorm launch is needed.
// Epilogues: store elem_t | GELU (erf form, like nn.GELU) then store | add into the fp32 residual | store fp32.
//
// Launch (all four kernels): grid ceil(N / 8), block 256 (8 warps = 8 outputs per block),
//   dynamic shared memory R * K * 4 bytes for the *_ln_* kernels (the wrapper keeps it <= 48 KB), 0 otherwise.
// Limits: R <= RMAX; K % 8 == 0; W, in and x 16-byte aligned (bf16 and fp32 alike) with rows of K elements.

// CHUNKS: 16-byte weight loads in flight per lane. The per-layer GEMVs have few outputs (a few hundred
// warps on the whole GPU), so they need many loads per warp in flight (4: K = 768 in one round, K = 3072
// in three); the LM head has 50k outputs and is better served by the occupancy of a lean kernel (1).
template <bool LN_IN, int EPI, int CHUNKS>  // EPI: 0 store elem_t, 1 GELU + store elem_t, 2 add into fp32 out, 3 store fp32
__device__ __forceinline__ void gemv_body(
    const float* __restrict__ x,      // LN_IN: (R, K) fp32 rows to normalise
    const float* __restrict__ ln_w,   // LN_IN: (K,)
    const float* __restrict__ ln_b,   // LN_IN: (K,)
    const elem_t* __restrict__ in,    // !LN_IN: (R, K)
    const elem_t* __restrict__ W,     // (N, K)
    const elem_t* __restrict__ bias,  // (N,) or nullptr
    elem_t* __restrict__ out_e,       // EPI 0, 1: (R, N)
    float* __restrict__ out_f,        // EPI 2, 3: (R, N)
    float* xs,                        // LN_IN: shared memory, R * K floats
    int R, int N, int K) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (LN_IN) {
        for (int r = warp; r < R; r += 8) warp_layernorm_row(x + (long long)r * K, ln_w, ln_b, xs + r * K, K, lane);
        __syncthreads();
    }
    const int n = blockIdx.x * 8 + warp;
    if (n >= N) return;  // no barrier follows
    float acc[RMAX];
#pragma unroll
    for (int r = 0; r < RMAX; r++) acc[r] = 0.f;
    const elem_t* wrow = W + (long long)n * K;
    // CHUNKS weight loads per lane are issued before any is used: a decode GEMV is latency-bound
    // (few bytes per warp), so the number of loads in flight, not the arithmetic, sets its speed
    for (int k0 = lane * 8; k0 < K; k0 += 256 * CHUNKS) {
        float wc[CHUNKS][8];
#pragma unroll
        for (int c = 0; c < CHUNKS; c++)
            if (k0 + c * 256 < K) load8(wrow + k0 + c * 256, wc[c]);
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            const int k = k0 + c * 256;
            if (k >= K) break;
            const float* wf = wc[c];
#pragma unroll
            for (int r = 0; r < RMAX; r++) {
                if (r < R) {
                    float xf[8];
                    if (LN_IN) {
                        const f32x4 a = *reinterpret_cast<const f32x4*>(xs + r * K + k);
                        const f32x4 b = *reinterpret_cast<const f32x4*>(xs + r * K + k + 4);
                        xf[0] = a.a; xf[1] = a.b; xf[2] = a.c; xf[3] = a.d;
                        xf[4] = b.a; xf[5] = b.b; xf[6] = b.c; xf[7] = b.d;
                    } else {
                        load8(in + (long long)r * K + k, xf);
                    }
                    float s = 0.f;
#pragma unroll
                    for (int i = 0; i < 8; i++) s += wf[i] * xf[i];
                    acc[r] += s;
                }
            }
        }
    }
    const float bn = bias ? to_f32(bias[n]) : 0.f;
#pragma unroll
    for (int r = 0; r < RMAX; r++) {
        if (r < R) {  // R is the same for the whole warp: the shuffles inside stay convergent
            float v = warp_sum(acc[r]) + bn;
            if (lane == 0) {
                const long long o = (long long)r * N + n;
                if (EPI == 0) out_e[o] = from_f32(v);
                if (EPI == 1) out_e[o] = from_f32(0.5f * v * (1.f + erff(v * 0.70710678118654752f)));
                if (EPI == 2) out_f[o] += v;
                if (EPI == 3) out_f[o] = v;
            }
        }
    }
}

// gemv_ln_store: out = LayerNorm(x) @ W^T + bias, stored as elem_t (the qkv projection after ln_1).
extern "C" __global__ void __launch_bounds__(256) gemv_ln_store(
    const float* __restrict__ x, const float* __restrict__ ln_w, const float* __restrict__ ln_b,
    const elem_t* __restrict__ W, const elem_t* __restrict__ bias, elem_t* __restrict__ out,
    int R, int N, int K) {
    DYNAMIC_SHARED(float, xs);
    gemv_body<true, 0, 4>(x, ln_w, ln_b, nullptr, W, bias, out, nullptr, xs, R, N, K);
}

// gemv_ln_gelu: out = GELU(LayerNorm(x) @ W^T + bias), stored as elem_t (the MLP's c_fc after ln_2).
extern "C" __global__ void __launch_bounds__(256) gemv_ln_gelu(
    const float* __restrict__ x, const float* __restrict__ ln_w, const float* __restrict__ ln_b,
    const elem_t* __restrict__ W, const elem_t* __restrict__ bias, elem_t* __restrict__ out,
    int R, int N, int K) {
    DYNAMIC_SHARED(float, xs);
    gemv_body<true, 1, 4>(x, ln_w, ln_b, nullptr, W, bias, out, nullptr, xs, R, N, K);
}

// gemv_add: x += in @ W^T + bias into the fp32 residual stream (attention and MLP c_proj).
extern "C" __global__ void __launch_bounds__(256) gemv_add(
    const elem_t* __restrict__ in, const elem_t* __restrict__ W, const elem_t* __restrict__ bias,
    float* __restrict__ x, int R, int N, int K) {
    gemv_body<false, 2, 4>(nullptr, nullptr, nullptr, in, W, bias, nullptr, x, nullptr, R, N, K);
}

// gemv_f32: out = in @ W^T in fp32, no bias (the LM head: logits come out in float32 directly).
extern "C" __global__ void __launch_bounds__(256) gemv_f32(
    const elem_t* __restrict__ in, const elem_t* __restrict__ W, float* __restrict__ out,
    int R, int N, int K) {
    gemv_body<false, 3, 1>(nullptr, nullptr, nullptr, in, W, nullptr, nullptr, out, nullptr, R, N, K);
}
