// cuda_cpu.h: CUDA's built-ins for the plain CUDA C of kernels/*.cu, so that g++ compiles the very text NVRTC
// compiles (fused.kernel_source) and the tests run it on a CPU. Test infrastructure: kernels/ never uses it.
//
// A launch runs the blocks of its grid one after another (in order, or shuffled by a seed), and the threads of
// a block as fibers on the calling OS thread, made fresh for each block and switched by a 12-instruction x86-64
// context switch. A thread runs until it waits: at __syncthreads, every live thread of the block must arrive;
// at a warp shuffle, all 32 lanes of its warp must (stricter than hardware, which allows partial masks).
// Threads that reach a different barrier (by source line) are an error; threads that have returned count as
// arrived at __syncthreads, as on sm_70 and later. Shared memory, static and dynamic, is filled with NaN (0xff
// bytes) before every block, so a read before the write it needs is loud. A deadlock is an error, not a hang.
//
// Sanitizers: every fiber switch is announced to AddressSanitizer (__sanitizer_start/finish_switch_fiber) and
// to ThreadSanitizer (one TSan fiber per thread slot, switched without synchronisation). Within a block TSan
// sees CUDA's ordering and nothing more: __syncthreads is a release/acquire on a sync object, so a missing one
// is a data race it reports; a shuffle exchanges registers and orders no memory (in CUDA's memory model only
// __syncwarp and __syncthreads do), so TSan sees no order there either. Blocks are ordered one after another,
// as they run here (each acquires what the host and the blocks before it wrote): TSan does not judge ordering
// between blocks. Under ASan, static __shared__ arrays are plain statics with redzones (GCC gives none to
// variables in a named section), so they are not NaN-filled there.
//
// One launcher per kernel, CUDA_CPU_LAUNCHER(name), takes cuLaunchKernel's arguments (grid, block, shared
// bytes, void** params) and unpacks params by the kernel's own C signature.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#if !defined(__x86_64__)
#error "tests/cuda_cpu.h: the fiber switch is written for x86-64"
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define CUDA_CPU_ASAN 1
#define ASAN(...) __VA_ARGS__
#else
#define ASAN(...)
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define CUDA_CPU_TSAN 1
#define TSAN(...) __VA_ARGS__
#else
#define TSAN(...)
#endif
// The emulator's own bookkeeping is one OS thread's: TSan must see only the kernels' memory accesses
#define INTERNAL __attribute__((no_sanitize("thread")))

// ---- the language: qualifiers mean nothing on a CPU
#define __global__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#ifdef CUDA_CPU_ASAN
#define __shared__ static
#else
#define __shared__ static __attribute__((section("cuda_cpu_shared")))
#endif
// common.cuh's one-line macro for `extern __shared__ T name[]`, which C++ cannot declare at block scope
#define DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(cuda_cpu::dynamic_smem)

