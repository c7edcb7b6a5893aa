// The SIMT emulator's scheduler: every GPU thread of a block is a fiber with a small stack;
// a fiber runs until it reaches a barrier, a warp collective or its end, then control returns
// here. When nothing can run, waiting warp collectives and block barriers are completed, or the
// launch fails with a message naming the kernel, the block and where each thread waits.
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>

#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "simt/simt.h"

// Start/stop of the section holding every static __shared__ variable (defined by the linker).
extern "C" unsigned char __start_octavo_simt_shared[] __attribute__((weak, visibility("hidden")));
extern "C" unsigned char __stop_octavo_simt_shared[] __attribute__((weak, visibility("hidden")));

namespace octavo::simt {

thread_local ThreadCtx* tls_current = nullptr;

namespace {

#if defined(__x86_64__)
// switch_stack(save, to): saves callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save and resumes the context saved at `to`.
extern "C" void octavo_simt_switch(void** save, void* to);
asm(R"(
  .text
  .p2align 4
  .type octavo_simt_switch,@function
octavo_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size octavo_simt_switch,.-octavo_simt_switch
)");
#else
#error "the SIMT emulator's context switch is written for x86-64"
#endif

constexpr size_t kMaxThreads = 1024;
constexpr size_t kGuard = 4096;

size_t stack_bytes() {
  const char* kb = std::getenv("OCTAVO_SIMT_STACK_KB");
  return (kb ? std::strtoul(kb, nullptr, 10) : 64) * 1024;
}

enum class State { kReady, kBarrier, kWarp, kDone };

struct Copy { void* dst; const void* src; unsigned bytes; };

struct Fiber {
  ThreadCtx ctx;
  void* sp = nullptr;
  State state = State::kReady;
  const char* what = nullptr;
  Site site;
  WarpCall* call = nullptr;
  std::vector<Copy> copies;     // queued cp.async copies, oldest first
  std::vector<size_t> groups;   // end index in `copies` of each committed group
};

struct Launch {
  std::vector<Fiber> fibers;
  unsigned char* stacks = nullptr;  // kMaxThreads stacks, each below a guard page
  size_t stack_size = 0;
  std::vector<unsigned char> dynamic_smem;
  void* scheduler_sp = nullptr;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  std::string failure;
};

std::mutex g_mutex;  // one kernel at a time: static __shared__ variables are process-wide
Launch g;

void to_scheduler(Fiber& f) { octavo_simt_switch(&f.sp, g.scheduler_sp); }

void flush_copies(Fiber& f, size_t upto) {
  for (size_t i = 0; i < upto; ++i) std::memcpy(f.copies[i].dst, f.copies[i].src, f.copies[i].bytes);
  f.copies.erase(f.copies.begin(), f.copies.begin() + static_cast<long>(upto));
  for (auto& end : f.groups) end = end > upto ? end - upto : 0;
}

[[noreturn]] void fiber_main() {
  Fiber& f = *g.running;
  try {
    (*g.body)();
    flush_copies(f, f.copies.size());
  } catch (...) {
    g.error = std::current_exception();
  }
  f.groups.clear();
  f.state = State::kDone;
  to_scheduler(f);
  __builtin_unreachable();
}

void* initial_stack(unsigned char* top) {
  // Layout popped by octavo_simt_switch: csr word, r15..rbp, return address = fiber_main, and a
  // fake caller slot so that fiber_main starts with the ABI's stack alignment.
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  uint32_t csr[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
  *--sp = (uint64_t(csr[1]) << 32) | csr[0];
  return sp;
}

void ensure_stacks() {
  const size_t size = stack_bytes();
  if (g.stacks && g.stack_size == size) return;
  if (g.stacks) munmap(g.stacks, kMaxThreads * (g.stack_size + kGuard));
  void* mem = mmap(nullptr, kMaxThreads * (size + kGuard), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) throw std::runtime_error("octavo_simt: cannot map fiber stacks");
  g.stacks = static_cast<unsigned char*>(mem);
  g.stack_size = size;
  for (size_t i = 0; i < kMaxThreads; ++i) mprotect(g.stacks + i * (size + kGuard), kGuard, PROT_NONE);
}

std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) && info.dli_sname) {
    int status = 0;
    std::unique_ptr<char, void (*)(void*)> d(abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status), std::free);
    return status == 0 ? d.get() : info.dli_sname;
  }
  std::ostringstream s;
  s << "kernel@" << kernel;
  return s.str();
}

