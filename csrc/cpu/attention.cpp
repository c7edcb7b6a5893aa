// Paged attention on CPU: one kernel for prefill and decode over the block table.
// Work item = (sequence, kv head, chunk of query tokens); the query heads sharing the kv head
// are processed together so each K/V block is loaded once. Online softmax in fp32 per block.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_types.h"

namespace octavo::cpu::CPU_CAPABILITY {

namespace {

constexpr int kTargetRows = 64;    // rows (tokens x grouped heads) per prefill work item
constexpr int kDecodeRows = 256;   // sequences with q_len * Hq <= this take all kv heads per item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Query tokens [t0, t1) (local to the sequence) of kv heads [h0, h1).
struct WorkItem {
  int seq, h0, h1, t0, t1;
  int64_t cost;
};

// Per-thread buffers, grown on demand and reused across calls.
struct Scratch {
  std::vector<float> q, acc, scores, vf, m, l, pos;
  void reserve(int rows, int rows_per_head, int hdp, int bsp) {
    auto grow = [](std::vector<float>& v, size_t n) { if (v.size() < n) v.resize(n); };
    grow(q, size_t(rows) * hdp);
    grow(acc, size_t(rows) * hdp);
    grow(scores, size_t(rows_per_head) * bsp);
    grow(vf, size_t(bsp) * hdp);
    grow(m, rows);
    grow(l, rows);
    grow(pos, rows);
  }
};

// scores[r * lds] = dot(q_r, k) for NR rows of Q (fp32, padded to nfull + (tail > 0) chunks).
#define OCTAVO_UNROLL _Pragma("GCC unroll 16")
#define OCTAVO_INLINE inline __attribute__((always_inline))
#define OCTAVO_INLINE_LAMBDA __attribute__((always_inline))

// Rows per register block: 4 rows x 4 keys (or 4 chunks) of accumulators fit the 32 AVX-512
// registers; AVX2 has 16, so 2 rows.
constexpr int kRowBlock = kVec == 16 ? 4 : 2;

template <int NR, typename T>
OCTAVO_INLINE void dot_rows(const float* q, int ldq, const T* k, int nfull, int tail, float* s, int lds) {
  fVec acc[NR];
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) acc[r] = fVec(0.f);
  for (int c = 0; c < nfull; ++c) {
    const fVec kv = load_f(k + c * kVec);
    OCTAVO_UNROLL for (int r = 0; r < NR; ++r) acc[r] = at::vec::fmadd(fVec::loadu(q + r * ldq + c * kVec), kv, acc[r]);
  }
  if (tail > 0) {
    const fVec kv = load_f_partial(k + nfull * kVec, tail);
    OCTAVO_UNROLL for (int r = 0; r < NR; ++r) acc[r] = at::vec::fmadd(fVec::loadu(q + r * ldq + nfull * kVec), kv, acc[r]);
  }
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) s[r * lds] = hsum(acc[r]);
}

// s[r * lds + i] = dot(q_r, k_i) for NR rows and 4 keys (k_i = k + i * kstride): each loaded
// K and Q vector is used 4 times, and the 4 sums of a row share one reduction.
template <int NR, typename T>
OCTAVO_INLINE void dot_rows_4keys(const float* q, int ldq, const T* k, int64_t kstride, int nfull,
                                  int tail, float* s, int lds) {
  fVec acc[NR][4];
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int i = 0; i < 4; ++i) acc[r][i] = fVec(0.f);
  }
  auto step = [&](const fVec (&kv)[4], int c) OCTAVO_INLINE_LAMBDA {
    OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
      const fVec qv = fVec::loadu(q + r * ldq + c * kVec);
      OCTAVO_UNROLL for (int i = 0; i < 4; ++i) acc[r][i] = at::vec::fmadd(qv, kv[i], acc[r][i]);
    }
  };
  for (int c = 0; c < nfull; ++c) {
    const fVec kv[4] = {load_f(k + c * kVec), load_f(k + kstride + c * kVec),
                        load_f(k + 2 * kstride + c * kVec), load_f(k + 3 * kstride + c * kVec)};
    step(kv, c);
  }
  if (tail > 0) {
    const int c = nfull;
    const fVec kv[4] = {load_f_partial(k + c * kVec, tail), load_f_partial(k + kstride + c * kVec, tail),
                        load_f_partial(k + 2 * kstride + c * kVec, tail),
                        load_f_partial(k + 3 * kstride + c * kVec, tail)};
    step(kv, c);
  }
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) hsum4(acc[r], s + r * lds);
}

