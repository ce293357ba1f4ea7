// Rung 1 of issue #25's ladder: the streaming floor of a whole decode step.
//
// One persistent CTA per SM walks that SM's slice of a static schedule (built on the host by
// ladder.py): every weight tile of the step, in step order. No arithmetic is done on the weights.
//
//   stream_floor   warp 0 = producer: lane 0 issues one 1-D bulk copy (cp.async.bulk, the TMA
//                  engine) per tile into a ring of shared-memory pages; a page may hold several
//                  consecutive tiles (host-side packing). Each page has a "full" mbarrier (the
//                  producer's arrive.expect_tx + the copies' complete_tx) and an "empty" mbarrier
//                  (one arrive per consumer warp). Warps 1..C = consumers: wait "full", optionally
//                  touch the page (mode), arrive "empty".
//   ld_floor       the comparison: no shared memory, every warp streams its tiles with 16-byte
//                  ld.global.nc loads (LD_UNROLL in flight per lane) and sums every word.
//
// Consumer modes (stream_floor):
//   0 NONE   consumers only wait and release: the pure copy-engine floor
//   1 TOKEN  lane 0 of consumer warp 0 reads the page's first 4-byte word (kept in the checksum slot,
//            not verified): proves a consumer can see the page, costs nothing
//   2 SUM8   every 16-byte chunk: its first 8 bytes (two u32) added to a u64 sum (verified by the host)
//   3 SUM16  every u32 word of the page added (verified by the host; ld_floor computes the same sum)
//
// Per-SM results: stats[4*sm + {0,1,2,3}] = bytes the consumers saw, checksum, pages, %smid.
// reps > 1 walks the whole list reps times in one launch (steady-state rate without the launch ramp).
// Bounded waits: every spin gives up after SPIN_NS (err[0] = 1 producer / 2 consumer, err[1] = CTA,
// err[2] = page), and once one thread of a CTA gave up the others stop waiting too, so a broken
// schedule ends the launch within ~1 s instead of hanging the GPU. The host checks err after a launch.
//
// Descriptor layout (16 bytes, ladder.py SEG_DTYPE): {u64 global address, u32 bytes, u32 flags};
// flags bit 0 = last tile of its page. Tiles are 16-byte aligned, multiples of 16 bytes.
// No CUDA headers: inline PTX only (NVRTC needs no include path), sm_90 features only.

typedef unsigned long long u64;
typedef unsigned int u32;

#define SPIN_NS 1000000000ull          // 1 s: no wait in a healthy run comes near it
#define FULLMASK 0xffffffffu
#ifndef LD_UNROLL
#define LD_UNROLL 8                     // 16-byte loads in flight per lane in ld_floor
#endif

struct Seg { u64 addr; u32 bytes; u32 flags; };

__device__ __forceinline__ u64 now_ns() {
  u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
__device__ __forceinline__ u32 smid() {
  u32 s; asm volatile("mov.u32 %0, %%smid;" : "=r"(s)); return s;
}
__device__ __forceinline__ u32 smem_u32(const void* p) {   // shared-window address for PTX operands
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
// the producer's one arrival on a "full" barrier, adding the last tile's bytes to the tx count
__device__ __forceinline__ void mbar_arrive_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
// earlier tiles of a packed page: more expected bytes, no arrival (the phase cannot complete yet)
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_g2s(u32 dst, u64 src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// same copy with an L2 policy (evict_first: the weights are read once per step, don't keep them)
__device__ __forceinline__ void bulk_g2s_hint(u32 dst, u64 src, u32 bytes, u32 bar, u64 pol) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
               " [%0], [%1], %2, [%3], %4;"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar), "l"(pol) : "memory");
}

// Bounded wait on one mbarrier phase. false: this thread timed out, or another one of the CTA did.
__device__ bool mbar_wait(u32 bar, u32 parity, volatile u32* abort_flag, u32* err, u32 code, u32 page) {
  if (mbar_try(bar, parity)) return true;
  const u64 t0 = now_ns();
  for (u32 i = 1;; i++) {
    if (mbar_try(bar, parity)) return true;
    if ((i & 31u) == 0u) {
      if (*abort_flag) return false;
      if (now_ns() - t0 > SPIN_NS) {
        *abort_flag = 1u;
        if (atomicCAS(err, 0u, code) == 0u) { err[1] = blockIdx.x; err[2] = page; }
        return false;
      }
    }
  }
}