namespace cuda_cpu {

// Saves the callee-saved registers on the current stack and its pointer in *save, then continues on the stack
// `to` (whose top holds the same six registers and a return address). Nothing else needs saving between fibers.
extern "C" void cuda_cpu_switch(void** save, void* to);
asm(R"(
    .text
    .hidden cuda_cpu_switch
    .globl cuda_cpu_switch
    .type cuda_cpu_switch, @function
cuda_cpu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_cpu_switch, .-cuda_cpu_switch
)");

struct dim3_t { unsigned x, y, z; };
enum State { RUNNING, AT_SYNC, AT_SHUFFLE, DONE };

struct Fiber {
    void* sp;          // its stack pointer while switched away
    char* stack;       // lowest address of its stack (STACK bytes); the scheduler's own: learned from ASan
    size_t stack_size;
    dim3_t idx;
    State state;
    unsigned long shuffles;  // shuffles so far: picks the slot buffer
    void* tsan;              // its TSan fiber
    void* asan_fake;         // ASan's fake stack while switched away
};

struct Warp {
    unsigned slot[2][32];  // shuffle values; two buffers, alternating, so one wait per shuffle suffices
    int arrived;
    int line;  // the source line of the shuffle the first lane reached: every lane must reach the same one
};

const size_t STACK = 64 * 1024;
static Fiber sched;  // the launching thread
static Fiber* fibers;
static Warp* warps;
static int n_threads, n_alive, n_at_sync, n_made;
static unsigned long sync_no;
static int sync_line;  // the source line of the __syncthreads the first thread reached: all must reach it
static char block_sync[2];  // TSan sync objects for __syncthreads, one per parity
static char host_sync, block_done[2];  // TSan: host -> every block; each block -> the next (alternating objects,
static unsigned long block_no;         // so that no thread of a block is ordered after another of the same block)
static Fiber* cur;
static Fiber* came_from;  // the fiber the last switch left
static void (*body)(void*);
static void* body_arg;
static char error[512];
static dim3_t block_idx;
static void* dynamic_smem;
static unsigned long order_seed;

INTERNAL inline void switch_to(Fiber* to) {
    Fiber* from = cur;
    cur = to, came_from = from;
    ASAN(__sanitizer_start_switch_fiber(&from->asan_fake, to->stack, to->stack_size));
    TSAN(__tsan_switch_to_fiber(to->tsan, __tsan_switch_to_fiber_no_sync));
    cuda_cpu_switch(&from->sp, to->sp);
    ASAN(__sanitizer_finish_switch_fiber(from->asan_fake, nullptr, nullptr));
}

// The running thread waits: on to the next thread that can run, or back to the scheduler if none can.
INTERNAL inline void yield() {
    const int me = cur - fibers;
    for (int k = 1; k <= n_threads; k++) {
        Fiber* f = &fibers[(me + k) % n_threads];
        if (f->state == RUNNING) {
            if (f != cur) switch_to(f);
            return;
        }
    }
    switch_to(&sched);
}

// A failure inside a thread: record it and leave the block for good (the launch returns the error).
[[noreturn]] INTERNAL inline void fail_in_thread(const char* what) {
    if (!error[0])
        snprintf(error, sizeof error, "block (%u,%u,%u) thread %u: %s", block_idx.x, block_idx.y, block_idx.z,
                 cur->idx.x, what);
    cur->state = DONE;
    switch_to(&sched);
    abort();  // never resumed
}

INTERNAL inline void release_sync() {  // everyone alive has arrived at __syncthreads
    for (int i = 0; i < n_threads; i++)
        if (fibers[i].state == AT_SYNC) fibers[i].state = RUNNING;
    n_at_sync = 0;
}

INTERNAL inline void fiber_main() {  // a fiber's whole life: one thread of one block
#ifdef CUDA_CPU_ASAN
    const void* bottom;
    size_t size;
    __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
    if (came_from == &sched) sched.stack = (char*)bottom, sched.stack_size = size;  // switch_to(&sched) needs them
#endif
    TSAN(__tsan_acquire(&host_sync), __tsan_acquire(&block_done[(block_no + 1) & 1]));  // the blocks before
    body(body_arg);
    TSAN(__tsan_release(&block_done[block_no & 1]));
    cur->state = DONE;
    if (--n_alive > 0 && n_at_sync == n_alive) release_sync();  // returned threads count as arrived
    yield();
    abort();  // a finished thread is never resumed
}

INTERNAL inline void syncthreads(int line) {
    Fiber* f = cur;
    if (n_at_sync == 0) sync_line = line;
    else if (line != sync_line) fail_in_thread("threads of a block reached different __syncthreads");
    char* obj = &block_sync[sync_no & 1];
    TSAN(__tsan_release(obj));
    if (++n_at_sync == n_alive) {
        sync_no++;
        release_sync();
    } else {
        f->state = AT_SYNC;
        yield();
    }
    TSAN(__tsan_acquire(obj));
}

template <class T>
INTERNAL T shuffle(unsigned mask, T v, int lane_from(int lane, int arg), int arg, int line) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    if (mask != 0xffffffffu) fail_in_thread("a shuffle with a partial mask (not emulated)");
    Fiber* f = cur;
    const int lane = f->idx.x & 31, first = f->idx.x & ~31u;
    if (first + 32 > n_threads) fail_in_thread("a shuffle in a warp of fewer than 32 threads");
    Warp& w = warps[f->idx.x >> 5];
    const int parity = f->shuffles & 1;
    if (w.arrived == 0) w.line = line;
    else if (line != w.line) fail_in_thread("lanes of a warp reached different shuffles");
    memcpy(&w.slot[parity][lane], &v, 4);
    f->shuffles++;
    if (++w.arrived == 32) {
        w.arrived = 0;
        for (int i = first; i < first + 32; i++)
            if (fibers[i].state == AT_SHUFFLE) fibers[i].state = RUNNING;
    } else {
        f->state = AT_SHUFFLE;
        yield();
    }
    const int src = lane_from(lane, arg);
    if (src < 0 || src > 31) return v;  // out of the warp: the caller's own value, as on hardware
    T out;
    memcpy(&out, &w.slot[parity][src], 4);
    return out;
}
inline int lane_direct(int, int src) { return src; }
inline int lane_xor(int lane, int m) { return lane ^ m; }
INTERNAL inline dim3_t thread_idx() { return cur->idx; }
INTERNAL inline dim3_t block_index() { return block_idx; }

}  // namespace cuda_cpu

