// One transformer layer of a decode step as ONE persistent kernel (llama-like layers; see cupy_layer.py
// for the launcher and the torch reference this kernel implements).
//
// Grid = one CTA per SM, all co-resident. Five phases, separated by grid barriers made of global
// atomic counters (bar[0..3]); before spinning at a barrier each CTA issues prefetch.global.L2 for
// the weight rows it reads in the next phase, so they stream in while the barrier completes.
//   P1 RMSNorm(x) (per CTA, redundantly) -> QKV rows in RoPE pairs (+bias) -> RoPE -> q, k/v cache
//   P2 decode attention (m, kv head, split) items, online softmax; the last split to finish a
//      (m, kv head) combines the partials (split-K "last arriver" counter) -> attn (M, NH*HD)
//   P3 attn -> smem; o_proj rows (+bias) + residual into x in place
//   P4 RMSNorm(x) -> gate/up row pairs -> act = rnd(rnd(silu(g)) * u)
//   P5 act -> smem; down rows (+bias) + residual into x in place
// Counters are reset by the kernel itself (the last CTA to exit), so graph replays need no host.
// Compile-time model constants come as #defines prepended by the launcher: DT_BF16, MROWS, H, I, NH,
// NKV, HD, WARPS, HAS_BIAS_QKV, HAS_BIAS_O, HAS_BIAS_GU, HAS_BIAS_D.
// No CUDA headers: conversions are inline PTX (NVRTC needs no include path).
//
// Optional BRAID_PHASE_TIMES (diagnostics only; the default build has neither the extra argument nor
// any timer read beyond the barrier timeout's): the kernel takes one more argument, `ptimes`
// (gridDim.x, PT_SLOTS) uint64, and thread 0 of each CTA writes %globaltimer (ns) there:
//   [0] entry, [1 + 2k] arrival at barrier k (after the CTA's __syncthreads), [2 + 2k] release of
//   barrier k (after the spin), [PT_SLOTS - 1] exit (after the last __syncthreads), k = 0..3.

#define G (NH / NKV)
#define THREADS (WARPS * 32)
#define HALF (HD / 2)
#define NQKV ((NH + 2 * NKV) * HD)
#define VPL (HD / 32)            // elements of a V row per lane in the PV product
#define SV_ROW (HD + 8)          // smem row of a staged V row (padded: 16-byte aligned, fewer conflicts)
#define NEG_INF (-__int_as_float(0x7f800000) * 1.0f)
#define LOG2E 1.4426950408889634f
#define BAR_ERR 6                // bar[6] != 0: a barrier timed out (the launcher falls back)
#define BAR_EXIT 4
#define BAR_CNT 8                // bar[8 + m * NKV + g]: split counters of the attention combine
#define SPIN_TIMEOUT_NS 2000000000ull
#define NUM_BARRIERS 4
#define PT_SLOTS (2 * NUM_BARRIERS + 2)

#ifdef BRAID_PHASE_TIMES
#define PT_PARAM , unsigned long long* ptimes
#define PT_PASS , ptimes
#define PT_MARK(i) do { if (threadIdx.x == 0) ptimes[(size_t)blockIdx.x * PT_SLOTS + (i)] = now_ns(); } while (0)
#else
#define PT_PARAM
#define PT_PASS
#define PT_MARK(i) do { } while (0)
#endif

typedef unsigned short dt_t;

__device__ __forceinline__ float to_f(dt_t v) {
#if DT_BF16
  return __uint_as_float(((unsigned)v) << 16);
#else
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
#endif
}
__device__ __forceinline__ dt_t from_f(float f) {
  dt_t r;
#if DT_BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
#endif
  return r;
}
// HF's cast points: materialise a value in the model dtype (asm: the compiler cannot fold it away)
__device__ __forceinline__ float rnd(float f) { return to_f(from_f(f)); }