// acc_r[c0 + 0:NC chunks] += sum_j p_r[j] * v_j for NR rows, reading V straight from the cache
// (converted once per key and chunk, reused by the NR rows).
template <int NR, int NC, typename T>
OCTAVO_INLINE void pv_rows_direct(float* acc, int ldacc, const float* p, int ldp, const T* v,
                           int64_t vstride, int nk) {
  fVec a[NR][NC];
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[r][c] = fVec::loadu(acc + r * ldacc + c * kVec);
  }
  for (int j = 0; j < nk; ++j) {
    fVec vv[NC];
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) vv[c] = load_f(v + j * vstride + c * kVec);
    OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
      const fVec pj(p[r * ldp + j]);
      OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[r][c] = at::vec::fmadd(pj, vv[c], a[r][c]);
    }
  }
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[r][c].store(acc + r * ldacc + c * kVec);
  }
}

// acc[0:NC chunks] += sum_j p[j] * vf[j]  (NC independent accumulators per row)
template <int NC>
OCTAVO_INLINE void pv_row(float* acc, const float* p, const float* vf, int ldv, int nk) {
  fVec a[NC];
  OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[c] = fVec::loadu(acc + c * kVec);
  for (int j = 0; j < nk; ++j) {
    const fVec pj(p[j]);
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[c] = at::vec::fmadd(pj, fVec::loadu(vf + j * ldv + c * kVec), a[c]);
  }
  OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[c].store(acc + c * kVec);
}

// Rows of a work item are ordered (kv head, token, grouped query head), so the rows that share
// one kv head are contiguous: [kvh_local * rows_per_head, (kvh_local + 1) * rows_per_head).
template <typename T>
class Attention {
 public:
  explicit Attention(const PagedAttentionParams& p)
      : p_(p), group_(p.num_heads / p.num_kv_heads), hd_(p.head_size),
        nfull_(p.head_size / kVec), tail_(p.head_size % kVec),
        hdp_((p.head_size + kVec - 1) / kVec * kVec),
        bsp_((p.block_size + kVec - 1) / kVec * kVec) {}

  void run(const WorkItem& w, Scratch& sc) const {
    const int q_start = p_.query_start_loc[w.seq];
    const int q_len = p_.query_start_loc[w.seq + 1] - q_start;
    const int ctx = p_.seq_lens[w.seq];
    const int rows_per_head = (w.t1 - w.t0) * group_;
    sc.reserve(rows_per_head * (w.h1 - w.h0), rows_per_head, hdp_, bsp_);
    load_queries(w, q_start, ctx - q_len, sc);
    const int first_pos = ctx - q_len + w.t0, last_pos = ctx - q_len + w.t1 - 1;
    const int lo = p_.sliding_window > 0 ? std::max(0, first_pos - p_.sliding_window + 1) : 0;
    const int hi = std::min(ctx, last_pos + 1);
    const int32_t* blocks = p_.block_table + int64_t(w.seq) * p_.bt_stride;
    const int b_first = lo / p_.block_size, b_end = (hi + p_.block_size - 1) / p_.block_size;
    prefetch_rows(key_row(blocks[b_first], 0, w.h0), p_.kc_stride_token);
    for (int b = b_first; b < b_end; ++b) {
      const int j0 = std::max(lo, b * p_.block_size);
      const int j1 = std::min(hi, (b + 1) * p_.block_size);
      if (b + 1 < b_end) {
        // Pull the next block of every kv head of this item into L2 a whole block ahead.
        for (int kvh = w.h0; kvh < w.h1; ++kvh) {
          prefetch_rows<2>(key_row(blocks[b + 1], 0, kvh), p_.kc_stride_token);
          prefetch_rows<2>(value_row(blocks[b + 1], 0, kvh), p_.vc_stride_token);
        }
      }
      for (int kvh = w.h0; kvh < w.h1; ++kvh) {
        // Blocks are scattered in memory: fetch this V and the next K early, otherwise every
        // key row is a dependent cache miss.
        prefetch_rows(value_row(blocks[b], 0, kvh), p_.vc_stride_token);
        if (kvh + 1 < w.h1) {
          prefetch_rows(key_row(blocks[b], 0, kvh + 1), p_.kc_stride_token);
        } else if (b + 1 < b_end) {
          prefetch_rows(key_row(blocks[b + 1], 0, w.h0), p_.kc_stride_token);
        }
        process_block(blocks[b], b * p_.block_size, j0, j1, kvh,
                      (kvh - w.h0) * rows_per_head, rows_per_head, sc);
      }
    }
    store_output(w, q_start, sc);
  }