std::string where(const Site& s) {
  std::string file = s.file_name();
  const auto slash = file.rfind('/');
  if (slash != std::string::npos) file = file.substr(slash + 1);
  return file + ":" + std::to_string(s.line());
}

// Completes every warp collective whose mask's lanes have all arrived with the same operation.
bool release_warps() {
  bool released = false;
  const size_t n = g.fibers.size();
  for (size_t base = 0; base < n; base += 32) {
    for (size_t l = 0; l < 32 && base + l < n; ++l) {
      Fiber& f = g.fibers[base + l];
      if (f.state != State::kWarp) continue;
      const unsigned mask = f.call->mask;
      WarpCall* lanes[32] = {};
      bool complete = true;
      for (unsigned j = 0; j < 32 && complete; ++j) {
        if (!(mask >> j & 1u)) continue;
        if (base + j >= n) { complete = false; break; }
        Fiber& o = g.fibers[base + j];
        complete = o.state == State::kWarp && o.call->mask == mask && o.call->fn == f.call->fn;
        lanes[j] = o.call;
      }
      if (!complete) continue;
      f.call->fn(lanes, mask);
      for (unsigned j = 0; j < 32; ++j)
        if (mask >> j & 1u) g.fibers[base + j].state = State::kReady;
      released = true;
    }
  }
  return released;
}

std::string describe_waits() {
  std::map<std::string, std::vector<size_t>> by_place;
  for (size_t t = 0; t < g.fibers.size(); ++t) {
    const Fiber& f = g.fibers[t];
    std::string key;
    if (f.state == State::kDone) key = "exited";
    else if (f.state == State::kBarrier) key = std::string("wait at ") + f.what + " (" + where(f.site) + ")";
    else {
      char mask[16];
      std::snprintf(mask, sizeof mask, "0x%08x", f.call->mask);
      key = std::string("wait at ") + f.what + " mask " + mask + " (" + where(f.site) + ")";
    }
    by_place[key].push_back(t);
  }
  std::ostringstream s;
  for (const auto& [key, threads] : by_place) {
    s << "; " << threads.size() << " thread(s) " << key << " [threads " << threads.front();
    if (threads.size() > 1) s << (threads.size() == threads.back() - threads.front() + 1 ? ".." : ",..,") << threads.back();
    s << "]";
  }
  return s.str();
}

bool release_barrier() {
  const Fiber& first = g.fibers.front();
  for (const Fiber& f : g.fibers) {
    if (f.state != State::kBarrier || f.site.line() != first.site.line() ||
        std::strcmp(f.site.file_name(), first.site.file_name()) != 0)
      return false;
  }
  for (Fiber& f : g.fibers) f.state = State::kReady;
  return true;
}

void run_block(const void* kernel, uint3 block_idx) {
  for (Fiber& f : g.fibers) {
    f.state = State::kReady;
    f.ctx.block_idx = block_idx;
    f.copies.clear();
    f.groups.clear();
  }
  for (size_t t = 0; t < g.fibers.size(); ++t)
    g.fibers[t].sp = initial_stack(g.stacks + (t + 1) * (g.stack_size + kGuard));
  size_t done = 0;
  while (done < g.fibers.size()) {
    for (Fiber& f : g.fibers) {
      if (f.state != State::kReady) continue;
      g.running = &f;
      tls_current = &f.ctx;
      octavo_simt_switch(&g.scheduler_sp, f.sp);
      tls_current = nullptr;
      if (g.error) std::rethrow_exception(std::exchange(g.error, nullptr));
      if (!g.failure.empty()) break;
      done += f.state == State::kDone;
    }
    std::ostringstream head;
    head << "octavo_simt: kernel '" << kernel_name(kernel) << "', block (" << block_idx.x << ","
         << block_idx.y << "," << block_idx.z << "): ";
    if (!g.failure.empty()) throw std::runtime_error(head.str() + std::exchange(g.failure, ""));
    if (done == g.fibers.size() || release_warps() || release_barrier()) continue;
    throw std::runtime_error(head.str() + "deadlock: a barrier or warp collective that not all "
                             "expected threads reach" + describe_waits());
  }
}

