// Rung 2 of issue #25's ladder: what one dependency hand-off between SMs costs.
//
//   chain   (a) a token passed around a ring of CTAs through global-memory counters: ring position p
//           spins (acquire) until its counter reaches the expected value, then release-adds 1 to the
//           counter of position p + 1. A ring of 2 is a ping-pong between two SMs; a ring of all CTAs
//           visits every SM. One round = every position passes the token once.
//   fanin   (b) an op boundary: every CTA arrives on one counter (release), then all wait until all
//           have arrived. mode 0: CTA 0 alone polls the counter and then releases a flag that the
//           others poll (fan-in + fan-out); mode 1: every CTA polls the counter itself (a grid
//           barrier); mode 2: the arrival's atom returns the count, the last arriver releases the flag.
//
// Only thread 0 of a CTA spins. full_cta = 1 adds what a real consumer adds around a hand-off: a
// __syncthreads before the release (every warp finished its work) and after the acquire (every warp
// may start). poll = 0: ld.acquire.gpu; poll = 1: ld.relaxed.gpu, then fence.acq_rel.gpu once it hit.
//
// Epoch numbering: the expected values grow with a generation word gen[0] that CTA 0 bumps at the end
// of each launch, so back-to-back launches and graph replays need no reset kernel. (A launch argument
// would not do inside a CUDA graph: a replay repeats the captured value.) gen is read by every CTA
// before its first arrival, and CTA 0 bumps it only after it has seen every CTA's first arrival, so no
// CTA of a launch can read the next launch's value. Counters compare with wrap-safe differences.
//
// Roles: role = pos_of[by_smid ? %smid : blockIdx.x] (-1: not in the ring, exits at once). With one CTA
// per SM (the launcher forces it with the dynamic shared memory size) %smid picks the two SMs of a
// ping-pong. claims[pos] counts the launches each position was played in: the host checks that no two
// CTAs played one position. smid_out[blockIdx.x] = %smid of every CTA.
// Bounded spins: SPIN_NS per wait, then err[0] = code, err[1] = CTA, err[2] = round; once err is set
// every later wait of the launch gives up at once, so a broken launch ends in about a second.

typedef unsigned long long u64;
typedef unsigned int u32;

#define SPIN_NS 1000000000ull
#define STRIDE 32                      // counters 128 bytes apart: one L2 line each

__device__ __forceinline__ u64 now_ns() {
  u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
__device__ __forceinline__ u32 smid() {
  u32 s; asm volatile("mov.u32 %0, %%smid;" : "=r"(s)); return s;
}
__device__ __forceinline__ u32 ld_acquire(const u32* p) {
  u32 v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ u32 ld_relaxed(const u32* p) {
  u32 v; asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ void red_release_add(u32* p, u32 v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ u32 atom_acq_rel_add(u32* p, u32 v) {
  u32 old; asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
__device__ __forceinline__ void st_release(u32* p, u32 v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

// Spin until *p >= want (wrap-safe). false: timed out here (err set) or an earlier wait did.
__device__ bool spin_geq(const u32* p, u32 want, int poll, u32* err, u32 code, u32 round) {
  u64 t0 = 0ull;
  for (u32 i = 0;; i++) {
    const u32 v = poll ? ld_relaxed(p) : ld_acquire(p);
    if ((int)(v - want) >= 0) {
      if (poll) asm volatile("fence.acq_rel.gpu;" ::: "memory");
      return true;
    }
    if ((i & 63u) == 0u) {
      if (i == 0u) t0 = now_ns();
      if (*(volatile u32*)err != 0u) return false;
      if (now_ns() - t0 > SPIN_NS) {
        if (atomicCAS(err, 0u, code) == 0u) { err[1] = blockIdx.x; err[2] = round; }
        return false;
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(1024, 1) chain(
    const int* __restrict__ pos_of, int by_smid, int n, int rounds, int full_cta, int poll,
    u32* ctr, u32* gen, u32* claims, u32* smid_out, u32* err) {
  __shared__ u32 s_base;
  const u32 sm = smid();
  if (threadIdx.x == 0) smid_out[blockIdx.x] = sm;
  const int pos = pos_of[by_smid ? (int)sm : (int)blockIdx.x];
  if (pos < 0) return;                              // uniform over the CTA: not in this ring
  if (threadIdx.x == 0) {
    s_base = ld_relaxed(gen) * (u32)rounds;         // the previous launch ended: its bump is visible
    atomicAdd(claims + pos, 1u);
  }
  __syncthreads();
  const u32 base = s_base;
  u32* mine = ctr + pos * STRIDE;
  u32* next = ctr + ((pos + 1) % n) * STRIDE;
  bool ok = true;
  for (int k = 0; k < rounds; k++) {
    // position 0 starts round 0 unprompted; everyone else waits for the token of this round
    if (pos != 0 || k > 0) {
      if (threadIdx.x == 0 && ok) ok = spin_geq(mine, base + (u32)k + (pos != 0 ? 1u : 0u), poll, err, 1u, (u32)k);
      if (full_cta) __syncthreads();
    }
    if (full_cta) __syncthreads();
    if (threadIdx.x == 0) red_release_add(next, 1u);
  }
  // position 0 has waited for round rounds-1, so every CTA has read gen: safe to open the next epoch
  if (pos == 0 && threadIdx.x == 0) atomicAdd(gen, 1u);
}

extern "C" __global__ void __launch_bounds__(1024, 1) fanin(
    int rounds, int mode, int full_cta, int poll, u32* cnt, u32* flag, u32* gen, u32* err) {
  __shared__ u32 s_gen;
  const u32 n = gridDim.x;
  if (threadIdx.x == 0) s_gen = ld_relaxed(gen);
  __syncthreads();
  const u32 g = s_gen;
  bool ok = true;
  for (int k = 0; k < rounds; k++) {
    const u32 want_cnt = (g * (u32)rounds + (u32)k + 1u) * n;    // every CTA arrived for round k
    const u32 want_flag = g * (u32)rounds + (u32)k + 1u;
    if (full_cta) __syncthreads();                                  // this CTA's op work is done
    if (threadIdx.x == 0) {
      if (mode == 0) {
        red_release_add(cnt, 1u);
        if (blockIdx.x == 0) {
          if (ok) ok = spin_geq(cnt, want_cnt, poll, err, 2u, (u32)k);
          st_release(flag, want_flag);
        } else if (ok) {
          ok = spin_geq(flag, want_flag, poll, err, 3u, (u32)k);
        }
      } else if (mode == 1) {
        red_release_add(cnt, 1u);
        if (ok) ok = spin_geq(cnt, want_cnt, poll, err, 4u, (u32)k);
      } else {
        const u32 old = atom_acq_rel_add(cnt, 1u);
        if (old + 1u == want_cnt) st_release(flag, want_flag);
        else if (ok) ok = spin_geq(flag, want_flag, poll, err, 5u, (u32)k);
      }
    }
    if (full_cta) __syncthreads();                                  // the next op may start
  }
  // CTA 0 passed the last boundary, so every CTA arrived at least once and has read gen
  if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(gen, 1u);
}