// ---- CUDA's built-in variables and functions, as kernels/*.cu uses them
#define threadIdx (cuda_cpu::thread_idx())
#define blockIdx (cuda_cpu::block_index())

// macros, so that each barrier knows its source line: threads reaching different ones is an error
#define __syncthreads() cuda_cpu::syncthreads(__LINE__)
#define __shfl_sync(mask, v, src) cuda_cpu::shuffle(mask, v, cuda_cpu::lane_direct, src, __LINE__)
#define __shfl_xor_sync(mask, v, m) cuda_cpu::shuffle(mask, v, cuda_cpu::lane_xor, m, __LINE__)
template <class T> inline T __ldcg(const T* p) { return *p; }
// Blocks never run at the same time here, so a fence orders nothing the CPU could reorder
inline void __threadfence() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }

namespace cuda_cpu {

extern "C" char __start_cuda_cpu_shared[] __attribute__((weak));
extern "C" char __stop_cuda_cpu_shared[] __attribute__((weak));

// Shared memory for a new block: every float read from it is a NaN. Under TSan not memset, which it would see
// as an access racing with the previous block's threads.
INTERNAL inline void fresh_shared(char* p, size_t n) {
#ifdef CUDA_CPU_TSAN
    for (volatile char* q = p; q < p + n; q++) *q = (char)0xff;
#else
    if (n) memset(p, 0xff, n);
#endif
}

INTERNAL inline void make_fiber(Fiber& f, unsigned tid) {  // a fresh thread: entering it runs fiber_main
    char* top = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(f.stack + STACK) & ~uintptr_t(15));
#ifdef CUDA_CPU_ASAN
    char* low = static_cast<char*>(f.sp) >= f.stack && static_cast<char*>(f.sp) < top - 64 ? (char*)f.sp : top - 64;
    __asan_unpoison_memory_region(low, top - low);  // frames the last thread on this stack left behind
#endif
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                               // fiber_main's own return address: it never returns
    *--sp = reinterpret_cast<void*>(&fiber_main);  // where cuda_cpu_switch's ret lands
    for (int i = 0; i < 6; i++) *--sp = nullptr;   // rbp, rbx, r12-r15
    f.sp = sp;
    f.stack_size = STACK;
    f.idx = {tid, 0, 0};
    f.state = RUNNING;
    f.shuffles = 0;
    TSAN(if (!f.tsan) f.tsan = __tsan_create_fiber(0));  // reused: a returned thread left TSan's call stack empty
}

INTERNAL inline const char* run_block(dim3_t b, unsigned smem) {
    block_idx = b;
    fresh_shared(__start_cuda_cpu_shared, __stop_cuda_cpu_shared - __start_cuda_cpu_shared);
    fresh_shared(static_cast<char*>(dynamic_smem), smem);
    n_alive = n_threads, n_at_sync = 0, sync_no = 0, block_no++;
    for (int i = 0; i < n_threads; i++) make_fiber(fibers[i], i);
    for (int w = 0; w < (n_threads + 31) / 32; w++) warps[w].arrived = 0;
    TSAN(__tsan_release(&host_sync));
    cur = &sched;
    while (n_alive > 0 && !error[0]) {
        int i = 0;
        while (i < n_threads && fibers[i].state != RUNNING) i++;
        if (i == n_threads) {
            int at_sync = 0, at_shuffle = 0;
            for (int j = 0; j < n_threads; j++) {
                at_sync += fibers[j].state == AT_SYNC;
                at_shuffle += fibers[j].state == AT_SHUFFLE;
            }
            snprintf(error, sizeof error, "block (%u,%u,%u): deadlock: %d thread(s) wait at __syncthreads, %d at a "
                     "shuffle, %d returned", b.x, b.y, b.z, at_sync, at_shuffle, n_threads - n_alive);
            break;
        }
        switch_to(&fibers[i]);  // runs threads until none can run
    }
    cur = nullptr;
#ifdef CUDA_CPU_TSAN
    for (int i = 0; error[0] && i < n_threads; i++) {  // a thread abandoned mid-kernel: its TSan fiber goes too
        __tsan_destroy_fiber(fibers[i].tsan);
        fibers[i].tsan = nullptr;
    }
#endif
    return error;
}