__device__ __forceinline__ void unpack8(uint4 v, float* f) {
  unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    f[2 * i] = to_f((dt_t)(w[i] & 0xffffu));
    f[2 * i + 1] = to_f((dt_t)(w[i] >> 16));
  }
}
// weights: never written while the kernel runs -> non-coherent path, no L1 allocation (streamed)
__device__ __forceinline__ uint4 ld_w(const dt_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
// data other CTAs write during this kernel (x, q, k/v, partials, act): L2 only (.cg), never a stale L1
__device__ __forceinline__ uint4 ld_cg4(const void* p) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned ld_cg1(const void* p) {
  unsigned v; asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ dt_t ld_cg_dt(const dt_t* p) {
  unsigned short v; asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ float ld_cg_f(const float* p) { return __uint_as_float(ld_cg1(p)); }
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}
__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
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

// Grid barrier number `k` (0..3): arrive on bar[k], spin until every CTA has. Writes of this CTA
// before it are visible to every CTA after it (threadfence + release/acquire on the counter).
__device__ void grid_barrier(unsigned* bar, int k PT_PARAM) {
  __threadfence();
  __syncthreads();
  PT_MARK(1 + 2 * k);
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(bar + k, 1u);
    unsigned long long t0 = now_ns();
    unsigned n;
    while (true) {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(n) : "l"(bar + k) : "memory");
      if (n >= gridDim.x) break;
      if (ld_cg1(bar + BAR_ERR) != 0u) break;
      if (now_ns() - t0 > SPIN_TIMEOUT_NS) { atomicExch(bar + BAR_ERR, 1u); break; }
    }
    PT_MARK(2 + 2 * k);
    __threadfence();
  }
  __syncthreads();
}

// The weight rows of unit u of a GEMV phase (a unit = two rows one warp computes together).
//   phase 0 (qkv): RoPE pair (hh*HD + i, hh*HD + i + HALF), u = hh*HALF + i
//   phase 1 (gate/up): (j, I + j)
//   phase 2 (o_proj, down): (2u, 2u + 1)
__device__ __forceinline__ void unit_rows(int phase, int u, int* r0, int* r1) {
  if (phase == 0) { int hh = u / HALF, i = u % HALF; *r0 = hh * HD + i; *r1 = *r0 + HALF; }
  else if (phase == 1) { *r0 = u; *r1 = I + u; }
  else { *r0 = 2 * u; *r1 = 2 * u + 1; }
}

