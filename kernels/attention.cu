// attention.cu: decode attention of one new token per row, for all P*B rows and all heads in ONE launch.
//
// attn_decode: row r (stream s = r / B, rows stream-major), query head h, kv head hk = h / (H / Hkv).
// The row's context is [prefix of stream s (n_pre slots, no position) | its pos cached tokens | this
// step's own key/value], S = n_pre + pos + 1 keys. The prefix is indexed straight from the stream's
// (P, Hkv, n_pre, HEAD_DIM) tensor: it is never copied per batch row. The new key/value are read from
// the qkv projection and, by split 0 of the first query head of each kv head, written into the cache
// at slot pos (no other block reads that slot in this launch, so there is no race).
// pos is read from device memory: one captured CUDA graph serves every step.
//
// Flash-decoding: the context is cut into nsplit contiguous pieces of `per` keys (a multiple of 32),
// one block each, so a batch-1 step still puts many blocks on the GPU. Within a block each warp takes
// 32 keys at a time (one key per lane for q.k, then every lane accumulates its HEAD_DIM/32 output dims
// over the 32 keys) with an online softmax (running max m, running sum l, rescaled accumulator).
// The warps merge in shared memory; with nsplit > 1 each block writes (acc, m, l) to `part`, and the
// last block of a (row, head) to finish (atomic ticket in `counters`, threadfence-reduction pattern)
// merges the partials of the n_active splits that hold keys (blocks past them return at once) and
// writes the output, then resets its counter to 0. So there is no
// separate combine launch. counters must be zero before the first launch.
//
// Launch: grid (nsplit, H, R), block 128 (ATT_WARPS = 4 warps), no dynamic shared memory.
// Limits: HEAD_DIM % 32 == 0 and <= 256; Hkv divides H; pos + 1 <= Tmax; part holds R*H*nsplit*(HEAD_DIM+2) floats.
#define ATT_WARPS 4
#define DPL (HEAD_DIM / 32)  // output dims per lane

// Row j of the context: prefix slot, cached token, or this step's fresh key/value.
__device__ __forceinline__ const elem_t* ctx_row(int j, const elem_t* pre, const elem_t* cache,
                                                 const elem_t* fresh, int n_pre, int pos) {
    if (j < n_pre) return pre + (long long)j * HEAD_DIM;
    if (j < n_pre + pos) return cache + (long long)(j - n_pre) * HEAD_DIM;
    return fresh;
}

extern "C" __global__ void __launch_bounds__(128) attn_decode(
    const elem_t* __restrict__ qkv,       // (R, (H + 2*Hkv) * HEAD_DIM): q | k | v of this step
    const elem_t* __restrict__ prefix_k,  // (P, Hkv, n_pre, HEAD_DIM) this layer's; unused if n_pre == 0
    const elem_t* __restrict__ prefix_v,
    elem_t* cache_k,                      // (R, Hkv, Tmax, HEAD_DIM) this layer's real-token cache
    elem_t* cache_v,
    const int* __restrict__ pos_ptr,      // device scalar: real tokens cached before this step
    float* __restrict__ part,             // (R, H, nsplit, HEAD_DIM + 2) workspace: acc | m | l
    unsigned int* __restrict__ counters,  // (R, H), zero at rest
    elem_t* __restrict__ out,             // (R, H * HEAD_DIM)
    int B, int H, int Hkv, int n_pre, int Tmax, int nsplit, float scale) {
    __shared__ float q_s[HEAD_DIM];
    __shared__ float m_s[ATT_WARPS], l_s[ATT_WARPS];
    __shared__ float acc_s[ATT_WARPS][HEAD_DIM];
    __shared__ int last_s;
    const int split = blockIdx.x, h = blockIdx.y, r = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int group = H / Hkv, hk = h / group, s = r / B;
    const int pos = *pos_ptr;
    const int S = n_pre + pos + 1;
    const long long qkv_row = (long long)r * (H + 2 * Hkv) * HEAD_DIM;
    const elem_t* q = qkv + qkv_row + h * HEAD_DIM;
    const elem_t* k_new = qkv + qkv_row + (H + hk) * HEAD_DIM;
    const elem_t* v_new = k_new + Hkv * HEAD_DIM;
    const long long pre_off = ((long long)s * Hkv + hk) * n_pre * HEAD_DIM;
    const long long cache_off = ((long long)r * Hkv + hk) * Tmax * HEAD_DIM;

    if (split == 0 && h % group == 0) {  // append this step's key/value to the cache, once per kv head
        for (int d = tid; d < HEAD_DIM; d += 128) {
            cache_k[cache_off + (long long)pos * HEAD_DIM + d] = k_new[d];
            cache_v[cache_off + (long long)pos * HEAD_DIM + d] = v_new[d];
        }
    }
    for (int d = tid; d < HEAD_DIM; d += 128) q_s[d] = to_f32(q[d]) * scale;
    __syncthreads();

    const int per = (((S + nsplit - 1) / nsplit) + 31) & ~31;
    const int n_active = (S + per - 1) / per;  // splits that hold keys; rounding per up can leave the rest empty
    if (split >= n_active) return;              // the whole block returns: no later barrier waits for it
    const int s0 = split * per;
    const int s1 = min(S, s0 + per);
    float m = NEG_INF, l = 0.f, acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[i] = 0.f;
    for (int base = s0 + warp * 32; base < s1; base += ATT_WARPS * 32) {
        const int j = base + lane;
        float score = NEG_INF;
        if (j < s1) {
            const elem_t* kr = ctx_row(j, prefix_k + pre_off, cache_k + cache_off, k_new, n_pre, pos);
            float dot = 0.f;
#pragma unroll
            for (int d = 0; d < HEAD_DIM; d += 8) {
                float kf[8];
                load8(kr + d, kf);
#pragma unroll
                for (int i = 0; i < 8; i++) dot += q_s[d + i] * kf[i];
            }
            score = dot;
        }
        const float m_new = fmaxf(m, warp_max(score));  // finite: lane 0's key is always valid
        const float alpha = expf(m - m_new);            // 0 on the first chunk (m = -inf)
        const float p = (j < s1) ? expf(score - m_new) : 0.f;
        l = l * alpha + warp_sum(p);
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] *= alpha;
        // p.v over these keys, 8 value rows at a time, all 8 loaded before any is used: one memory
        // round trip per 8 keys instead of one per key (a key-by-key loop was latency-bound)
        const int n_valid = min(32, s1 - base);  // the same for the whole warp
        for (int j0 = 0; j0 < n_valid; j0 += 8) {
            float vf[8][DPL];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int jj = min(j0 + u, n_valid - 1);  // past the end: a valid row, weighted by p = 0
                const elem_t* vr = ctx_row(base + jj, prefix_v + pre_off, cache_v + cache_off, v_new, n_pre, pos);
#pragma unroll
                for (int i = 0; i < DPL; i++) vf[u][i] = to_f32(vr[lane * DPL + i]);
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const float pj = __shfl_sync(0xffffffffu, p, j0 + u);  // 0 for lanes past s1
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[i] += pj * vf[u][i];
            }
        }
        m = m_new;
    }

    // merge the warps of this block (a warp that saw no key has m = -inf, l = 0, acc = 0)
    if (lane == 0) { m_s[warp] = m; l_s[warp] = l; }