 private:
  const T* key_row(int64_t block, int off, int kvh) const {
    return static_cast<const T*>(p_.key_cache) + block * p_.kc_stride_block +
           off * p_.kc_stride_token + kvh * p_.kc_stride_head;
  }
  const T* value_row(int64_t block, int off, int kvh) const {
    return static_cast<const T*>(p_.value_cache) + block * p_.vc_stride_block +
           off * p_.vc_stride_token + kvh * p_.vc_stride_head;
  }

  // LOCALITY 3: into L1 (prefetcht0), 2: into L2 (prefetcht1).
  template <int LOCALITY = 3>
  void prefetch_rows(const T* row, int64_t stride) const {
    const int bytes = hd_ * int(sizeof(T));
    for (int j = 0; j < p_.block_size; ++j)
      for (int b = 0; b < bytes; b += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(row + j * stride) + b, 0, LOCALITY);
  }

  int head_of(const WorkItem& w, int r) const {
    const int rows_per_head = (w.t1 - w.t0) * group_;
    return (w.h0 + r / rows_per_head) * group_ + r % group_;
  }
  int token_of(const WorkItem& w, int r) const {
    return w.t0 + (r % ((w.t1 - w.t0) * group_)) / group_;
  }

  // Q rows into fp32 scratch, pre-scaled, zero padded; softmax state reset.
  void load_queries(const WorkItem& w, int q_start, int pos0, Scratch& sc) const {
    const fVec vscale(p_.scale);
    const int rows = (w.t1 - w.t0) * group_ * (w.h1 - w.h0);
    for (int r = 0; r < rows; ++r) {
      const int t = token_of(w, r);
      const T* src = static_cast<const T*>(p_.query) + int64_t(q_start + t) * p_.q_stride_token +
                     int64_t(head_of(w, r)) * p_.q_stride_head;
      float* dst = sc.q.data() + size_t(r) * hdp_;
      for (int c = 0; c < nfull_; ++c) (load_f(src + c * kVec) * vscale).store(dst + c * kVec);
      if (tail_ > 0) (load_f_partial(src + nfull_ * kVec, tail_) * vscale).store(dst + nfull_ * kVec);
      std::fill(sc.acc.data() + size_t(r) * hdp_, sc.acc.data() + size_t(r + 1) * hdp_, 0.f);
      sc.m[r] = kNegInf;
      sc.l[r] = 0.f;
      sc.pos[r] = float(pos0 + t);
    }
  }