// Prefetch into L2 every weight line this CTA reads in a GEMV phase. Units go to CTAs round robin
// (u = blockIdx.x + j * gridDim.x), so the work is spread over all SMs even when units are few.
__device__ void prefetch_phase(const dt_t* W, int K, int n_units, int phase) {
  if (W == 0) return;
  const int lines = (K * 2 + 127) / 128;
  const int mine = (n_units - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
  for (int t = threadIdx.x; t < mine * 2 * lines; t += THREADS) {
    int j = t / (2 * lines), rest = t % (2 * lines);
    int r0, r1;
    unit_rows(phase, (int)blockIdx.x + j * (int)gridDim.x, &r0, &r1);
    int row = (rest < lines) ? r0 : r1;
    prefetch_l2((const char*)(W + (size_t)row * K) + (size_t)(rest % lines) * 128);
  }
}

// acc[m][0/1] = sum_k sh[m][k] * W[r0/r1][k], fp32, reduced over the warp (every lane gets the sums).
template <int K>
__device__ __forceinline__ void gemv_pair(const dt_t* __restrict__ W, int r0, int r1, const dt_t* sh,
                                          int lane, float (&acc)[MROWS][2]) {
#pragma unroll
  for (int m = 0; m < MROWS; m++) acc[m][0] = acc[m][1] = 0.f;
  const dt_t* w0 = W + (size_t)r0 * K;
  const dt_t* w1 = W + (size_t)r1 * K;
#pragma unroll 4
  for (int k = lane * 8; k < K; k += 256) {
    float a[8], b[8], xv[8];
    unpack8(ld_w(w0 + k), a);
    unpack8(ld_w(w1 + k), b);
#pragma unroll
    for (int m = 0; m < MROWS; m++) {
      unpack8(*(const uint4*)(sh + m * K + k), xv);
#pragma unroll
      for (int e = 0; e < 8; e++) { acc[m][0] += xv[e] * a[e]; acc[m][1] += xv[e] * b[e]; }
    }
  }
#pragma unroll
  for (int m = 0; m < MROWS; m++) { acc[m][0] = warp_sum(acc[m][0]); acc[m][1] = warp_sum(acc[m][1]); }
}

// sh[m][k] = rnd(rnd(x[m][k] * r_m) * w[k]) (HF Llama RMSNorm), r_m = rsqrt(mean(x[m]^2) + eps);
// every CTA computes it redundantly from x (L2-resident, M*H elements).
__device__ void norm_to_smem(const dt_t* x, const dt_t* __restrict__ nw, float eps, dt_t* sh, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float ss[MROWS];
#pragma unroll
  for (int m = 0; m < MROWS; m++) ss[m] = 0.f;
  for (int v = threadIdx.x; v < H / 8; v += THREADS) {
#pragma unroll
    for (int m = 0; m < MROWS; m++) {
      float f[8];
      unpack8(ld_cg4(x + m * H + v * 8), f);
#pragma unroll
      for (int e = 0; e < 8; e++) ss[m] += f[e] * f[e];
    }
  }
#pragma unroll
  for (int m = 0; m < MROWS; m++) {
    float s = warp_sum(ss[m]);
    if (lane == 0) red[warp * MROWS + m] = s;
  }
  __syncthreads();
  if (threadIdx.x < MROWS) {
    float s = 0.f;
    for (int w = 0; w < WARPS; w++) s += red[w * MROWS + threadIdx.x];
    red[WARPS * MROWS + threadIdx.x] = rsqrtf(s / (float)H + eps);
  }
  __syncthreads();
  for (int v = threadIdx.x; v < H / 8; v += THREADS) {
    float wf[8];
    unpack8(ld_w(nw + v * 8), wf);
#pragma unroll
    for (int m = 0; m < MROWS; m++) {
      float f[8];
      unpack8(ld_cg4(x + m * H + v * 8), f);
      float r = red[WARPS * MROWS + m];
      unsigned o[4];
#pragma unroll
      for (int e = 0; e < 4; e++)
        o[e] = (unsigned)from_f(rnd(f[2 * e] * r) * wf[2 * e]) |
               ((unsigned)from_f(rnd(f[2 * e + 1] * r) * wf[2 * e + 1]) << 16);
      uint4 ov;
      ov.x = o[0]; ov.y = o[1]; ov.z = o[2]; ov.w = o[3];
      *(uint4*)(sh + m * H + v * 8) = ov;
    }
  }
  __syncthreads();
}

// sh[m][:K] = src[m][:K] (written by other CTAs in this kernel: .cg loads)
__device__ void copy_to_smem(const dt_t* src, int K, dt_t* sh) {
  for (int v = threadIdx.x; v < MROWS * K / 8; v += THREADS)
    *(uint4*)(sh + v * 8) = ld_cg4(src + v * 8);
  __syncthreads();
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) braid_layer(
    dt_t* x,                                        // (M, H) residual stream, updated in place
    const dt_t* __restrict__ w_qkv, const dt_t* __restrict__ b_qkv, const dt_t* __restrict__ nw_attn,
    const dt_t* __restrict__ w_o, const dt_t* __restrict__ b_o,
    const dt_t* __restrict__ w_gu, const dt_t* __restrict__ b_gu, const dt_t* __restrict__ nw_mlp,
    const dt_t* __restrict__ w_d, const dt_t* __restrict__ b_d,
    const dt_t* __restrict__ next_w_qkv,            // next layer's qkv (prefetched at the end), or 0
    float eps_attn, float eps_mlp, float scale,
    const dt_t* __restrict__ cos_t, const dt_t* __restrict__ sin_t, long long rope_stride,
    const long long* pos, const long long* slots, const int* kv_lens,
    const signed char* valid, long long valid_stride,
    dt_t* k_cache, dt_t* v_cache, long long s_max,  // (B_max, NKV, s_max, HD) contiguous
    dt_t* q_buf,                                    // (M, NH, HD)
    dt_t* attn,                                     // (M, NH*HD)
    dt_t* act,                                      // (M, I)
    float* ws_ml, float* ws_acc, int num_splits,    // (M, NH, S, 2), (M, NH, S, HD) partials
    unsigned* bar
#ifdef BRAID_PHASE_TIMES
    , unsigned long long* ptimes                    // (gridDim.x, PT_SLOTS) globaltimer stamps
#endif
    ) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  dt_t* sh = (dt_t*)smem_raw;
  __shared__ float red[WARPS * MROWS + MROWS];
  __shared__ int s_flag;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cta = blockIdx.x, grid = gridDim.x;
  PT_MARK(0);

  // ---------------------------------------------------------------- P1: norm + QKV + RoPE + cache
  {
    norm_to_smem(x, nw_attn, eps_attn, sh, red);
    const int n_units = (NH + 2 * NKV) * HALF;
    for (int j = warp; cta + j * grid < n_units; j += WARPS) {
      const int u = cta + j * grid;
      int r0, r1;
      unit_rows(0, u, &r0, &r1);
      float acc[MROWS][2];
      gemv_pair<H>(w_qkv, r0, r1, sh, lane, acc);
      const int hh = u / HALF, i = u % HALF;
#pragma unroll
      for (int m = 0; m < MROWS; m++) {
        if (lane != m) continue;
        float y0 = acc[m][0], y1 = acc[m][1];
#if HAS_BIAS_QKV
        y0 += to_f(b_qkv[r0]); y1 += to_f(b_qkv[r1]);
#endif
        y0 = rnd(y0); y1 = rnd(y1);                 // the projection's output, in the dtype
        if (hh < NH + NKV) {                        // RoPE: x*cos + rotate_half(x)*sin, 3 roundings
          const long long p = pos[m];
          float c0 = to_f(cos_t[p * rope_stride + i]), c1 = to_f(cos_t[p * rope_stride + i + HALF]);
          float s0 = to_f(sin_t[p * rope_stride + i]), s1 = to_f(sin_t[p * rope_stride + i + HALF]);
          float o0 = rnd(rnd(y0 * c0) - rnd(y1 * s0));
          float o1 = rnd(rnd(y1 * c1) + rnd(y0 * s1));
          y0 = o0; y1 = o1;
        }
        if (hh < NH) {
          dt_t* dst = q_buf + ((size_t)m * NH + hh) * HD + i;
          dst[0] = from_f(y0); dst[HALF] = from_f(y1);
        } else {
          const int g = (hh < NH + NKV) ? hh - NH : hh - NH - NKV;
          dt_t* cache = (hh < NH + NKV) ? k_cache : v_cache;
          dt_t* dst = cache + (((size_t)m * NKV + g) * s_max + slots[m]) * HD + i;
          dst[0] = from_f(y0); dst[HALF] = from_f(y1);
        }
      }
    }
    // next phase reads the KV cache rows of this CTA's attention items: prefetch them
    for (int it = cta; it < MROWS * NKV * num_splits; it += grid) {
      const int m = it / (NKV * num_splits), g = (it / num_splits) % NKV, s = it % num_splits;
      const int kv_len = kv_lens[m];
      const int chunk = (((kv_len + num_splits - 1) / num_splits) + 31) / 32 * 32;
      const int lo = s * chunk, hi = min(lo + chunk, kv_len);
      const size_t off = ((size_t)m * NKV + g) * s_max * HD;
      for (int t = threadIdx.x; t < 2 * (hi - lo) * (HD / 64); t += THREADS) {
        const int row = t / (2 * (HD / 64)), part = t % (2 * (HD / 64));
        const dt_t* base = (part & 1) ? v_cache : k_cache;
        prefetch_l2(base + off + (size_t)(lo + row) * HD + (part >> 1) * 64);
      }
    }
  }
  grid_barrier(bar, 0 PT_PASS);

  // ---------------------------------------------------------------- P2: attention partials + combine
  {
    float* sq = (float*)smem_raw;                   // (G, HD) fp32 queries
    float* sp = sq + G * HD;                        // (WARPS, G, 32) rounded probabilities
    dt_t* sv = (dt_t*)(sp + WARPS * G * 32);        // (WARPS, 32, SV_ROW) V rows of a warp's chunk
    float* sw = (float*)sv;                         // (WARPS, G, HD + 2) per-warp (acc, m, l), after
    const int n_items = MROWS * NKV * num_splits;
    for (int it = cta; it < n_items; it += grid) {
      const int m = it / (NKV * num_splits), g = (it / num_splits) % NKV, s = it % num_splits;
      const int kv_len = kv_lens[m];
      const int chunk = (((kv_len + num_splits - 1) / num_splits) + 31) / 32 * 32;
      const int lo = s * chunk, hi = min(lo + chunk, kv_len);
      for (int t = threadIdx.x; t < G * HD; t += THREADS)
        sq[t] = to_f(ld_cg_dt(q_buf + ((size_t)m * NH + g * G) * HD + t));
      __syncthreads();
      const dt_t* kb = k_cache + ((size_t)m * NKV + g) * s_max * HD;
      const dt_t* vb = v_cache + ((size_t)m * NKV + g) * s_max * HD;
      const signed char* vm = valid + (size_t)m * valid_stride;
      float m_run[G], l_run[G], acc[G][VPL];
#pragma unroll
      for (int h = 0; h < G; h++) {
        m_run[h] = NEG_INF; l_run[h] = 0.f;
#pragma unroll
        for (int e = 0; e < VPL; e++) acc[h][e] = 0.f;
      }
      float* spw = sp + warp * G * 32;
      dt_t* svw = sv + warp * 32 * SV_ROW;
      for (int base = lo + warp * 32; base < hi; base += WARPS * 32) {
        // lane = position: scores of the G heads against its K row (16-byte loads, 64 dims a batch)
        const int p = base + lane;
        const bool ok = p < hi && vm[p] != 0;
        const unsigned okm = __ballot_sync(0xffffffffu, ok);
        if (okm == 0u) continue;
        float sc[G];
#pragma unroll
        for (int h = 0; h < G; h++) sc[h] = 0.f;
        if (ok) {
          const dt_t* kr = kb + (size_t)p * HD;
#pragma unroll
          for (int d0 = 0; d0 < HD; d0 += 64) {
            uint4 kv[8];
#pragma unroll
            for (int c = 0; c < 8; c++) kv[c] = ld_cg4(kr + d0 + c * 8);
#pragma unroll
            for (int c = 0; c < 8; c++) {
              float kf[8];
              unpack8(kv[c], kf);
#pragma unroll
              for (int h = 0; h < G; h++)
#pragma unroll
                for (int e = 0; e < 8; e++) sc[h] += sq[h * HD + d0 + c * 8 + e] * kf[e];
            }
          }
        }
        // lane = position: its V row into shared memory (zeros where masked: such rows are never
        // read, they may hold NaN), so the PV product below reads 32 rows without a memory round trip each
        {
          const dt_t* vr = vb + (size_t)p * HD;
#pragma unroll
          for (int d0 = 0; d0 < HD; d0 += 64) {
            uint4 vv[8];
#pragma unroll
            for (int c = 0; c < 8; c++) {
              if (ok) vv[c] = ld_cg4(vr + d0 + c * 8);
              else { vv[c].x = 0u; vv[c].y = 0u; vv[c].z = 0u; vv[c].w = 0u; }
            }
#pragma unroll
            for (int c = 0; c < 8; c++) *(uint4*)(svw + lane * SV_ROW + d0 + c * 8) = vv[c];
          }
        }
#pragma unroll
        for (int h = 0; h < G; h++) {
          const float sl = ok ? sc[h] * scale * LOG2E : NEG_INF;   // log2 domain
          const float m_new = fmaxf(m_run[h], warp_max(sl));        // finite: okm != 0
          const float pr = ok ? exp2f(sl - m_new) : 0.f;
          const float alpha = exp2f(m_run[h] - m_new);              // 0 while m_run = -inf
          l_run[h] = l_run[h] * alpha + warp_sum(pr);
#pragma unroll
          for (int e = 0; e < VPL; e++) acc[h][e] *= alpha;
          m_run[h] = m_new;
          spw[h * 32 + lane] = rnd(pr);             // p in the dtype for the PV product (like flash attn)
        }
        __syncwarp();
#pragma unroll 4
        for (int jj = 0; jj < 32; jj++) {
          float vf[VPL];
          const dt_t* vrow = svw + jj * SV_ROW + lane * VPL;
#if VPL == 4
          const uint2 w2 = *(const uint2*)vrow;
          vf[0] = to_f((dt_t)(w2.x & 0xffffu)); vf[1] = to_f((dt_t)(w2.x >> 16));
          vf[2] = to_f((dt_t)(w2.y & 0xffffu)); vf[3] = to_f((dt_t)(w2.y >> 16));
#else
          const unsigned w1 = *(const unsigned*)vrow;
          vf[0] = to_f((dt_t)(w1 & 0xffffu)); vf[1] = to_f((dt_t)(w1 >> 16));
#endif
#pragma unroll
          for (int h = 0; h < G; h++) {
            const float ph = spw[h * 32 + jj];
#pragma unroll
            for (int e = 0; e < VPL; e++) acc[h][e] += ph * vf[e];
          }
        }
        __syncwarp();
      }
      __syncthreads();                              // sw aliases sv: every warp is done with sv
      // merge the warps' states
#pragma unroll
      for (int h = 0; h < G; h++) {
        float* row = sw + (warp * G + h) * (HD + 2);
#pragma unroll
        for (int e = 0; e < VPL; e++) row[lane * VPL + e] = acc[h][e];
        if (lane == 0) { row[HD] = m_run[h]; row[HD + 1] = l_run[h]; }
      }
      __syncthreads();
      for (int t = threadIdx.x; t < G * HD; t += THREADS) {
        const int h = t / HD, d = t % HD;
        float mx = NEG_INF;
        for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sw[(w * G + h) * (HD + 2) + HD]);
        const float msub = (mx == NEG_INF) ? 0.f : mx;
        float l = 0.f, o = 0.f;
        for (int w = 0; w < WARPS; w++) {
          const float* row = sw + (w * G + h) * (HD + 2);
          const float f = exp2f(row[HD] - msub);
          l += f * row[HD + 1];
          o += f * row[d];
        }
        const int head = g * G + h;
        if (num_splits == 1) {
          attn[(size_t)m * NH * HD + head * HD + d] = from_f(l > 0.f ? o / l : 0.f);
        } else {
          const size_t pidx = ((size_t)m * NH + head) * num_splits + s;
          ws_acc[pidx * HD + d] = o;
          if (d == 0) { ws_ml[pidx * 2] = mx; ws_ml[pidx * 2 + 1] = l; }
        }
      }
      if (num_splits > 1) {                         // the last split of (m, g) to finish combines
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
          __threadfence();
          const unsigned old = atomicAdd(bar + BAR_CNT + m * NKV + g, 1u);
          s_flag = (old == (unsigned)num_splits - 1u);
          if (s_flag) { atomicExch(bar + BAR_CNT + m * NKV + g, 0u); __threadfence(); }
        }
        __syncthreads();
        if (s_flag) {
          for (int t = threadIdx.x; t < G * HD; t += THREADS) {
            const int h = t / HD, d = t % HD;
            const size_t pbase = ((size_t)m * NH + g * G + h) * num_splits;
            float mx = NEG_INF;
            for (int q = 0; q < num_splits; q++) mx = fmaxf(mx, ld_cg_f(ws_ml + (pbase + q) * 2));
            const float msub = (mx == NEG_INF) ? 0.f : mx;
            float l = 0.f, o = 0.f;
            for (int q = 0; q < num_splits; q++) {
              const float f = exp2f(ld_cg_f(ws_ml + (pbase + q) * 2) - msub);
              l += f * ld_cg_f(ws_ml + (pbase + q) * 2 + 1);
              o += f * ld_cg_f(ws_acc + (pbase + q) * HD + d);
            }
            attn[(size_t)m * NH * HD + (g * G + h) * HD + d] = from_f(l > 0.f ? o / l : 0.f);
          }
        }
      }
      __syncthreads();                              // smem reused by the next item
    }
    prefetch_phase(w_o, NH * HD, H / 2, 2);
  }
  grid_barrier(bar, 1 PT_PASS);

  // ---------------------------------------------------------------- P3: o_proj + residual
  {
    copy_to_smem(attn, NH * HD, sh);
    for (int j = warp; cta + j * grid < H / 2; j += WARPS) {
      const int u = cta + j * grid;
      float acc[MROWS][2];
      gemv_pair<NH * HD>(w_o, 2 * u, 2 * u + 1, sh, lane, acc);
#pragma unroll
      for (int m = 0; m < MROWS; m++) {
        if (lane != m) continue;
        float y0 = acc[m][0], y1 = acc[m][1];
#if HAS_BIAS_O
        y0 += to_f(b_o[2 * u]); y1 += to_f(b_o[2 * u + 1]);
#endif
        dt_t* xr = x + m * H + 2 * u;
        xr[0] = from_f(to_f(ld_cg_dt(xr)) + rnd(y0));
        xr[1] = from_f(to_f(ld_cg_dt(xr + 1)) + rnd(y1));
      }
    }
    prefetch_phase(w_gu, H, I, 1);
  }
  grid_barrier(bar, 2 PT_PASS);

  // ---------------------------------------------------------------- P4: norm + gate/up + SiLU * up
  {
    norm_to_smem(x, nw_mlp, eps_mlp, sh, red);
    for (int j = warp; cta + j * grid < I; j += WARPS) {
      const int u = cta + j * grid;
      float acc[MROWS][2];
      gemv_pair<H>(w_gu, u, I + u, sh, lane, acc);
#pragma unroll
      for (int m = 0; m < MROWS; m++) {
        if (lane != m) continue;
        float gg = acc[m][0], uu = acc[m][1];
#if HAS_BIAS_GU
        gg += to_f(b_gu[u]); uu += to_f(b_gu[I + u]);
#endif
        gg = rnd(gg); uu = rnd(uu);
        const float a = rnd(gg / (1.0f + expf(-gg)));   // silu in fp32, materialised in the dtype
        act[(size_t)m * I + u] = from_f(a * uu);
      }
    }
    prefetch_phase(w_d, I, H / 2, 2);
  }
  grid_barrier(bar, 3 PT_PASS);

  // ---------------------------------------------------------------- P5: down + residual
  {
    copy_to_smem(act, I, sh);
    for (int j = warp; cta + j * grid < H / 2; j += WARPS) {
      const int u = cta + j * grid;
      float acc[MROWS][2];
      gemv_pair<I>(w_d, 2 * u, 2 * u + 1, sh, lane, acc);
#pragma unroll
      for (int m = 0; m < MROWS; m++) {
        if (lane != m) continue;
        float y0 = acc[m][0], y1 = acc[m][1];
#if HAS_BIAS_D
        y0 += to_f(b_d[2 * u]); y1 += to_f(b_d[2 * u + 1]);
#endif
        dt_t* xr = x + m * H + 2 * u;
        xr[0] = from_f(to_f(ld_cg_dt(xr)) + rnd(y0));
        xr[1] = from_f(to_f(ld_cg_dt(xr + 1)) + rnd(y1));
      }
    }
    prefetch_phase(next_w_qkv, H, (NH + 2 * NKV) * HALF, 0);
  }
  // exit: the last CTA out resets the barrier counters (every CTA has passed every barrier by then)
  __syncthreads();
  PT_MARK(PT_SLOTS - 1);
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned old = atomicAdd(bar + BAR_EXIT, 1u);
    if (old == gridDim.x - 1u) {
      for (int k = 0; k < 4; k++) atomicExch(bar + k, 0u);
      atomicExch(bar + BAR_EXIT, 0u);
    }
  }
}
