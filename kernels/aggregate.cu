// aggregate.cu: the end of ParScale's aggregation (PARSCALE.md 1.3) for one position per batch row.
//
// agg_mix: w = softmax_p(z[b, :]) in float32, smoothed to w * keep + floor (keep = 1 - eps,
// floor = eps / P, both computed in double by the wrapper), then out[b, c] = sum_p w_p * hid[p*B + b, c]
// (rows stream-major). z are the logits of the aggregator's two small Linears, which stay torch matmuls.
// Launch: grid (ceil(C / 256), B), block 256; every thread recomputes the P weights (P <= 8 values).
// Limits: P <= PMAX = 8.
#define PMAX 8
extern "C" __global__ void __launch_bounds__(256) agg_mix(
    const elem_t* __restrict__ z,    // (B, P) aggregator logits
    const elem_t* __restrict__ hid,  // (P*B, C) final hidden states (after ln_f)
    elem_t* __restrict__ out,        // (B, C) mixed hidden states for the LM head
    int B, int P, int C, float keep, float floor_) {
    const int b = blockIdx.y;
    const int c = blockIdx.x * 256 + threadIdx.x;
    float w[PMAX];
    float mx = NEG_INF;
#pragma unroll
    for (int p = 0; p < PMAX; p++) {
        if (p < P) { w[p] = to_f32(z[b * P + p]); mx = fmaxf(mx, w[p]); }
    }
    float sum = 0.f;
#pragma unroll
    for (int p = 0; p < PMAX; p++) {
        if (p < P) { w[p] = expf(w[p] - mx); sum += w[p]; }
    }
    if (c >= C) return;
    float acc = 0.f;
#pragma unroll
    for (int p = 0; p < PMAX; p++) {
        if (p < P) acc += ((w[p] / sum) * keep + floor_) * to_f32(hid[((long long)p * B + b) * C + c]);
    }
    out[(long long)b * C + c] = from_f32(acc);
}
