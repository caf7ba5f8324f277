// A CUDA execution model on the CPU, for testing klspeech's kernels (src/ops/cuda/kernels.cu)
// where no GPU is: every thread of a block is a host thread, `__syncthreads` a barrier over
// the block, blocks run one after another (so `__shared__` arrays can be plain statics), and
// the math functions are the C library's. It covers what the kernels use: 1-D grids and
// blocks, shared memory, block barriers; no warp intrinsics, no atomics.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;

#define __global__
#define __launch_bounds__(threads)
#define __device__
#define __shared__ static

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

// CUDA's explicitly rounded f32 arithmetic (never contracted into FMA) and bit casts. Built
// without -mfma and in ISO C++ (no contraction), plain operators round the same way.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __double2float_rn(double a) { return (float)a; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// CUDA's bf16 and f16 storage types (cuda_bf16.h, cuda_fp16.h) and their conversions, which
// round to nearest, ties to even (f16 through GCC's _Float16, subnormals included).
struct __nv_bfloat16 {
    uint16_t bits;
};
struct __half {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x0040u)}; // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
inline float __half2float(__half h) {
    _Float16 v;
    std::memcpy(&v, &h.bits, 2);
    return (float)v;
}
inline __half __float2half_rn(float f) {
    _Float16 v = (_Float16)f;
    __half h;
    std::memcpy(&h.bits, &v, 2);
    return h;
}

// CUDA's integer min / max (device functions in the global namespace).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// Runs kernel<<<grid, block>>>(args...): `block` host threads walk the blocks in order, with a
// barrier between blocks (a block's statics are free again only when all its threads are done).
template <typename... P, typename... A>
void emu_launch(unsigned int grid, unsigned int block, void (*kernel)(P...), A... args) {
    blockDim = dim3{block, 1, 1};
    gridDim = dim3{grid, 1, 1};
    std::barrier<> bar(block);
    emu_block_barrier = &bar;
    std::vector<std::thread> threads;
    for (unsigned int t = 0; t < block; ++t) {
        threads.emplace_back([&, t] {
            threadIdx = dim3{t, 0, 0};
            for (unsigned int b = 0; b < grid; ++b) {
                blockIdx = dim3{b, 0, 0};
                kernel(args...);
                bar.arrive_and_wait();
            }
        });
    }
    for (auto& th : threads) th.join();
    emu_block_barrier = nullptr;
}
