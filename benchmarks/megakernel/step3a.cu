// Rung 3a of issue #25's ladder: the GEMV chain of a whole decode step in ONE persistent kernel.
//
// A benchmark prototype, not the product. Batch 1, bf16 weights and activations, fp32 accumulation,
// the cast points of the Triton step (see rung3a.py's reference). One CTA per SM (grid = SM count).
//
// Per layer l (op id = 4 l + kind; lm_head = 4 NL; every op depends on op id - 1 only):
//   kind 0 qkv     h = rmsnorm(x_l) (every CTA recomputes the statistic from x in global memory),
//                  qkv_out[l] = rnd(h @ Wqkv^T + b)                                  (NQKV rows, K = H)
//   kind 1 o_proj  ATTENTION IS A STUB: a = the v part of qkv_out[l] broadcast to the NH query heads
//                  (head h reads kv head h / (NH / NKV)); x_attn[l] = rnd(x_l + rnd(a @ Wo^T))  (H rows)
//   kind 2 gate_up h = rmsnorm(x_attn[l]); [g|u] = rnd(h @ Wgu^T) with Wgu INTERLEAVED on the host
//                  (row 2 j = gate row j, row 2 j + 1 = up row j: a whole-row tile holds whole pairs);
//                  act[l][j] = rnd(rnd(silu(g_j)) * u_j)                             (2 IM rows, K = H)
//   kind 3 down    x_out[l] = rnd(x_attn[l] + rnd(act[l] @ Wd^T))                    (H rows, K = IM)
//   lm_head        h = rmsnorm(x_out[NL-1]) (final norm); logits = rnd(h @ E^T) (VOCAB rows, tied E);
//                  per-CTA argmax partials, the last CTA to arrive reduces them to the greedy token.
//
// Weights: warp 0 is the producer of rung 1 (stream_floor.cu: same ring of shared-memory pages, same
// full/empty mbarrier protocol, one cp.async.bulk per tile, here one tile per page): it walks this SM's
// tiles in step order and never waits on activations, only on free pages. Warps 1..CWARPS are the
// consumers: per page they wait "full", compute the page's rows (whole rows of one op: tile =
// rows [row0, row0 + nrows) of the op), release the page ("empty", one arrive per warp) and store the
// outputs. At the first page of an op on this SM they run the op's prologue: wait for the op's input
// (the arrival counter of op - 1), then stage the input vector in shared memory (norm, broadcast or
// copy). After the SM's last page of an op, thread 0 of the consumers release-adds 1 to the op's counter.
//
// Page work split: the page's dot rows (nrows, or 2 nrows for gate_up) are cut into P equal K-parts,
// P = max(1, NHW / rows), NHW = 2 CWARPS half-warps; item i = (row i / P, part i % P) goes to half-warp
// i % NHW; each half-warp reduces its partial (4 shuffles) into red[page parity][i]; after a consumer
// barrier thread t < nrows sums its row's parts and runs the epilogue (bias, rounding, act, residual).
//
// Epochs: counters are never reset. gen[0] is read by every CTA at its start; op k's counter must reach
// (gen + 1) * tgt[k] (tgt = CTAs holding tiles of op k, from the host); the final arrival counter
// (cnt[NOPS * 32]) tells the last CTA, which writes the token and then bumps gen (every CTA has read gen
// before it arrives there). So back-to-back launches and CUDA-graph replays need no reset kernel.
// Comparisons are wrap-safe differences.
//
// Bounded waits: every spin (mbarrier phase, counter) gives up after SPIN_NS of %globaltimer: err[0] =
// 1 producer "empty" / 2 consumer "full" / 3 counter, err[1] = CTA, err[2] = page or op, and every wait
// of every CTA gives up once err[0] != 0, so a broken launch ends in about a second. Decisions to leave
// the page loop are made uniformly over the consumers by a reducing barrier (bar.red.or), so a timeout
// never leaves a consumer thread stuck in a named barrier. After an error the host resets the counters.
//
// STEP_TIMES (debug build, one more argument `times`): thread 0 of the consumers stamps %globaltimer and
// clock64 per op: [0] reached the op's first page, [1] its input counter was satisfied, [2] prologue done
// (input staged), [3] arrived (released the op's counter); per CTA: entry, consumer loop end, producer
// end, exit. Layout: times[(cta * TSLOTS + slot) * 2 + {0: globaltimer ns, 1: clock64}],
// slot = 4 op + k for ops, 4 NOPS + {0..3} for the CTA stamps.
//
// No CUDA headers: inline PTX only (NVRTC needs no include path). Model constants are #defines (the
// driver prepends them; the defaults are Qwen2.5-0.5B).

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short bf16_t;