#pragma unroll
    for (int i = 0; i < DPL; i++) acc_s[warp][lane * DPL + i] = acc[i];
    __syncthreads();
    float M = NEG_INF;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, m_s[w]);
    float L = 0.f, f[ATT_WARPS];
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) { f[w] = (m_s[w] == NEG_INF) ? 0.f : expf(m_s[w] - M); L += l_s[w] * f[w]; }

    if (n_active == 1) {  // the block saw the whole context: finish here
        for (int d = tid; d < HEAD_DIM; d += 128) {
            float a = 0.f;
#pragma unroll
            for (int w = 0; w < ATT_WARPS; w++) a += acc_s[w][d] * f[w];
            out[((long long)r * H + h) * HEAD_DIM + d] = from_f32(a / L);
        }
        return;
    }

    float* mine = part + (((long long)r * H + h) * nsplit + split) * (HEAD_DIM + 2);
    for (int d = tid; d < HEAD_DIM; d += 128) {
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) a += acc_s[w][d] * f[w];
        mine[d] = a;
    }
    if (tid == 0) { mine[HEAD_DIM] = M; mine[HEAD_DIM + 1] = L; }  // an empty split: M = -inf, L = 0
    __threadfence();  // make this block's partial visible device-wide before taking a ticket
    __syncthreads();
    if (tid == 0) last_s = (atomicAdd(counters + (long long)r * H + h, 1u) == (unsigned int)(n_active - 1));
    __syncthreads();
    if (!last_s) return;

    // the last block of this (row, head): merge all partials; __ldcg reads L2, never a stale L1 line
    __threadfence();
    const float* all = part + ((long long)r * H + h) * nsplit * (HEAD_DIM + 2);
    float Mg = NEG_INF;
    for (int i = 0; i < n_active; i++) Mg = fmaxf(Mg, __ldcg(all + i * (HEAD_DIM + 2) + HEAD_DIM));
    float Lg = 0.f;
    for (int i = 0; i < n_active; i++) {
        const float mi = __ldcg(all + i * (HEAD_DIM + 2) + HEAD_DIM);
        if (mi != NEG_INF) Lg += __ldcg(all + i * (HEAD_DIM + 2) + HEAD_DIM + 1) * expf(mi - Mg);
    }
    for (int d = tid; d < HEAD_DIM; d += 128) {
        float a = 0.f;
        for (int i = 0; i < n_active; i++) {
            const float mi = __ldcg(all + i * (HEAD_DIM + 2) + HEAD_DIM);
            if (mi != NEG_INF) a += __ldcg(all + i * (HEAD_DIM + 2) + d) * expf(mi - Mg);
        }
        out[((long long)r * H + h) * HEAD_DIM + d] = from_f32(a / Lg);
    }
    if (tid == 0) counters[(long long)r * H + h] = 0u;  // ready for the next layer / step
}
