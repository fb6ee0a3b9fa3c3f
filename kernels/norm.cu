// norm.cu: the token embedding and the stand-alone LayerNorm of the decode step.

// embed: x[r, c] = wte[tok[r % B], c] + wpe[*pos, c] in fp32, for all R = P*B rows (stream-major:
// every stream gets the same input row, arXiv 2505.10475 section 2). The position comes from device memory,
// so one captured CUDA graph serves every decode step.
// Launch: grid (ceil(C / 256), R), block 256. Limits: token ids must be < vocab (not checked).
extern "C" __global__ void __launch_bounds__(256) embed(
    const long long* __restrict__ tok,  // (B,) this step's tokens
    const int* __restrict__ pos,        // device scalar: position of this step's token
    const elem_t* __restrict__ wte,     // (vocab, C)
    const elem_t* __restrict__ wpe,     // (block_size, C)
    float* __restrict__ x,              // (R, C) out: the fp32 residual stream
    int B, int C) {
    const int r = blockIdx.y;
    const int c = blockIdx.x * 256 + threadIdx.x;
    if (c >= C) return;
    const long long t = tok[r % B];
    x[(long long)r * C + c] = to_f32(wte[t * C + c]) + to_f32(wpe[(long long)(*pos) * C + c]);
}

// layernorm: out[r, :] = LayerNorm(x[r, :]) * w + b, fp32 in, elem_t out; one warp per row.
// Used before cuBLAS matmuls (rows > RMAX) and as the final ln_f.
// Launch: grid ceil(R / 8), block 256 (8 warps). Limits: none beyond int indexing.
extern "C" __global__ void __launch_bounds__(256) layernorm(
    const float* __restrict__ x,   // (R, C)
    const float* __restrict__ w,   // (C,)
    const float* __restrict__ b,   // (C,)
    elem_t* __restrict__ out,      // (R, C)
    int R, int C) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.x * 8 + warp;
    if (r >= R) return;
    const float* xr = x + (long long)r * C;
    // two-pass statistics straight from global memory (the row is tiny and stays in L1)
    float s = 0.f;
    for (int k = lane; k < C; k += 32) s += xr[k];
    const float mean = warp_sum(s) / (float)C;
    float v = 0.f;
    for (int k = lane; k < C; k += 32) { float d = xr[k] - mean; v += d * d; }
    const float rstd = 1.0f / sqrtf(warp_sum(v) / (float)C + 1e-5f);
    elem_t* o = out + (long long)r * C;
    for (int k = lane; k < C; k += 32) o[k] = from_f32((xr[k] - mean) * rstd * w[k] + b[k]);
}