#ifndef H
#define H 896
#endif
#ifndef NH
#define NH 14
#endif
#ifndef NKV
#define NKV 2
#endif
#ifndef HD
#define HD 64
#endif
#ifndef IM
#define IM 4864
#endif
#ifndef NL
#define NL 24
#endif
#ifndef VOCAB
#define VOCAB 151936
#endif
#ifndef EPS
#define EPS 1e-6f
#endif
#ifndef CWARPS
#define CWARPS 8
#endif

#define NQKV ((NH + 2 * NKV) * HD)
#define NOPS (4 * NL + 1)
#define CTHREADS (32 * CWARPS)
#define THREADS (32 * (CWARPS + 1))
#define NHW (2 * CWARPS)
#define RED_MAX 64
#define VIN (IM > H ? IM : H)
#define CSTRIDE 32                      // counters 128 bytes apart
#define TSLOTS (4 * NOPS + 4)
#define SPIN_NS 1000000000ull
#define FULLMASK 0xffffffffu
#define CBAR_ID 1                       // named barrier of the consumer warps (0 = __syncthreads)

#if (H % 8) || (IM % 8) || (HD % 8) || (NQKV % 8)
#error "dimensions must be multiples of 8 (16-byte chunks)"
#endif
#if (NH * HD) != H
#error "the attention stub broadcasts v to NH heads of HD: needs NH * HD == H"
#endif
#if (H / 8) > CTHREADS
#error "the norm prologue gives one 16-byte chunk of x to each consumer thread: H / 8 <= 32 * CWARPS"
#endif

#ifdef STEP_TIMES
#define ST_PARAM , u64* times
#define ST_MARK(slot) do { if (ct == 0) { u64* _p = times + ((size_t)blockIdx.x * TSLOTS + (slot)) * 2; \
    _p[0] = now_ns(); _p[1] = (u64)clock64(); } } while (0)
#define ST_MARK_ANY(slot) do { u64* _p = times + ((size_t)blockIdx.x * TSLOTS + (slot)) * 2; \
    _p[0] = now_ns(); _p[1] = (u64)clock64(); } while (0)
#else
#define ST_PARAM
#define ST_MARK(slot) do { } while (0)
#define ST_MARK_ANY(slot) do { } while (0)
#endif

struct Seg { u64 addr; u32 bytes; u32 flags; };      // producer: one bulk copy (rung 1's descriptor)
struct TDesc { int op; int row0; int nrows; int flags; };   // consumer: flags 1 = first, 2 = last of op on SM