  void scores(const float* q, const T* kbase, int nk, int rows, float* s) const {
    const int64_t ks = p_.kc_stride_token;
    int j = 0;
    for (; j + 4 <= nk; j += 4) {
      const T* k = kbase + j * ks;
      int r = 0;
      for (; r + kRowBlock <= rows; r += kRowBlock)
        dot_rows_4keys<kRowBlock>(q + r * hdp_, hdp_, k, ks, nfull_, tail_, s + r * bsp_ + j, bsp_);
      for (; r < rows; ++r) dot_rows_4keys<1>(q + r * hdp_, hdp_, k, ks, nfull_, tail_, s + r * bsp_ + j, bsp_);
    }
    for (; j < nk; ++j) {
      const T* k = kbase + int64_t(j) * p_.kc_stride_token;
      int r = 0;
      for (; r + 8 <= rows; r += 8) dot_rows<8>(q + r * hdp_, hdp_, k, nfull_, tail_, s + r * bsp_ + j, bsp_);
      for (; r + 4 <= rows; r += 4) dot_rows<4>(q + r * hdp_, hdp_, k, nfull_, tail_, s + r * bsp_ + j, bsp_);
      for (; r < rows; ++r) dot_rows<1>(q + r * hdp_, hdp_, k, nfull_, tail_, s + r * bsp_ + j, bsp_);
    }
  }

  // Masks, caps and exponentiates one row's scores in place; returns false if all masked.
  bool softmax_row(float* s, int r, int h, int j0, int nk, Scratch& sc, float& corr) const {
    const float pos = sc.pos[r];
    const fVec vpos(pos), vlo(p_.sliding_window > 0 ? pos - p_.sliding_window : -1.f);
    const fVec vinf(kNegInf), vnk(float(j0 + nk));
    const float slope = p_.alibi_slopes != nullptr ? p_.alibi_slopes[h] : 0.f;
    fVec vmax(kNegInf);
    const fVec iota = fVec::arange(0.f, 1.f);
    for (int c = 0; c < bsp_; c += kVec) {
      const fVec j = iota + fVec(float(j0 + c));
      fVec x = fVec::loadu(s + c);
      if (p_.soft_cap > 0.f) x = fVec(p_.soft_cap) * (x / fVec(p_.soft_cap)).tanh();
      if (slope != 0.f) x = at::vec::fmadd(fVec(slope), j - vpos, x);
      const fVec ok = (j <= vpos) & (j > vlo) & (j < vnk);
      x = fVec::blendv(vinf, x, ok);
      x.store(s + c);
      vmax = at::vec::maximum(vmax, x);
    }
    const float bmax = hmax(vmax);
    if (bmax == kNegInf) return false;
    const float m_new = std::max(sc.m[r], bmax);
    corr = std::exp(sc.m[r] - m_new);
    fVec vsum(0.f);
    const fVec vm(m_new);
    for (int c = 0; c < bsp_; c += kVec) {
      const fVec e = (fVec::loadu(s + c) - vm).exp();
      e.store(s + c);
      vsum = vsum + e;
    }
    sc.l[r] = sc.l[r] * corr + hsum(vsum);
    sc.m[r] = m_new;
    return true;
  }