inline unsigned long next_random(unsigned long& s) {  // splitmix64
    unsigned long z = (s += 0x9e3779b97f4a7c15ul);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ul;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebul;
    return z ^ (z >> 31);
}

INTERNAL inline const char* run_grid(void (*fn)(void*), void* arg, dim3_t grid, dim3_t block, unsigned smem) {
    error[0] = 0;
    if (block.y != 1 || block.z != 1 || block.x < 1 || block.x > 1024)
        return snprintf(error, sizeof error, "block (%u,%u,%u): only 1-D blocks of 1..1024 threads", block.x,
                        block.y, block.z), error;
    if (smem > 48 * 1024)
        return snprintf(error, sizeof error, "%u bytes of dynamic shared memory: more than 48 KiB needs an "
                        "opt-in the kernels do not make", smem), error;
    body = fn, body_arg = arg;
    n_threads = (int)block.x;
    if (!fibers) {
        fibers = static_cast<Fiber*>(calloc(1024, sizeof(Fiber)));
        warps = static_cast<Warp*>(calloc(32, sizeof(Warp)));
    }
    for (; n_made < n_threads; n_made++) fibers[n_made].stack = static_cast<char*>(malloc(STACK));
    TSAN(sched.tsan = __tsan_get_current_fiber());
    dynamic_smem = malloc(smem ? smem : 1);  // exact size: under ASan a read past it is reported
    const unsigned long n = (unsigned long)grid.x * grid.y * grid.z;
    unsigned long* order = static_cast<unsigned long*>(malloc(sizeof(unsigned long) * (n ? n : 1)));
    for (unsigned long i = 0; i < n; i++) order[i] = i;
    unsigned long s = order_seed;
    for (unsigned long i = n; order_seed && i > 1; i--) {  // Fisher-Yates
        unsigned long j = next_random(s) % i, t = order[i - 1];
        order[i - 1] = order[j], order[j] = t;
    }
    for (unsigned long i = 0; i < n && !error[0]; i++) {  // x fastest, as the hardware numbers blocks
        const unsigned long k = order[i];
        run_block({(unsigned)(k % grid.x), (unsigned)(k / grid.x % grid.y), (unsigned)(k / grid.x / grid.y)}, smem);
    }
    TSAN(__tsan_acquire(&block_done[0]), __tsan_acquire(&block_done[1]));  // the host sees all the launch wrote
    free(order);
    free(dynamic_smem);
    dynamic_smem = nullptr;
    return error;
}

template <class... A> struct Launch {
    void (*kernel)(A...);
    void** params;
    template <size_t... I> void call(std::index_sequence<I...>) {
        kernel(*static_cast<std::remove_reference_t<A>*>(params[I])...);
    }
    static void run(void* self) { static_cast<Launch*>(self)->call(std::index_sequence_for<A...>{}); }
};

template <class... A>
inline const char* launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, unsigned smem,
                          void** params) {
    Launch<A...> l{kernel, params};
    return run_grid(&Launch<A...>::run, &l, {grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]}, smem);
}

}  // namespace cuda_cpu

// Blocks in a shuffled order from this seed (0: in order).
extern "C" void cuda_cpu_block_order(unsigned long seed) { cuda_cpu::order_seed = seed; }

// "" on success, else why the launch failed; grid and block are 3 unsigned each, params cuLaunchKernel's.
#define CUDA_CPU_LAUNCHER(name)                                                                                 \
    extern "C" const char* cuda_cpu_launch_##name(const unsigned* grid, const unsigned* block, unsigned smem,   \
                                                  void** params) {                                              \
        return cuda_cpu::launch(name, grid, block, smem, params);                                              \
    }