__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    u32 lo = __shfl_xor_sync(FULLMASK, (u32)v, o), hi = __shfl_xor_sync(FULLMASK, (u32)(v >> 32), o);
    v += ((u64)hi << 32) | lo;
  }
  return v;
}

// grid = one CTA per SM; block = 32 * (1 + consumer warps); dynamic smem = 16 * npages + 128 + ring
extern "C" __global__ void __launch_bounds__(1024, 1) stream_floor(
    const Seg* __restrict__ segs, const int* __restrict__ sm_seg,   // this SM's tiles: [sm_seg[b], sm_seg[b+1])
    const u32* __restrict__ page_bytes, const int* __restrict__ sm_page,   // its pages' byte counts
    u32 page_cap, u32 npages, int mode, int l2hint, int reps, u64* stats, u32* err) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ u32 s_abort;
  __shared__ u64 s_bytes, s_sum, s_pages;
  const u32 full0 = smem_u32(smem), empty0 = full0 + 8u * npages;
  const u32 ring0 = (full0 + 16u * npages + 127u) & ~127u;          // bulk copies need 16-B alignment
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int cwarps = (int)(blockDim.x >> 5) - 1;
  if (threadIdx.x == 0) {
    for (u32 i = 0; i < npages; i++) { mbar_init(full0 + 8u * i, 1u); mbar_init(empty0 + 8u * i, (u32)cwarps); }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");   // inits visible to the async proxy
    s_abort = 0u; s_bytes = 0ull; s_sum = 0ull; s_pages = 0ull;
  }
  __syncthreads();

  if (warp == 0) {
    // ---------------------------------------------------------------- producer
    const int s_lo = sm_seg[blockIdx.x], s_hi = sm_seg[blockIdx.x + 1];
    u64 pol = 0ull;
    if (l2hint) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    u32 slot = 0u, phase = 0u, off = 0u, page = 0u;
    bool ok = true, need_wait = true;
    // lanes hold the next 32 descriptors (one coalesced 512-B load), lane 0 issues from shuffles
    for (int r = 0; r < reps && ok; r++) {           // reps > 1: the step's stream again, no relaunch
      Seg nxt = {0ull, 0u, 0u};
      if (s_lo + lane < s_hi) nxt = segs[s_lo + lane];
      for (int b = s_lo; b < s_hi && ok; b += 32) {
        const Seg cur = nxt;
        if (b + 32 + lane < s_hi) nxt = segs[b + 32 + lane];        // prefetch the batch after this one
        const int cnt = min(32, s_hi - b);
        for (int j = 0; j < cnt; j++) {
          const u64 addr = ((u64)__shfl_sync(FULLMASK, (u32)(cur.addr >> 32), j) << 32) |
                           __shfl_sync(FULLMASK, (u32)cur.addr, j);
          const u32 bytes = __shfl_sync(FULLMASK, cur.bytes, j), flags = __shfl_sync(FULLMASK, cur.flags, j);
          if (lane == 0) {
            const u32 full = full0 + 8u * slot;
            // first tile of a page: wait until every consumer warp released the page's previous use
            if (need_wait) ok = mbar_wait(empty0 + 8u * slot, phase ^ 1u, &s_abort, err, 1u, page);
            if (ok) {
              if (flags & 1u) mbar_arrive_tx(full, bytes); else mbar_expect_tx(full, bytes);
              const u32 dst = ring0 + slot * page_cap + off;
              if (l2hint) bulk_g2s_hint(dst, addr, bytes, full, pol); else bulk_g2s(dst, addr, bytes, full);
            }
          }
          ok = __shfl_sync(FULLMASK, (u32)ok, 0) != 0u;
          if (!ok) break;
          need_wait = (flags & 1u) != 0u;
          if (flags & 1u) {
            off = 0u; page++;
            if (++slot == npages) { slot = 0u; phase ^= 1u; }
          } else {
            off += bytes;
          }
        }
      }
    }
  } else {
    // ---------------------------------------------------------------- consumers
    const int cw = warp - 1;
    const int p_lo = sm_page[blockIdx.x], p_hi = sm_page[blockIdx.x + 1];
    u32 slot = 0u, phase = 0u;
    u64 acc = 0ull, seen = 0ull;
    bool ok = true;
    for (int r = 0; r < reps && ok; r++) {
      u32 nxt = (p_lo + lane < p_hi) ? page_bytes[p_lo + lane] : 0u;
      for (int b = p_lo; b < p_hi && ok; b += 32) {
        const u32 cur = nxt;
        if (b + 32 + lane < p_hi) nxt = page_bytes[b + 32 + lane];
        const int cnt = min(32, p_hi - b);
        for (int j = 0; j < cnt; j++) {
          const u32 pbytes = __shfl_sync(FULLMASK, cur, j);
          ok = mbar_wait(full0 + 8u * slot, phase, &s_abort, err, 2u, (u32)(b - p_lo + j));
          if (!__all_sync(FULLMASK, ok)) { ok = false; break; }
          const unsigned char* pg = smem + (ring0 - full0) + (size_t)slot * page_cap;
          if (mode == 1) {
            if (cw == 0 && lane == 0) acc ^= *(const volatile u32*)pg;
          } else if (mode == 2) {
            for (u32 c = (u32)(cw * 32 + lane); c < pbytes / 16u; c += (u32)(cwarps * 32)) {
              const uint2 v = *(const uint2*)(pg + 16u * c);
              acc += (u64)v.x + (u64)v.y;
            }
          } else if (mode == 3) {
            for (u32 c = (u32)(cw * 32 + lane); c < pbytes / 16u; c += (u32)(cwarps * 32)) {
              const uint4 v = *(const uint4*)(pg + 16u * c);
              acc += (u64)v.x + (u64)v.y + (u64)v.z + (u64)v.w;
            }
          }
          if (cw == 0) seen += pbytes;
          __syncwarp();
          if (lane == 0) mbar_arrive(empty0 + 8u * slot);      // the page may be refilled
          if (++slot == npages) { slot = 0u; phase ^= 1u; }
        }
      }
    }
    acc = warp_sum_u64(acc);
    if (lane == 0) {
      atomicAdd(&s_sum, acc);
      if (cw == 0) { atomicAdd(&s_bytes, seen); atomicAdd(&s_pages, (u64)(p_hi - p_lo) * (u64)reps); }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    u64* st = stats + 4 * blockIdx.x;
    st[0] = s_bytes; st[1] = s_sum; st[2] = s_pages; st[3] = smid();
  }
}