  // One cache block of kv head kvh against rows [r0, r0 + rows) (all of which use kvh).
  void process_block(int64_t block, int block_start, int j0, int j1, int kvh, int r0, int rows,
                     Scratch& sc) const {
    const int nk = j1 - j0, off = j0 - block_start;
    float* s = sc.scores.data();
    scores(sc.q.data() + size_t(r0) * hdp_, key_row(block, off, kvh), nk, rows, s);
    // Softmax of every row first (rows with no visible key get p = 0).
    for (int i = 0; i < rows; ++i) {
      float corr = 1.f;
      const int r = r0 + i;
      float* prow = s + i * bsp_;
      if (!softmax_row(prow, r, kvh * group_ + i % group_, j0, nk, sc, corr)) {
        std::fill(prow, prow + bsp_, 0.f);
        continue;
      }
      if (corr != 1.f) {
        float* acc = sc.acc.data() + size_t(r) * hdp_;
        const fVec vc(corr);
        for (int c = 0; c < hdp_; c += kVec) (fVec::loadu(acc + c) * vc).store(acc + c);
      }
    }
    const int nchunks = hdp_ / kVec;
    float* acc0 = sc.acc.data() + size_t(r0) * hdp_;
    const T* v0 = value_row(block, off, kvh);
    const int64_t vs = p_.vc_stride_token;
    if (rows <= 8 && tail_ == 0) {
      // Few rows (decode): read V once per key straight from the cache.
      for (int c = 0; c < nchunks; c += 4) {
        const int nc = std::min(4, nchunks - c);
        for (int i = 0; i < rows; i += kRowBlock) {
          float* a = acc0 + size_t(i) * hdp_ + c * kVec;
          const float* pr = s + i * bsp_;
          const T* v = v0 + c * kVec;
          if (rows - i >= kRowBlock && nc == 4) {
            pv_rows_direct<kRowBlock, 4>(a, hdp_, pr, bsp_, v, vs, nk);
          } else {
            for (int ii = i; ii < std::min(rows, i + kRowBlock); ++ii) {
              float* a1 = acc0 + size_t(ii) * hdp_ + c * kVec;
              const float* p1 = s + ii * bsp_;
              switch (nc) {
                case 4: pv_rows_direct<1, 4>(a1, hdp_, p1, bsp_, v, vs, nk); break;
                case 3: pv_rows_direct<1, 3>(a1, hdp_, p1, bsp_, v, vs, nk); break;
                case 2: pv_rows_direct<1, 2>(a1, hdp_, p1, bsp_, v, vs, nk); break;
                default: pv_rows_direct<1, 1>(a1, hdp_, p1, bsp_, v, vs, nk); break;
              }
            }
          }
        }
      }
      return;
    }
    // Many rows (prefill): V rows of this block in fp32 (zero padded), reused by every row.
    for (int j = 0; j < nk; ++j) {
      const T* v = v0 + j * vs;
      float* dst = sc.vf.data() + size_t(j) * hdp_;
      for (int c = 0; c < nfull_; ++c) load_f(v + c * kVec).store(dst + c * kVec);
      if (tail_ > 0) load_f_partial(v + nfull_ * kVec, tail_).store(dst + nfull_ * kVec);
    }
    for (int i = 0; i < rows; ++i) {
      const float* prow = s + i * bsp_;
      float* acc = acc0 + size_t(i) * hdp_;
      for (int c0 = 0; c0 < nchunks; c0 += 8) {
        const int nc = std::min(8, nchunks - c0);
        float* a = acc + c0 * kVec;
        const float* vf = sc.vf.data() + c0 * kVec;
        switch (nc) {
          case 8: pv_row<8>(a, prow, vf, hdp_, nk); break;
          case 7: pv_row<7>(a, prow, vf, hdp_, nk); break;
          case 6: pv_row<6>(a, prow, vf, hdp_, nk); break;
          case 5: pv_row<5>(a, prow, vf, hdp_, nk); break;
          case 4: pv_row<4>(a, prow, vf, hdp_, nk); break;
          case 3: pv_row<3>(a, prow, vf, hdp_, nk); break;
          case 2: pv_row<2>(a, prow, vf, hdp_, nk); break;
          default: pv_row<1>(a, prow, vf, hdp_, nk); break;
        }
      }
    }
  }

  void store_output(const WorkItem& w, int q_start, const Scratch& sc) const {
    const int rows = (w.t1 - w.t0) * group_ * (w.h1 - w.h0);
    for (int r = 0; r < rows; ++r) {
      T* dst = static_cast<T*>(p_.out) + int64_t(q_start + token_of(w, r)) * p_.o_stride_token +
               int64_t(head_of(w, r)) * p_.o_stride_head;
      const float* acc = sc.acc.data() + size_t(r) * hdp_;
      const fVec inv(sc.l[r] > 0.f ? 1.f / sc.l[r] : 0.f);
      for (int c = 0; c < nfull_; ++c) store_f(dst + c * kVec, fVec::loadu(acc + c * kVec) * inv);
      if (tail_ > 0) store_f_partial(dst + nfull_ * kVec, fVec::loadu(acc + nfull_ * kVec) * inv, tail_);
    }
  }

  const PagedAttentionParams& p_;
  const int group_, hd_, nfull_, tail_, hdp_, bsp_;
};