void validate(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("octavo_simt: invalid launch configuration grid (" +
                             std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                             std::to_string(grid.z) + ") block (" + std::to_string(block.x) + "," +
                             std::to_string(block.y) + "," + std::to_string(block.z) + ")");
}

}  // namespace

void run_kernel(const void* kernel, dim3 grid, dim3 block, size_t smem,
                const std::function<void()>& body) {
  validate(grid, block);
  const std::lock_guard<std::mutex> lock(g_mutex);
  ensure_stacks();
  const unsigned n = block.x * block.y * block.z;
  g.fibers.resize(n);
  g.dynamic_smem.assign(smem + 16, 0);
  auto* dyn = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(g.dynamic_smem.data()) + 15) & ~uintptr_t(15));
  for (unsigned t = 0; t < n; ++t) {
    ThreadCtx& c = g.fibers[t].ctx;
    c.thread_idx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
    c.block_dim = block;
    c.grid_dim = grid;
    c.lane = t % 32;
    c.warp = t / 32;
    c.dynamic_smem = dyn;
  }
  g.body = &body;
  g.failure.clear();
  g.error = nullptr;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        // Fresh shared memory holds garbage on a GPU; 0xFF bytes are NaN in every float type.
        unsigned char *start = __start_octavo_simt_shared, *stop = __stop_octavo_simt_shared;
        if (start != stop) std::memset(start, 0xff, static_cast<size_t>(stop - start));
        std::memset(dyn, 0xff, smem);
        run_block(kernel, {x, y, z});
      }
}

[[noreturn]] void fail(const std::string& msg, Site site) {
  const std::string full = msg + " (" + where(site) + ")";
  if (!tls_current) throw std::runtime_error("octavo_simt: " + full);
  Fiber& f = *g.running;
  g.failure = "thread (" + std::to_string(f.ctx.thread_idx.x) + "," + std::to_string(f.ctx.thread_idx.y) +
              "," + std::to_string(f.ctx.thread_idx.z) + "): " + full;
  f.state = State::kDone;
  to_scheduler(f);
  __builtin_unreachable();
}

void warp_collective(WarpCall& call) {
  Fiber& f = *g.running;
  if (!(call.mask >> f.ctx.lane & 1u)) {
    char m[16];
    std::snprintf(m, sizeof m, "0x%08x", call.mask);
    fail(std::string(call.what) + " called by lane " + std::to_string(f.ctx.lane) +
             ", which is not in its mask " + m, call.site);
  }
  f.state = State::kWarp;
  f.call = &call;
  f.what = call.what;
  f.site = call.site;
  to_scheduler(f);
}

void block_barrier(const char* what, Site site) {
  Fiber& f = *g.running;
  f.state = State::kBarrier;
  f.what = what;
  f.site = site;
  to_scheduler(f);
}

void cp_async_enqueue(void* dst, const void* src, unsigned bytes) {
  g.running->copies.push_back({dst, src, bytes});
}

void cp_async_commit() {
  Fiber& f = *g.running;
  f.groups.push_back(f.copies.size());
}

void cp_async_wait(int keep_pending) {
  Fiber& f = *g.running;
  const size_t keep = static_cast<size_t>(keep_pending < 0 ? 0 : keep_pending);
  if (f.groups.size() <= keep) return;
  const size_t done_groups = f.groups.size() - keep;
  flush_copies(f, f.groups[done_groups - 1]);
  f.groups.erase(f.groups.begin(), f.groups.begin() + static_cast<long>(done_groups));
}

}  // namespace octavo::simt

unsigned __activemask() {
  using namespace octavo::simt;
  const Fiber& me = *g.running;
  unsigned mask = 0;
  const size_t base = size_t(me.ctx.warp) * 32;
  for (size_t l = 0; l < 32 && base + l < g.fibers.size(); ++l)
    if (g.fibers[base + l].state != State::kDone) mask |= 1u << l;
  return mask;
}