// ---------------------------------------------------------------------------- PTX helpers
__device__ __forceinline__ u64 now_ns() {
  u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
__device__ __forceinline__ u32 smem_u32(const void* p) {
  u64 a; asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p)); return (u32)a;
}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ bool mbar_try(u32 bar, u32 parity) {
  u32 ok;
  asm volatile("{\n\t.reg .pred p;\n\t"
               "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
               "selp.u32 %0, 1, 0, p;\n\t}"
               : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
  return ok != 0u;
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_g2s(u32 dst, u64 src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ u32 ld_acquire(const u32* p) {
  u32 v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ u32 ld_volatile(const u32* p) {
  u32 v; asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ void red_release_add(u32* p, u32 v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ u32 atom_acq_rel_add(u32* p, u32 v) {
  u32 old; asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
// activations other CTAs wrote during this launch: L2 only (.cg), never a stale L1 line
__device__ __forceinline__ uint4 ld_cg4(const void* p) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u32 ld_cg1(const void* p) {
  u32 v; asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
// read-only for the whole launch (norm weights, biases, descriptors)
__device__ __forceinline__ uint4 ld_nc4(const void* p) {
  uint4 v;
  asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
// consumer barrier; returns the OR of `v` over the consumer threads (a uniform decision)
__device__ __forceinline__ u32 cbar_or(u32 v) {
  u32 r;
  asm volatile("{\n\t.reg .pred p, q;\n\t"
               "setp.ne.u32 q, %1, 0;\n\t"
               "bar.red.or.pred p, %2, %3, q;\n\t"
               "selp.u32 %0, 1, 0, p;\n\t}"
               : "=r"(r) : "r"(v), "n"(CBAR_ID), "n"(CTHREADS) : "memory");
  return r;
}
__device__ __forceinline__ void cbar() {
  asm volatile("bar.sync %0, %1;" :: "n"(CBAR_ID), "n"(CTHREADS) : "memory");
}

__device__ __forceinline__ float bf_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float bf2f(bf16_t v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ bf16_t f2bf(float f) {
  bf16_t r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r;
}
__device__ __forceinline__ float rnd(float f) { return bf2f(f2bf(f)); }   // a bf16 cast point
__device__ __forceinline__ u32 pack2(float a, float b) { return (u32)f2bf(a) | ((u32)f2bf(b) << 16); }

__device__ __forceinline__ void fma8(float (&a)[8], uint4 w, uint4 x) {
  a[0] = fmaf(bf_lo(w.x), bf_lo(x.x), a[0]); a[1] = fmaf(bf_hi(w.x), bf_hi(x.x), a[1]);
  a[2] = fmaf(bf_lo(w.y), bf_lo(x.y), a[2]); a[3] = fmaf(bf_hi(w.y), bf_hi(x.y), a[3]);
  a[4] = fmaf(bf_lo(w.z), bf_lo(x.z), a[4]); a[5] = fmaf(bf_hi(w.z), bf_hi(x.z), a[5]);
  a[6] = fmaf(bf_lo(w.w), bf_lo(x.w), a[6]); a[7] = fmaf(bf_hi(w.w), bf_hi(x.w), a[7]);
}
__device__ __forceinline__ float sumsq8(uint4 x) {
  float s = 0.f;
  s = fmaf(bf_lo(x.x), bf_lo(x.x), s); s = fmaf(bf_hi(x.x), bf_hi(x.x), s);
  s = fmaf(bf_lo(x.y), bf_lo(x.y), s); s = fmaf(bf_hi(x.y), bf_hi(x.y), s);
  s = fmaf(bf_lo(x.z), bf_lo(x.z), s); s = fmaf(bf_hi(x.z), bf_hi(x.z), s);
  s = fmaf(bf_lo(x.w), bf_lo(x.w), s); s = fmaf(bf_hi(x.w), bf_hi(x.w), s);
  return s;
}
// HF Llama/Qwen RMSNorm of one 8-element chunk: rnd(rnd(x * r) * w)
__device__ __forceinline__ uint4 norm8(uint4 x, uint4 w, float r) {
  uint4 o;
  o.x = pack2(rnd(bf_lo(x.x) * r) * bf_lo(w.x), rnd(bf_hi(x.x) * r) * bf_hi(w.x));
  o.y = pack2(rnd(bf_lo(x.y) * r) * bf_lo(w.y), rnd(bf_hi(x.y) * r) * bf_hi(w.y));
  o.z = pack2(rnd(bf_lo(x.z) * r) * bf_lo(w.z), rnd(bf_hi(x.z) * r) * bf_hi(w.z));
  o.w = pack2(rnd(bf_lo(x.w) * r) * bf_lo(w.w), rnd(bf_hi(x.w) * r) * bf_hi(w.w));
  return o;
}
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);            // torch.argmax: the first index of the maximum
}

__device__ __forceinline__ void set_err(u32* err, volatile u32* s_abort, u32 code, u32 info) {
  *s_abort = 1u;
  if (atomicCAS(err, 0u, code) == 0u) { err[1] = blockIdx.x; err[2] = info; }
}

// Bounded wait on one mbarrier phase (rung 1's, plus the global error word). false: gave up.
__device__ bool mbar_wait(u32 bar, u32 parity, volatile u32* s_abort, u32* err, u32 code, u32 info) {
  if (mbar_try(bar, parity)) return true;
  const u64 t0 = now_ns();
  for (u32 i = 1;; i++) {
    if (mbar_try(bar, parity)) return true;
    if ((i & 31u) == 0u) {
      if (*s_abort) return false;
      if (ld_volatile(err) != 0u) { *s_abort = 1u; return false; }
      if (now_ns() - t0 > SPIN_NS) { set_err(err, s_abort, code, info); return false; }
    }
  }
}

// Bounded acquire spin until *p >= want (wrap-safe).
__device__ bool spin_geq(const u32* p, u32 want, volatile u32* s_abort, u32* err, u32 info) {
  u64 t0 = 0ull;
  for (u32 i = 0;; i++) {
    const u32 v = ld_acquire(p);
    if ((int)(v - want) >= 0) return true;
    if ((i & 63u) == 0u) {
      if (i == 0u) t0 = now_ns();
      if (*s_abort) return false;
      if (ld_volatile(err) != 0u) { *s_abort = 1u; return false; }
      if (now_ns() - t0 > SPIN_NS) { set_err(err, s_abort, 3u, info); return false; }
    }
  }
}

// grid = SM count; block = THREADS; dynamic smem = 16 * npages + 128 + npages * page_cap
extern "C" __global__ void __launch_bounds__(THREADS, 1) step3a(
    const Seg* __restrict__ segs, const TDesc* __restrict__ tdesc, const int* __restrict__ sm_seg,
    u32 page_cap, u32 npages,
    const bf16_t* __restrict__ x0,        // (H) the layer-0 input (an embedding row)
    const bf16_t* __restrict__ normw,     // (2 NL + 1, H): attn norm l = 2 l, mlp norm l = 2 l + 1, final = 2 NL
    const bf16_t* __restrict__ bqkv,      // (NL, NQKV)
    bf16_t* qkv_out, bf16_t* x_attn, bf16_t* act, bf16_t* x_out,   // (NL, NQKV), (NL, H), (NL, IM), (NL, H)
    bf16_t* logits,                       // (VOCAB)
    const u32* __restrict__ tgt,          // (NOPS) CTAs holding tiles of each op
    u32* cnt,                             // ((NOPS + 1) * CSTRIDE) arrival counters, never reset
    u32* gen,                             // [0] launches completed
    float* part_v, int* part_i,           // (gridDim.x) argmax partials
    int* token,                           // [0] greedy token, [1] gen of the launch that wrote it
    u32* err ST_PARAM) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(16) bf16_t s_vin[VIN];        // the op's input vector (h, a or act)
  __shared__ __align__(16) bf16_t s_res[H];          // the residual (x_l for o_proj, x_attn for down)
  __shared__ __align__(16) bf16_t s_bias[NQKV];
  __shared__ float s_red[2][RED_MAX];
  __shared__ float s_wsum[CWARPS];
  __shared__ float s_bv[CWARPS];
  __shared__ int s_bi[CWARPS];
  __shared__ u32 s_abort, s_gen;
  const u32 full0 = smem_u32(smem), empty0 = full0 + 8u * npages;
  const u32 ring0 = (full0 + 16u * npages + 127u) & ~127u;
  const unsigned char* ring = smem + (ring0 - full0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ct = (int)threadIdx.x - 32;              // consumer thread index (< 0: producer warp)
#ifdef STEP_TIMES
  if (threadIdx.x == 0) ST_MARK_ANY(4 * NOPS + 0);
#endif
  if (threadIdx.x == 0) {
    for (u32 i = 0; i < npages; i++) { mbar_init(full0 + 8u * i, 1u); mbar_init(empty0 + 8u * i, (u32)CWARPS); }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    s_abort = 0u;
    s_gen = ld_volatile(gen);                         // the previous launch has ended: its bump is visible
  }
  __syncthreads();
  const int s_lo = sm_seg[blockIdx.x], s_hi = sm_seg[blockIdx.x + 1];

  if (warp == 0) {
    // ---------------------------------------------------------------- producer (rung 1's loop)
    u32 slot = 0u, phase = 0u;
    bool ok = true;
    Seg nxt = {0ull, 0u, 0u};
    if (s_lo + lane < s_hi) nxt = segs[s_lo + lane];
    for (int b = s_lo; b < s_hi && ok; b += 32) {
      const Seg cur = nxt;
      if (b + 32 + lane < s_hi) nxt = segs[b + 32 + lane];
      const int n = min(32, s_hi - b);
      for (int j = 0; j < n; j++) {
        const u64 addr = ((u64)__shfl_sync(FULLMASK, (u32)(cur.addr >> 32), j) << 32) |
                         __shfl_sync(FULLMASK, (u32)cur.addr, j);
        const u32 bytes = __shfl_sync(FULLMASK, cur.bytes, j);
        if (lane == 0) {
          const u32 full = full0 + 8u * slot;
          ok = mbar_wait(empty0 + 8u * slot, phase ^ 1u, &s_abort, err, 1u, (u32)(b - s_lo + j));
          if (ok) {
            mbar_arrive_tx(full, bytes);              // one tile a page: arrive with its bytes
            bulk_g2s(ring0 + slot * page_cap, addr, bytes, full);
          }
        }
        ok = __shfl_sync(FULLMASK, (u32)ok, 0) != 0u;
        if (!ok) break;
        if (++slot == npages) { slot = 0u; phase ^= 1u; }
      }
    }
#ifdef STEP_TIMES
    if (lane == 0) ST_MARK_ANY(4 * NOPS + 2);
#endif
  } else {
    // ---------------------------------------------------------------- consumers
    const int cw = warp - 1, hw = 2 * cw + (lane >> 4), l16 = lane & 15;
    const u32 hmask = 0xffffu << (lane & 16);
    const u32 g = s_gen;
    u32 slot = 0u, phase = 0u;
    float best_v = -__int_as_float(0x7f800000);
    int best_i = 0x7fffffff;
    int4 dn = {0, 0, 0, 0};
    if (s_lo < s_hi) dn = *(const int4*)(tdesc + s_lo);
    for (int p = s_lo; p < s_hi; p++) {
      const int4 d = dn;
      if (p + 1 < s_hi) dn = *(const int4*)(tdesc + p + 1);   // the next page's descriptor, one page early
      const int op = d.x, row0 = d.y, nrows = d.z, flags = d.w;
      const int kind = (op == 4 * NL) ? 4 : (op & 3), l = op >> 2;
      // ------------------------------------------------ prologue: wait for the op's input, stage it
      if (flags & 1) {
        ST_MARK(4 * op + 0);
        const bf16_t* xsrc = 0;                       // the vector to normalise (kinds 0, 2, 4)
        const bf16_t* nw = 0;
        if (kind == 0) { xsrc = l ? x_out + (size_t)(l - 1) * H : x0; nw = normw + (size_t)(2 * l) * H; }
        else if (kind == 2) { xsrc = x_attn + (size_t)l * H; nw = normw + (size_t)(2 * l + 1) * H; }
        else if (kind == 4) { xsrc = x_out + (size_t)(NL - 1) * H; nw = normw + (size_t)(2 * NL) * H; }
        // loads that need no activation go first (read-only inputs)
        uint4 wv = {0u, 0u, 0u, 0u};
        if (nw && ct < H / 8) wv = ld_nc4(nw + 8 * ct);
        if (kind == 0)
          for (int c = ct; c < NQKV / 8; c += CTHREADS)
            *(uint4*)(s_bias + 8 * c) = ld_nc4(bqkv + (size_t)l * NQKV + 8 * c);
        u32 fail = 0u;
        if (ct == 0 && op > 0) fail = spin_geq(cnt + (op - 1) * CSTRIDE, (g + 1u) * tgt[op - 1], &s_abort, err, (u32)op) ? 0u : 1u;
        ST_MARK(4 * op + 1);
        if (cbar_or(fail)) break;
        if (xsrc) {
          uint4 xv = {0u, 0u, 0u, 0u};
          float ss = 0.f;
          if (ct < H / 8) { xv = ld_cg4(xsrc + 8 * ct); ss = sumsq8(xv); }
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(FULLMASK, ss, o);
          if (lane == 0) s_wsum[cw] = ss;
          cbar();
          float tot = 0.f;
#pragma unroll
          for (int w = 0; w < CWARPS; w++) tot += s_wsum[w];
          const float r = rsqrtf(tot / (float)H + EPS);
          if (ct < H / 8) *(uint4*)(s_vin + 8 * ct) = norm8(xv, wv, r);
        } else if (kind == 1) {
          const bf16_t* v = qkv_out + (size_t)l * NQKV + (NH + NKV) * HD;
          const bf16_t* xl = l ? x_out + (size_t)(l - 1) * H : x0;
          for (int c = ct; c < 2 * (H / 8); c += CTHREADS) {
            if (c < H / 8) {
              const int head = c / (HD / 8), dc = c % (HD / 8);
              *(uint4*)(s_vin + 8 * c) = ld_cg4(v + (head / (NH / NKV)) * HD + 8 * dc);
            } else {
              *(uint4*)(s_res + 8 * (c - H / 8)) = ld_cg4(xl + 8 * (c - H / 8));
            }
          }
        } else {   // kind 3: act[l] and the residual x_attn[l]
          for (int c = ct; c < IM / 8 + H / 8; c += CTHREADS) {
            if (c < IM / 8) *(uint4*)(s_vin + 8 * c) = ld_cg4(act + (size_t)l * IM + 8 * c);
            else *(uint4*)(s_res + 8 * (c - IM / 8)) = ld_cg4(x_attn + (size_t)l * H + 8 * (c - IM / 8));
          }
        }
        cbar();
        ST_MARK(4 * op + 2);
      }
      // ------------------------------------------------ the page: dot products from shared memory
      const u32 okp = mbar_wait(full0 + 8u * slot, phase, &s_abort, err, 2u, (u32)(p - s_lo)) ? 1u : 0u;
      const int K = (kind == 3) ? IM : H, Kc = K / 8;
      const int rows = (kind == 2) ? 2 * nrows : nrows;
      int P = NHW / rows; if (P < 1) P = 1;
      const int items = rows * P;
      const uint4* pg = (const uint4*)(ring + (size_t)slot * page_cap);
      const uint4* xin = (const uint4*)s_vin;
      float* red = s_red[p & 1];
      if (okp) {
        for (int it = hw; it < items; it += NHW) {
          const int r = it / P, part = it - r * P;
          const int c0 = (part * Kc) / P, c1 = ((part + 1) * Kc) / P;
          const uint4* wr = pg + (size_t)r * Kc;
          float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
          for (int c = c0 + l16; c < c1; c += 16) fma8(a, wr[c], xin[c]);
          float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
#pragma unroll
          for (int o = 8; o > 0; o >>= 1) s += __shfl_xor_sync(hmask, s, o);
          if (l16 == 0) red[it] = s;
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty0 + 8u * slot);          // the page may be refilled
      if (++slot == npages) { slot = 0u; phase ^= 1u; }
      if (cbar_or(okp ^ 1u)) break;
      // ------------------------------------------------ epilogue: one thread per output row
      if (ct < nrows) {
        const int row = row0 + ct;
        if (kind == 2) {
          float s0 = 0.f, s1 = 0.f;
          for (int q = 0; q < P; q++) { s0 += red[(2 * ct) * P + q]; s1 += red[(2 * ct + 1) * P + q]; }
          const float gg = rnd(s0), uu = rnd(s1);
          act[(size_t)l * IM + row] = f2bf(rnd(gg / (1.0f + expf(-gg))) * uu);
        } else {
          float s = 0.f;
          for (int q = 0; q < P; q++) s += red[ct * P + q];
          if (kind == 0) {
            qkv_out[(size_t)l * NQKV + row] = f2bf(s + bf2f(s_bias[row]));
          } else if (kind == 1) {
            x_attn[(size_t)l * H + row] = f2bf(bf2f(s_res[row]) + rnd(s));
          } else if (kind == 3) {
            x_out[(size_t)l * H + row] = f2bf(bf2f(s_res[row]) + rnd(s));
          } else {
            const float v = rnd(s);
            logits[row] = f2bf(v);
            if (better(v, row, best_v, best_i)) { best_v = v; best_i = row; }
          }
        }
      }
      if (flags & 2) {                                        // this SM's last page of the op
        cbar();                                               // every output of the op is stored
        if (ct == 0) { __threadfence(); red_release_add(cnt + op * CSTRIDE, 1u); }
        ST_MARK(4 * op + 3);
      }
    }
#ifdef STEP_TIMES
    if (ct == 0) ST_MARK_ANY(4 * NOPS + 1);
#endif
    // ---------------------------------------------------------------- greedy token
    if (!cbar_or(s_abort)) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULLMASK, best_v, o);
        const int oi = __shfl_xor_sync(FULLMASK, best_i, o);
        if (better(ov, oi, best_v, best_i)) { best_v = ov; best_i = oi; }
      }
      if (lane == 0) { s_bv[cw] = best_v; s_bi[cw] = best_i; }
      cbar();
      if (ct == 0) {
        for (int w = 1; w < CWARPS; w++)
          if (better(s_bv[w], s_bi[w], best_v, best_i)) { best_v = s_bv[w]; best_i = s_bi[w]; }
        part_v[blockIdx.x] = best_v;
        part_i[blockIdx.x] = best_i;
        __threadfence();
        const u32 old = atom_acq_rel_add(cnt + NOPS * CSTRIDE, 1u);
        if (old == (g + 1u) * gridDim.x - 1u) {               // the last CTA: every partial is there
          float bv = -__int_as_float(0x7f800000);
          int bi = 0x7fffffff;
          for (u32 c = 0; c < gridDim.x; c++) {
            const float v = __uint_as_float(ld_cg1(part_v + c));
            const int i = (int)ld_cg1(part_i + c);
            if (better(v, i, bv, bi)) { bv = v; bi = i; }
          }
          token[0] = bi;
          token[1] = (int)g;
          __threadfence();
          atomicAdd(gen, 1u);                                 // every CTA read gen before arriving
        }
      }
    }
  }
  __syncthreads();
#ifdef STEP_TIMES
  if (threadIdx.x == 0) ST_MARK_ANY(4 * NOPS + 3);
#endif
}