// Decode-like sequences (few query rows) take all kv heads in one item, so each cache block is
// read as one contiguous run; they are split over kv heads only when there are too few items
// for the threads. Prefill sequences get one item per (kv head, chunk of tokens).
void make_items(const PagedAttentionParams& p, int num_threads, std::vector<WorkItem>& items) {
  items.clear();
  const int group = p.num_heads / p.num_kv_heads;
  const int chunk = std::max(1, kTargetRows / group);
  int64_t base_items = 0;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
    base_items += q_len * p.num_heads <= kDecodeRows ? (q_len > 0)
                                                     : int64_t(p.num_kv_heads) * ((q_len + chunk - 1) / chunk);
  }
  const int64_t want = 4 * int64_t(num_threads);
  const int splits = int(std::min<int64_t>(p.num_kv_heads, (want + base_items - 1) / std::max<int64_t>(base_items, 1)));
  const int heads_per_split = (p.num_kv_heads + splits - 1) / splits;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
    const int ctx = p.seq_lens[s];
    const bool decode_like = q_len * p.num_heads <= kDecodeRows;
    const int tok_chunk = decode_like ? std::max(q_len, 1) : chunk;
    const int head_step = decode_like ? heads_per_split : 1;
    for (int t0 = 0; t0 < q_len; t0 += tok_chunk) {
      const int t1 = std::min(q_len, t0 + tok_chunk);
      int64_t keys = ctx - q_len + t1;  // keys seen by the last row
      if (p.sliding_window > 0) keys = std::min<int64_t>(keys, p.sliding_window + t1 - t0);
      for (int h0 = 0; h0 < p.num_kv_heads; h0 += head_step) {
        const int h1 = std::min(p.num_kv_heads, h0 + head_step);
        const int64_t cost = (int64_t(t1 - t0) * group * (keys + 16) + keys * 4) * (h1 - h0);
        items.push_back({s, h0, h1, t0, t1, cost});
      }
    }
  }
}

template <typename T>
void paged_attention_impl(const PagedAttentionParams& p) {
  const Attention<T> attn(p);
  // Reused across calls; bound to references so worker threads see the caller's vectors.
  static thread_local std::vector<WorkItem> items_buf;
  static thread_local std::vector<int64_t> prefix_buf;
  std::vector<WorkItem>& items = items_buf;
  std::vector<int64_t>& prefix = prefix_buf;
  make_items(p, at::get_num_threads(), items);
  const int64_t n = int64_t(items.size());
  if (n == 0) return;
  prefix.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + items[i].cost;
  // Contiguous item ranges of equal cost, a few per thread.
  const int64_t parts = std::min<int64_t>(n, int64_t(at::get_num_threads()) * 4);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    static thread_local Scratch scratch;
    for (int64_t part = begin; part < end; ++part) {
      const int64_t lo_cost = prefix[n] * part / parts, hi_cost = prefix[n] * (part + 1) / parts;
      const int64_t i0 = std::lower_bound(prefix.begin(), prefix.begin() + n, lo_cost) - prefix.begin();
      const int64_t i1 = part + 1 == parts ? n
          : std::lower_bound(prefix.begin(), prefix.begin() + n, hi_cost) - prefix.begin();
      for (int64_t i = i0; i < i1; ++i) attn.run(items[i], scratch);
    }
  });
}

}  // namespace

void paged_attention_kernel(const PagedAttentionParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { paged_attention_impl<scalar_t>(p); });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(paged_attention_kernel, PagedAttentionParams)

