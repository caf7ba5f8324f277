// klspeech's CUDA kernels (f32): fused forward and backward passes of the training path's
// row-wise ops, each one launch where candle's composition is five to fifteen.
//
// Compiled to PTX by build.rs (`--features cuda`) and loaded with candle's
// `CudaDevice::get_or_load_custom_func`; tests/cuda_kernels.rs runs this same file on the CPU
// through tests/cuda_emu (one host thread per CUDA thread) against klspeech's f64 references.
// The launch configurations (grid, block, argument order) are `ops::kernels::Launch` plans,
// shared by the GPU launcher and the emulator test.
//
// Row kernels: one block per row of `d` elements; blockDim.x is a power of two (32..1024);
// sums go through `block_sum2` (shared-memory tree, fixed order: deterministic).

#define KL_MAX_THREADS 1024

// Two block-wide sums at once; every thread gets both. The shared arrays are reused at once
// by the next call: the trailing barrier keeps a fast thread from overwriting them early.
__device__ void block_sum2(float* a, float* b) {
    __shared__ float sa[KL_MAX_THREADS];
    __shared__ float sb[KL_MAX_THREADS];
    unsigned int t = threadIdx.x;
    sa[t] = *a;
    sb[t] = *b;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) {
            sa[t] += sa[t + s];
            sb[t] += sb[t + s];
        }
        __syncthreads();
    }
    *a = sa[0];
    *b = sb[0];
    __syncthreads();
}

// Mean and 1 / sqrt(var + eps) of row x[0..d] (two passes: the variance of centred values).
__device__ void row_moments(const float* x, int d, float eps, float* mean, float* rstd) {
    float s = 0.0f, unused = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += x[i];
    block_sum2(&s, &unused);
    float m = s / (float)d;
    float q = 0.0f;
    unused = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float c = x[i] - m;
        q += c * c;
    }
    block_sum2(&q, &unused);
    *mean = m;
    *rstd = 1.0f / sqrtf(q / (float)d + eps);
}

// y = (x - mean(x)) / sqrt(var(x) + eps) per row of d; x, y: [rows, d].
extern "C" __global__ void kl_standardize_fwd(const float* x, float* y, int rows, int d, float eps) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * d;
    float* yr = y + (long long)r * d;
    float m, rs;
    row_moments(xr, d, eps, &m, &rs);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = (xr[i] - m) * rs;
}

// dx = (g - mean(g) - y mean(g y)) / sqrt(var(x) + eps) per row, y the forward's output.
extern "C" __global__ void kl_standardize_bwd(const float* x, const float* y, const float* g, float* dx, int rows, int d, float eps) {
    int r = blockIdx.x;
    if (r >= rows) return;
    long long o = (long long)r * d;
    float m, rs;
    row_moments(x + o, d, eps, &m, &rs);
    float sg = 0.0f, sgy = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float gi = g[o + i];
        sg += gi;
        sgy += gi * y[o + i];
    }
    block_sum2(&sg, &sgy);
    float mg = sg / (float)d, mgy = sgy / (float)d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dx[o + i] = (g[o + i] - mg - y[o + i] * mgy) * rs;
}

// The softmax's backward with the attention's extras, per row of d:
// dp = g * mask (mask may be null: no dropout), dx = scale * y * (dp - sum(dp y)).
extern "C" __global__ void kl_softmax_bwd(const float* y, const float* g, const float* mask, float* dx, int rows, int d, float scale) {
    int r = blockIdx.x;
    if (r >= rows) return;
    long long o = (long long)r * d;
    float s = 0.0f, unused = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float dp = mask ? g[o + i] * mask[o + i] : g[o + i];
        s += dp * y[o + i];
    }
    block_sum2(&s, &unused);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float dp = mask ? g[o + i] * mask[o + i] : g[o + i];
        dx[o + i] = scale * y[o + i] * (dp - s);
    }
}

// The exact GELU x Phi(x) and its backward dx = g (Phi(x) + x phi(x)), elementwise over n.
extern "C" __global__ void kl_gelu_fwd(const float* x, float* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
}

extern "C" __global__ void kl_gelu_bwd(const float* x, const float* g, float* dx, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = x[i];
        float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
        dx[i] = g[i] * (cdf + v * pdf);
    }
}