// The comparison without shared memory: warp w of the CTA takes tiles w, w + W, ... of its SM's
// list; lanes read 16-byte chunks lane + 32 * i, LD_UNROLL loads issued before any is used; every
// u32 word is summed (the same checksum as SUM16). The next tile's descriptor is loaded one tile early.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

extern "C" __global__ void __launch_bounds__(1024, 1) ld_floor(
    const Seg* __restrict__ segs, const int* __restrict__ sm_seg, u64* stats) {
  __shared__ u64 s_bytes, s_sum;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (threadIdx.x == 0) { s_bytes = 0ull; s_sum = 0ull; }
  __syncthreads();
  const int s_lo = sm_seg[blockIdx.x], s_hi = sm_seg[blockIdx.x + 1];
  u64 acc = 0ull, seen = 0ull;
  Seg nxt = {0ull, 0u, 0u};
  if (s_lo + warp < s_hi) nxt = segs[s_lo + warp];
  for (int s = s_lo + warp; s < s_hi; s += nw) {
    const Seg cur = nxt;
    if (s + nw < s_hi) nxt = segs[s + nw];
    const uint4* base = (const uint4*)cur.addr;
    const u32 chunks = cur.bytes / 16u;
    for (u32 c0 = 0; c0 < chunks; c0 += 32u * LD_UNROLL) {
      uint4 v[LD_UNROLL];
#pragma unroll
      for (int u = 0; u < LD_UNROLL; u++) {
        const u32 c = c0 + (u32)(u * 32 + lane);
        if (c < chunks) v[u] = ld_stream(base + c); else { v[u].x = 0u; v[u].y = 0u; v[u].z = 0u; v[u].w = 0u; }
      }
#pragma unroll
      for (int u = 0; u < LD_UNROLL; u++) acc += (u64)v[u].x + (u64)v[u].y + (u64)v[u].z + (u64)v[u].w;
    }
    seen += cur.bytes;
  }
  acc = warp_sum_u64(acc);
  if (lane == 0) { atomicAdd(&s_sum, acc); atomicAdd(&s_bytes, seen); }
  __syncthreads();
  if (threadIdx.x == 0) {
    u64* st = stats + 4 * blockIdx.x;
    st[0] = s_bytes; st[1] = s_sum; st[2] = (u64)(s_hi - s_lo); st[3] = smid();
  }
}