namespace octavo {

void paged_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& query_start_loc,
                         const at::Tensor& seq_lens, const at::Tensor& block_table, double scale,
                         int64_t sliding_window, double soft_cap,
                         const std::optional<at::Tensor>& alibi_slopes) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &query, &key_cache, &value_cache, &query_start_loc,
                              &seq_lens, &block_table})
    TORCH_CHECK(t->device().is_cpu(), "paged_attention: all tensors must be on the CPU");
  TORCH_CHECK(query.dim() == 3, "paged_attention: query must be [T, Hq, hd], got ", query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes(), "paged_attention: out ", out.sizes(),
              " must match query ", query.sizes());
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "paged_attention: caches must be [num_blocks, block_size, Hk, hd], got ",
              key_cache.sizes(), " and ", value_cache.sizes());
  const int64_t num_heads = query.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == query.size(2), "paged_attention: cache head size ",
              key_cache.size(3), " != query head size ", query.size(2));
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "paged_attention: Hq=",
              num_heads, " is not a multiple of Hk=", num_kv_heads);
  OCTAVO_CHECK_SAME_DTYPE(query, out);
  OCTAVO_CHECK_SAME_DTYPE(query, key_cache);
  OCTAVO_CHECK_SAME_DTYPE(query, value_cache);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &query, &key_cache, &value_cache})
    TORCH_CHECK(t->size(-1) <= 1 || t->stride(-1) == 1,
                "paged_attention: query/out/caches must have a unit last stride");
  const int64_t num_seqs = seq_lens.size(0);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&query_start_loc, &seq_lens, &block_table})
    TORCH_CHECK(t->scalar_type() == at::kInt, "paged_attention: query_start_loc, seq_lens and "
                "block_table must be int32");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.is_contiguous(), "paged_attention: seq_lens must be contiguous [S]");
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.size(0) == num_seqs + 1 &&
                  query_start_loc.is_contiguous(),
              "paged_attention: query_start_loc must be contiguous [S+1]");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == num_seqs && block_table.stride(1) == 1,
              "paged_attention: block_table must be [S, max_blocks] with a unit last stride");
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t block_size = key_cache.size(1), max_blocks = block_table.size(1);
  TORCH_CHECK(num_seqs == 0 || (qsl[0] == 0 && qsl[num_seqs] <= query.size(0)),
              "paged_attention: query_start_loc must start at 0 and end within T");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = qsl[s + 1] - qsl[s];
    TORCH_CHECK(q_len >= 0 && lens[s] >= q_len && lens[s] <= max_blocks * block_size,
                "paged_attention: sequence ", s, " has q_len ", q_len, " and seq_len ", lens[s],
                " (need q_len <= seq_len <= max_blocks * block_size = ", max_blocks * block_size, ")");
  }
  if (alibi_slopes.has_value()) {
    TORCH_CHECK(alibi_slopes->device().is_cpu() && alibi_slopes->scalar_type() == at::kFloat &&
                    alibi_slopes->numel() == num_heads && alibi_slopes->is_contiguous(),
                "paged_attention: alibi_slopes must be a contiguous float32 [Hq] CPU tensor");
  }
  TORCH_CHECK(sliding_window >= 0, "paged_attention: sliding_window must be >= 0");
  TORCH_CHECK(soft_cap >= 0, "paged_attention: soft_cap must be >= 0");
  cpu::PagedAttentionParams p{};
  p.out = out.data_ptr();
  p.query = query.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.query_start_loc = qsl;
  p.seq_lens = lens;
  p.block_table = block_table.data_ptr<int32_t>();
  p.alibi_slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  p.q_stride_token = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.o_stride_token = out.stride(0);
  p.o_stride_head = out.stride(1);
  p.kc_stride_block = key_cache.stride(0);
  p.kc_stride_token = key_cache.stride(1);
  p.kc_stride_head = key_cache.stride(2);
  p.vc_stride_block = value_cache.stride(0);
  p.vc_stride_token = value_cache.stride(1);
  p.vc_stride_head = value_cache.stride(2);
  p.bt_stride = block_table.stride(0);
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_size = static_cast<int>(query.size(2));
  p.block_size = static_cast<int>(block_size);
  p.scale = static_cast<float>(scale);
  p.soft_cap = static_cast<float>(soft_cap);
  p.sliding_window = static_cast<int>(sliding_window);
  p.dtype = cpu::to_dtype(query, "paged_attention");
  OCTAVO_CALL_CPU_KERNEL(paged_attention_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
