// klspeech's CUDA kernels (f32; most also bf16 / f16, `_bf16` / `_f16`): fused forward and
// backward passes of the training path's row-wise ops, each one launch where candle's
// composition is five to fifteen.
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

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// A loop over a compile-time count unrolled (its array indices constant: registers, not local
// memory); the emulator's g++ takes no such pragma.
#define KL_UNROLL _Pragma("unroll")
#else
#define KL_UNROLL
#endif

// Storage types of the kernels that also take bf16 / f16 (computing in f32 or f64 all the
// same): a value as f32, and an f32 rounded to the nearest storable value (ties to even).
__device__ inline float kl_ld(float v) { return v; }
__device__ inline float kl_ld(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float kl_ld(__half v) { return __half2float(v); }
template <typename T> __device__ inline T kl_st(float v);
template <> __device__ inline float kl_st<float>(float v) { return v; }
template <> __device__ inline __nv_bfloat16 kl_st<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ inline __half kl_st<__half>(float v) { return __float2half_rn(v); }

// Where a column-summing backward's f32 partial sums start in its output of T: right after
// its n values of T for f32; for bf16 / f16 at the next 4-byte boundary (n rounded up to an
// even count), the sums stored as f32 in the 16-bit buffer (`ops::kernels::tail_offset`).
template <typename T> __device__ inline float* kl_tail(T* out, long long n) {
    if (sizeof(T) == sizeof(float)) return (float*)(void*)(out + n);
    return (float*)(void*)(out + ((n + 1) & ~1LL));
}

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
template <typename T>
__device__ void row_moments(const T* x, int d, float eps, float* mean, float* rstd) {
    float s = 0.0f, unused = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += kl_ld(x[i]);
    block_sum2(&s, &unused);
    float m = s / (float)d;
    float q = 0.0f;
    unused = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float c = kl_ld(x[i]) - m;
        q += c * c;
    }
    block_sum2(&q, &unused);
    *mean = m;
    *rstd = 1.0f / sqrtf(q / (float)d + eps);
}

// The row, softmax and GELU kernels below also come in bf16 and f16 (`_bf16`, `_f16`: half-
// precision training): loads converted to f32, the f32 arithmetic, each store rounded once, so
// a half-type instance gives the f32 kernel's result on the same values, rounded.

// y = (x - mean(x)) / sqrt(var(x) + eps) per row of d; x, y: [rows, d].
template <typename T>
__device__ void standardize_fwd(const T* x, T* y, int rows, int d, float eps) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + (long long)r * d;
    T* yr = y + (long long)r * d;
    float m, rs;
    row_moments(xr, d, eps, &m, &rs);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = kl_st<T>((kl_ld(xr[i]) - m) * rs);
}

// dx = (g - mean(g) - y mean(g y)) / sqrt(var(x) + eps) per row, y the forward's output.
template <typename T>
__device__ void standardize_bwd(const T* x, const T* y, const T* g, T* dx, int rows, int d, float eps) {
    int r = blockIdx.x;
    if (r >= rows) return;
    long long o = (long long)r * d;
    float m, rs;
    row_moments(x + o, d, eps, &m, &rs);
    float sg = 0.0f, sgy = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float gi = kl_ld(g[o + i]);
        sg += gi;
        sgy += gi * kl_ld(y[o + i]);
    }
    block_sum2(&sg, &sgy);
    float mg = sg / (float)d, mgy = sgy / (float)d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dx[o + i] = kl_st<T>((kl_ld(g[o + i]) - mg - kl_ld(y[o + i]) * mgy) * rs);
}

// The softmax's backward with the attention's extras, per row of d:
// dp = g * mask (mask may be null: no dropout), dx = scale * y * (dp - sum(dp y)).
template <typename T>
__device__ void softmax_bwd(const T* y, const T* g, const T* mask, T* dx, int rows, int d, float scale) {
    int r = blockIdx.x;
    if (r >= rows) return;
    long long o = (long long)r * d;
    float s = 0.0f, unused = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float dp = mask ? kl_ld(g[o + i]) * kl_ld(mask[o + i]) : kl_ld(g[o + i]);
        s += dp * kl_ld(y[o + i]);
    }
    block_sum2(&s, &unused);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float dp = mask ? kl_ld(g[o + i]) * kl_ld(mask[o + i]) : kl_ld(g[o + i]);
        dx[o + i] = kl_st<T>(scale * kl_ld(y[o + i]) * (dp - s));
    }
}

// Block-wide maximum; every thread gets it (the shared array reused at once, as block_sum2).
__device__ float block_max(float a) {
    __shared__ float sm[KL_MAX_THREADS];
    unsigned int t = threadIdx.x;
    sm[t] = a;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) sm[t] = fmaxf(sm[t], sm[t + s]);
        __syncthreads();
    }
    a = sm[0];
    __syncthreads();
    return a;
}

// The attention's probabilities from its scores, per row of `ld` values of which the first d
// are keys (ld: the keys padded to a multiple of 8, so that cuBLAS's products over them run
// aligned kernels): y = scale s + kb, p = softmax of the d values of y, 0 in the padding.
// kb [clips, d] (null: none) is the key bias of row r's clip, r / rows_per_clip. s is read
// three times (the row stays in cache), p written once.
template <typename T>
__device__ void attn_softmax(const T* s, const T* kb, T* p, int rows, int ld, int d, int rows_per_clip, float scale) {
    int r = blockIdx.x;
    if (r >= rows) return;
    long long o = (long long)r * ld;
    const T* kr = kb ? kb + (long long)(r / rows_per_clip) * d : nullptr;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < d; j += blockDim.x) m = fmaxf(m, scale * kl_ld(s[o + j]) + (kr ? kl_ld(kr[j]) : 0.0f));
    m = block_max(m);
    float sum = 0.0f, unused = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) sum += expf(scale * kl_ld(s[o + j]) + (kr ? kl_ld(kr[j]) : 0.0f) - m);
    block_sum2(&sum, &unused);
    float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < ld; j += blockDim.x)
        p[o + j] = kl_st<T>(j < d ? expf(scale * kl_ld(s[o + j]) + (kr ? kl_ld(kr[j]) : 0.0f) - m) * inv : 0.0f);
}

// The exact (erf) GELU, y = x Phi(x), and its backward dx = g (Phi(x) + x phi(x)).
template <typename T>
__device__ void gelu_fwd(const T* x, T* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = kl_ld(x[i]);
        y[i] = kl_st<T>(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
    }
}

template <typename T>
__device__ void gelu_bwd(const T* x, const T* g, T* dx, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = kl_ld(x[i]);
        float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
        dx[i] = kl_st<T>(kl_ld(g[i]) * (cdf + v * pdf));
    }
}

extern "C" __global__ void kl_standardize_fwd(const float* x, float* y, int rows, int d, float eps) {
    standardize_fwd(x, y, rows, d, eps);
}
extern "C" __global__ void kl_standardize_fwd_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int rows, int d, float eps) {
    standardize_fwd(x, y, rows, d, eps);
}
extern "C" __global__ void kl_standardize_fwd_f16(const __half* x, __half* y, int rows, int d, float eps) {
    standardize_fwd(x, y, rows, d, eps);
}
extern "C" __global__ void kl_standardize_bwd(const float* x, const float* y, const float* g, float* dx, int rows, int d, float eps) {
    standardize_bwd(x, y, g, dx, rows, d, eps);
}
extern "C" __global__ void kl_standardize_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* y, const __nv_bfloat16* g, __nv_bfloat16* dx, int rows, int d, float eps) {
    standardize_bwd(x, y, g, dx, rows, d, eps);
}
extern "C" __global__ void kl_standardize_bwd_f16(const __half* x, const __half* y, const __half* g, __half* dx, int rows, int d, float eps) {
    standardize_bwd(x, y, g, dx, rows, d, eps);
}
extern "C" __global__ void kl_softmax_bwd(const float* y, const float* g, const float* mask, float* dx, int rows, int d, float scale) {
    softmax_bwd(y, g, mask, dx, rows, d, scale);
}
extern "C" __global__ void kl_softmax_bwd_bf16(const __nv_bfloat16* y, const __nv_bfloat16* g, const __nv_bfloat16* mask, __nv_bfloat16* dx, int rows, int d, float scale) {
    softmax_bwd(y, g, mask, dx, rows, d, scale);
}
extern "C" __global__ void kl_softmax_bwd_f16(const __half* y, const __half* g, const __half* mask, __half* dx, int rows, int d, float scale) {
    softmax_bwd(y, g, mask, dx, rows, d, scale);
}
extern "C" __global__ void kl_gelu_fwd(const float* x, float* y, int n) {
    gelu_fwd(x, y, n);
}
extern "C" __global__ void kl_gelu_fwd_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int n) {
    gelu_fwd(x, y, n);
}
extern "C" __global__ void kl_gelu_fwd_f16(const __half* x, __half* y, int n) {
    gelu_fwd(x, y, n);
}
extern "C" __global__ void kl_gelu_bwd(const float* x, const float* g, float* dx, int n) {
    gelu_bwd(x, g, dx, n);
}
extern "C" __global__ void kl_gelu_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* g, __nv_bfloat16* dx, int n) {
    gelu_bwd(x, g, dx, n);
}
extern "C" __global__ void kl_gelu_bwd_f16(const __half* x, const __half* g, __half* dx, int n) {
    gelu_bwd(x, g, dx, n);
}
extern "C" __global__ void kl_attn_softmax(const float* s, const float* kb, float* p, int rows, int ld, int d, int rows_per_clip, float scale) {
    attn_softmax(s, kb, p, rows, ld, d, rows_per_clip, scale);
}
extern "C" __global__ void kl_attn_softmax_bf16(const __nv_bfloat16* s, const __nv_bfloat16* kb, __nv_bfloat16* p, int rows, int ld, int d, int rows_per_clip, float scale) {
    attn_softmax(s, kb, p, rows, ld, d, rows_per_clip, scale);
}
extern "C" __global__ void kl_attn_softmax_f16(const __half* s, const __half* kb, __half* p, int rows, int ld, int d, int rows_per_clip, float scale) {
    attn_softmax(s, kb, p, rows, ld, d, rows_per_clip, scale);
}

// softplus(z) = max(z, 0) + ln(1 + e^-|z|) and its derivative 1 / (1 + e^-z).
__device__ float kl_softplus(float z) { return fmaxf(z, 0.0f) + log1pf(expf(-fabsf(z))); }
__device__ float kl_sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// A KL-Norm site after its standardization, per row of d (ops::device::kl_norm_last_device):
// p = [w; b; a; c] (+ [m_p; s_raw] when `learned`), each of d; mu = xh w + b,
// sigma = softplus(xh a + c), y = mu + sigma noise, and the row's KL against N(0, 1) or
// N(m_p, softplus(s_raw)^2) summed over the row. out = [y (rows * d); kl (rows)].
template <typename T>
__device__ void klnorm_fwd(const T* xh, const T* p, const T* noise, T* out, int rows, int d, int learned) {
    int r = blockIdx.x;
    if (r >= rows) return;
    long long o = (long long)r * d;
    float s = 0.0f, unused = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float x = kl_ld(xh[o + j]);
        float mu = x * kl_ld(p[j]) + kl_ld(p[d + j]);
        float sigma = kl_softplus(x * kl_ld(p[2 * d + j]) + kl_ld(p[3 * d + j]));
        out[o + j] = kl_st<T>(mu + sigma * kl_ld(noise[o + j]));
        if (learned) {
            float sp = kl_softplus(kl_ld(p[5 * d + j]));
            float inv_var = 1.0f / (sp * sp);
            float dm = mu - kl_ld(p[4 * d + j]);
            s += 0.5f * (sigma * sigma * inv_var + dm * dm * inv_var + (2.0f * logf(sp) - 1.0f) - 2.0f * logf(sigma));
        } else {
            s += 0.5f * (mu * mu + sigma * sigma - (2.0f * logf(sigma) + 1.0f));
        }
    }
    block_sum2(&s, &unused);
    if (threadIdx.x == 0) out[(long long)rows * d + r] = kl_st<T>(s);
}

extern "C" __global__ void kl_klnorm_fwd(const float* xh, const float* p, const float* noise, float* out, int rows, int d, int learned) {
    klnorm_fwd(xh, p, noise, out, rows, d, learned);
}
extern "C" __global__ void kl_klnorm_fwd_bf16(const __nv_bfloat16* xh, const __nv_bfloat16* p, const __nv_bfloat16* noise, __nv_bfloat16* out, int rows, int d, int learned) {
    klnorm_fwd(xh, p, noise, out, rows, d, learned);
}
extern "C" __global__ void kl_klnorm_fwd_f16(const __half* xh, const __half* p, const __half* noise, __half* out, int rows, int d, int learned) {
    klnorm_fwd(xh, p, noise, out, rows, d, learned);
}

// Its backward: g = [gy (rows * d); gk (rows)], the gradient of out. Each block takes `chunk`
// rows; each thread a set of columns j. Writes dxh into out[0 .. rows * d] and, from
// kl_tail, the block's f32 column sums of the parameters' gradients, [gridDim.x][np][d]
// (np = 4, or 6 when learned), which kl_colsum adds up:
// dmu = gy + gk (mu - m_p) / s_p^2, dsigma = gy noise + gk (sigma / s_p^2 - 1 / sigma),
// dz = dsigma sigmoid(z), dxh = dmu w + dz a; dw = sum dmu xh, db = sum dmu, da = sum dz xh,
// dc = sum dz, dm_p = -sum gk (mu - m_p) / s_p^2,
// ds_raw = sum gk (1 / s_p - (sigma^2 + (mu - m_p)^2) / s_p^3) sigmoid(s_raw).
template <typename T>
__device__ void klnorm_bwd(const T* xh, const T* p, const T* noise, const T* g, T* out, int rows, int d, int learned, int chunk) {
    int np = learned ? 6 : 4;
    int r0 = blockIdx.x * chunk;
    int r1 = min(rows, r0 + chunk);
    float* partial = kl_tail(out, (long long)rows * d) + (long long)blockIdx.x * np * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float w = kl_ld(p[j]), b = kl_ld(p[d + j]), a = kl_ld(p[2 * d + j]), c = kl_ld(p[3 * d + j]);
        float m = 0.0f, inv_var = 1.0f, sp = 1.0f, sig_raw = 0.0f;
        if (learned) {
            m = kl_ld(p[4 * d + j]);
            sp = kl_softplus(kl_ld(p[5 * d + j]));
            inv_var = 1.0f / (sp * sp);
            sig_raw = kl_sigmoid(kl_ld(p[5 * d + j]));
        }
        float sw = 0.0f, sb = 0.0f, sa = 0.0f, sc = 0.0f, sm = 0.0f, ss = 0.0f;
        for (int r = r0; r < r1; ++r) {
            long long o = (long long)r * d + j;
            float x = kl_ld(xh[o]);
            float gy = kl_ld(g[o]);
            float gk = kl_ld(g[(long long)rows * d + r]);
            float mu = x * w + b;
            float z = x * a + c;
            float sigma = kl_softplus(z);
            float dm = mu - m;
            float dmu = gy + gk * dm * inv_var;
            float dsigma = gy * kl_ld(noise[o]) + gk * (sigma * inv_var - 1.0f / sigma);
            float dz = dsigma * kl_sigmoid(z);
            out[o] = kl_st<T>(dmu * w + dz * a);
            sw += dmu * x;
            sb += dmu;
            sa += dz * x;
            sc += dz;
            if (learned) {
                sm -= gk * dm * inv_var;
                ss += gk * (1.0f / sp - (sigma * sigma + dm * dm) / (sp * sp * sp));
            }
        }
        partial[j] = sw;
        partial[d + j] = sb;
        partial[2 * d + j] = sa;
        partial[3 * d + j] = sc;
        if (learned) {
            partial[4 * d + j] = sm;
            partial[5 * d + j] = ss * sig_raw;
        }
    }
}

extern "C" __global__ void kl_klnorm_bwd(const float* xh, const float* p, const float* noise, const float* g, float* out, int rows, int d, int learned, int chunk) {
    klnorm_bwd(xh, p, noise, g, out, rows, d, learned, chunk);
}
extern "C" __global__ void kl_klnorm_bwd_bf16(const __nv_bfloat16* xh, const __nv_bfloat16* p, const __nv_bfloat16* noise, const __nv_bfloat16* g, __nv_bfloat16* out, int rows, int d, int learned, int chunk) {
    klnorm_bwd(xh, p, noise, g, out, rows, d, learned, chunk);
}
extern "C" __global__ void kl_klnorm_bwd_f16(const __half* xh, const __half* p, const __half* noise, const __half* g, __half* out, int rows, int d, int learned, int chunk) {
    klnorm_bwd(xh, p, noise, g, out, rows, d, learned, chunk);
}

// out[i] = sum over b < nblocks of partial[b * width + i], in block order (deterministic).
extern "C" __global__ void kl_colsum(const float* partial, float* out, int width, int nblocks) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < width; i += gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int b = 0; b < nblocks; ++b) s += partial[(long long)b * width + i];
        out[i] = s;
    }
}

// LayerNorm over rows of d: y = (x - mean) / sqrt(var + eps) w + b; x, y [rows, d], w, b [d].
template <typename T>
__device__ void layer_norm_fwd(const T* x, const T* w, const T* b, T* y, int rows, int d, float eps) {
    int r = blockIdx.x;
    if (r >= rows) return;
    long long o = (long long)r * d;
    float m, rs;
    row_moments(x + o, d, eps, &m, &rs);
    for (int i = threadIdx.x; i < d; i += blockDim.x) y[o + i] = kl_st<T>((kl_ld(x[o + i]) - m) * rs * kl_ld(w[i]) + kl_ld(b[i]));
}

extern "C" __global__ void kl_layer_norm_fwd(const float* x, const float* w, const float* b, float* y, int rows, int d, float eps) {
    layer_norm_fwd(x, w, b, y, rows, d, eps);
}
extern "C" __global__ void kl_layer_norm_fwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* b, __nv_bfloat16* y, int rows, int d, float eps) {
    layer_norm_fwd(x, w, b, y, rows, d, eps);
}
extern "C" __global__ void kl_layer_norm_fwd_f16(const __half* x, const __half* w, const __half* b, __half* y, int rows, int d, float eps) {
    layer_norm_fwd(x, w, b, y, rows, d, eps);
}

// Inference after a post-norm transformer's output projection: out = LayerNorm((y + bias) + r)
// over rows of d, p = [bias; w; b] (3 d). The two sums are rounded to T as the separate bias add
// and residual add round them, then layer_norm_fwd's arithmetic on the sum (kept in out: each
// thread rewrites only its own elements, after the barriers of row_moments). One block a row.
template <typename T>
__device__ void residual_layer_norm(const T* y, const T* r, const T* p, T* out, int rows, int d, float eps) {
    int row = blockIdx.x;
    if (row >= rows) return;
    long long o = (long long)row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        T t = kl_st<T>(kl_ld(y[o + i]) + kl_ld(p[i]));
        out[o + i] = kl_st<T>(kl_ld(t) + kl_ld(r[o + i]));
    }
    __syncthreads();
    float m, rs;
    row_moments(out + o, d, eps, &m, &rs);
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[o + i] = kl_st<T>((kl_ld(out[o + i]) - m) * rs * kl_ld(p[d + i]) + kl_ld(p[2 * d + i]));
}

extern "C" __global__ void kl_residual_layer_norm(const float* y, const float* r, const float* p, float* out, int rows, int d, float eps) {
    residual_layer_norm(y, r, p, out, rows, d, eps);
}
extern "C" __global__ void kl_residual_layer_norm_bf16(const __nv_bfloat16* y, const __nv_bfloat16* r, const __nv_bfloat16* p, __nv_bfloat16* out, int rows, int d, float eps) {
    residual_layer_norm(y, r, p, out, rows, d, eps);
}
extern "C" __global__ void kl_residual_layer_norm_f16(const __half* y, const __half* r, const __half* p, __half* out, int rows, int d, float eps) {
    residual_layer_norm(y, r, p, out, rows, d, eps);
}

#define KL_LN_MAX_D 4096

// Its backward, `chunk` rows per block: with x̂ the standardized row and g' = g w,
// dx = (g' - mean(g') - x̂ mean(g' x̂)) / sqrt(var + eps); out = [dx (rows * d); from kl_tail
// per block f32 [sum g x̂ (d); sum g (d)]] for kl_colsum (dw, db). d <= KL_LN_MAX_D: each thread keeps its
// columns' sums in shared memory, which no other thread touches.
template <typename T>
__device__ void layer_norm_bwd(const T* x, const T* w, const T* g, T* out, int rows, int d, float eps, int chunk) {
    __shared__ float sw[KL_LN_MAX_D];
    __shared__ float sb[KL_LN_MAX_D];
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        sw[j] = 0.0f;
        sb[j] = 0.0f;
    }
    int r0 = blockIdx.x * chunk;
    int r1 = min(rows, r0 + chunk);
    for (int r = r0; r < r1; ++r) {
        long long o = (long long)r * d;
        float m, rs;
        row_moments(x + o, d, eps, &m, &rs);
        float s1 = 0.0f, s2 = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float gw = __fmul_rn(kl_ld(g[o + j]), kl_ld(w[j]));
            s1 += gw;
            s2 += gw * (kl_ld(x[o + j]) - m) * rs;
        }
        block_sum2(&s1, &s2);
        float m1 = s1 / (float)d, m2 = s2 / (float)d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float xh = (kl_ld(x[o + j]) - m) * rs;
            float gj = kl_ld(g[o + j]);
            // __fmul_rn: g w rounded as in m1's sum, not fused with the subtraction into an
            // FMA (whose exact product would leave its rounding error where a row of one
            // value has a gradient of exactly 0).
            out[o + j] = kl_st<T>((__fmul_rn(gj, kl_ld(w[j])) - m1 - xh * m2) * rs);
            sw[j] += gj * xh;
            sb[j] += gj;
        }
    }
    float* partial = kl_tail(out, (long long)rows * d) + (long long)blockIdx.x * 2 * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        partial[j] = sw[j];
        partial[d + j] = sb[j];
    }
}

extern "C" __global__ void kl_layer_norm_bwd(const float* x, const float* w, const float* g, float* out, int rows, int d, float eps, int chunk) {
    layer_norm_bwd(x, w, g, out, rows, d, eps, chunk);
}
extern "C" __global__ void kl_layer_norm_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* g, __nv_bfloat16* out, int rows, int d, float eps, int chunk) {
    layer_norm_bwd(x, w, g, out, rows, d, eps, chunk);
}
extern "C" __global__ void kl_layer_norm_bwd_f16(const __half* x, const __half* w, const __half* g, __half* out, int rows, int d, float eps, int chunk) {
    layer_norm_bwd(x, w, g, out, rows, d, eps, chunk);
}

// Per-channel GroupNorm on channels-last x [nb, t, c] (wav2vec2's first feature-encoder layer):
// mean and variance over the t frames of each (clip, channel). One block per (clip, tile of 32
// channels), 1024 threads: channel tile * 32 + (threadIdx.x & 31), time lane threadIdx.x >> 5
// (frames lane, lane + 32, ...), so that each warp reads 32 consecutive channels of a frame
// (coalesced) where a reduction over a strided axis would read one float per 32-byte sector.
// Sums in f64 (a lane adds t / 32 values: 1 000 for 10 s of audio), lanes combined in order;
// the forward reads x twice (statistics, output), the backward three times. (With 256 threads
// a block, 8 lanes, the H200 ran these at 1.3 TB/s in f32 and 0.5 TB/s in bf16: 256 blocks of
// a 16-clip batch, 128 of a training step, left most of its 132 SMs' threads idle; the
// kernels use at most 40 registers a thread, so 1024-thread blocks launch.)
#define KL_GN_CH 32
#define KL_GN_LANES 32
// Each GroupNorm kernel's launch bound: the compiler (and the driver's JIT from this PTX) then
// keeps a block of this many threads within an SM's 64 K registers.
#define KL_GN_THREADS (KL_GN_CH * KL_GN_LANES)

// The sums of (a, b) over the KL_GN_LANES time lanes of this thread's channel; every thread gets them.
__device__ void gn_lane_sum2(double* a, double* b) {
    __shared__ double sa[KL_GN_LANES][KL_GN_CH];
    __shared__ double sb[KL_GN_LANES][KL_GN_CH];
    unsigned int ch = threadIdx.x & (KL_GN_CH - 1), lane = threadIdx.x / KL_GN_CH;
    sa[lane][ch] = *a;
    sb[lane][ch] = *b;
    __syncthreads();
    double ta = 0.0, tb = 0.0;
    for (int l = 0; l < KL_GN_LANES; ++l) {
        ta += sa[l][ch];
        tb += sb[l][ch];
    }
    *a = ta;
    *b = tb;
    __syncthreads();
}

// Mean and 1 / sqrt(var + eps) of channel j of clip xb [t, c] (j >= c: unused), in one pass:
// f64 sums of x - x0 and (x - x0)^2 with x0 the channel's first frame (as the CPU's fused op),
// so that a mean far from zero does not cancel the variance.
// The same for a channel whose frame i has the f32 value value(i) (`on`: the thread has a
// channel; every thread of the block calls it, for the barriers). MASKED: the statistics over
// the frames i with keep(i) only (a padded clip's valid frames; their count, the same for every
// thread, in *count; none: NaN, as the masked composite's 0 / 0); else over all t frames.
template <bool MASKED, typename F, typename K>
__device__ void gn_moments_kept(F value, K keep, int t, bool on, float eps, double* mean, float* rstd, double* count) {
    int lane = (int)(threadIdx.x / KL_GN_CH);
    double x0 = on ? (double)value(0) : 0.0;
    double s = 0.0, q = 0.0;
    if (on)
        for (int i = lane; i < t; i += KL_GN_LANES) {
            if (MASKED && !keep(i)) continue;
            double d = (double)value(i) - x0;
            s += d;
            q += d * d;
        }
    gn_lane_sum2(&s, &q);
    double n = (double)t;
    if (MASKED) {
        // (A second barrier pair, only in the masked kernels: the count of kept frames.)
        double k = 0.0, unused = 0.0;
        for (int i = lane; i < t; i += KL_GN_LANES) k += keep(i) ? 1.0 : 0.0;
        gn_lane_sum2(&k, &unused);
        n = k;
    }
    double ms = s / n;
    double var = q / n - ms * ms;
    *mean = x0 + ms;
    *rstd = (float)(1.0 / sqrt((var > 0.0 ? var : 0.0) + (double)eps));
    *count = n;
}

template <typename F>
__device__ void gn_moments_of(F value, int t, bool on, float eps, double* mean, float* rstd) {
    double n;
    gn_moments_kept<false>(value, [](int) { return true; }, t, on, eps, mean, rstd, &n);
}

// One GroupNorm output: (x - mean) rstd w + b, then the exact GELU when `gelu`.
__device__ inline float gn_out(float x, double m, float rs, float wj, float bj, int gelu) {
    // Centred in f64: the mean rounded to f32 could be off by more than the spread.
    float v = (float)((double)x - m) * rs * wj + bj;
    if (gelu) v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    return v;
}

// y = (x - mean) rstd w + b per (clip, channel), then the exact GELU when `gelu`; x, w, b, y
// of one storage type T (f32, or bf16 / f16 for inference in those types), arithmetic in f32
// and the statistics in f64 whatever T. MASKED: mask [nb, t] of T, the statistics over each
// clip's frames whose mask is not 0 (padding-aware GroupNorm over a padded batch), every frame
// normalized with them.
template <bool MASKED, typename T>
__device__ void group_norm_cl_fwd(const T* x, const T* w, const T* b, const T* mask, T* y, int nb, int t, int c, float eps, int gelu) {
    int tiles = (c + KL_GN_CH - 1) / KL_GN_CH;
    int clip = blockIdx.x / tiles;
    if (clip >= nb) return;
    int j = (blockIdx.x % tiles) * KL_GN_CH + (int)(threadIdx.x & (KL_GN_CH - 1));
    long long o = (long long)clip * t * c;
    const T* mb = mask + (MASKED ? (long long)clip * t : 0);
    double m, n;
    float rs;
    gn_moments_kept<MASKED>([&](int i) { return kl_ld(x[o + (long long)i * c + j]); }, [&](int i) { return kl_ld(mb[i]) != 0.0f; }, t, j < c, eps, &m, &rs, &n);
    if (j >= c) return;
    float wj = kl_ld(w[j]), bj = kl_ld(b[j]);
    for (int i = (int)(threadIdx.x / KL_GN_CH); i < t; i += KL_GN_LANES) {
        long long k = o + (long long)i * c + j;
        y[k] = kl_st<T>(gn_out(kl_ld(x[k]), m, rs, wj, bj, gelu));
    }
}

extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_fwd(const float* x, const float* w, const float* b, float* y, int nb, int t, int c, float eps, int gelu) {
    group_norm_cl_fwd<false>(x, w, b, (const float*)nullptr, y, nb, t, c, eps, gelu);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_fwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* b, __nv_bfloat16* y, int nb, int t, int c, float eps, int gelu) {
    group_norm_cl_fwd<false>(x, w, b, (const __nv_bfloat16*)nullptr, y, nb, t, c, eps, gelu);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_fwd_f16(const __half* x, const __half* w, const __half* b, __half* y, int nb, int t, int c, float eps, int gelu) {
    group_norm_cl_fwd<false>(x, w, b, (const __half*)nullptr, y, nb, t, c, eps, gelu);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_masked_fwd(const float* x, const float* w, const float* b, const float* mask, float* y, int nb, int t, int c, float eps, int gelu) {
    group_norm_cl_fwd<true>(x, w, b, mask, y, nb, t, c, eps, gelu);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_masked_fwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* b, const __nv_bfloat16* mask, __nv_bfloat16* y, int nb, int t, int c, float eps, int gelu) {
    group_norm_cl_fwd<true>(x, w, b, mask, y, nb, t, c, eps, gelu);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_masked_fwd_f16(const __half* x, const __half* w, const __half* b, const __half* mask, __half* y, int nb, int t, int c, float eps, int gelu) {
    group_norm_cl_fwd<true>(x, w, b, mask, y, nb, t, c, eps, gelu);
}

// Inference through wav2vec2-base's first feature-encoder layer in one kernel:
// y = GELU(GroupNorm(conv1d(x, w, stride))) for one-channel clips x [nb, l], w [c, k] (k at
// most KL_C1_MAX_K), p = [GroupNorm weight (c); bias (c)], y channels-last [nb, t, c] with
// t = (l - k) / stride + 1; all of one type T. Where the three ops write the convolution's
// output (1 GiB for 16 x 10 s in f32), read it twice and write the result, this writes only
// the result: the statistics pass and the output pass each recompute the k-tap products from
// the clip (a few MB, read by every channel of a warp at once). Each convolution value is
// the f32 sum of its products in tap order (fused multiply-adds), rounded to T as the conv's
// output of type T is, then exactly group_norm_cl_fwd's arithmetic on it. Launched as the
// GroupNorm (one block of KL_GN_THREADS per clip and tile of KL_GN_CH channels); each thread
// keeps its channel's taps in registers.
#define KL_C1_MAX_K 12

template <typename T>
__device__ inline float conv1_value(const T* xi, const float* wr, int k) {
    float s = 0.0f;
    KL_UNROLL
    for (int kk = 0; kk < KL_C1_MAX_K; ++kk)
        if (kk < k) s = fmaf(wr[kk], kl_ld(xi[kk]), s);
    return kl_ld(kl_st<T>(s));
}

template <typename T>
__device__ void conv1_group_norm_gelu(const T* x, const T* w, const T* p, T* y, int nb, int l, int t, int c, int k, int stride, float eps) {
    int tiles = (c + KL_GN_CH - 1) / KL_GN_CH;
    int clip = blockIdx.x / tiles;
    if (clip >= nb) return;
    int j = (blockIdx.x % tiles) * KL_GN_CH + (int)(threadIdx.x & (KL_GN_CH - 1));
    bool on = j < c;
    float wr[KL_C1_MAX_K];
    KL_UNROLL
    for (int kk = 0; kk < KL_C1_MAX_K; ++kk) wr[kk] = (on && kk < k) ? kl_ld(w[(long long)j * k + kk]) : 0.0f;
    const T* xb = x + (long long)clip * l;
    double m;
    float rs;
    gn_moments_of([&](int i) { return conv1_value(xb + (long long)i * stride, wr, k); }, t, on, eps, &m, &rs);
    if (!on) return;
    float wj = kl_ld(p[j]), bj = kl_ld(p[c + j]);
    long long o = (long long)clip * t * c;
    for (int i = (int)(threadIdx.x / KL_GN_CH); i < t; i += KL_GN_LANES)
        y[o + (long long)i * c + j] = kl_st<T>(gn_out(conv1_value(xb + (long long)i * stride, wr, k), m, rs, wj, bj, 1));
}

extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_conv1_group_norm_gelu(const float* x, const float* w, const float* p, float* y, int nb, int l, int t, int c, int k, int stride, float eps) {
    conv1_group_norm_gelu(x, w, p, y, nb, l, t, c, k, stride, eps);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_conv1_group_norm_gelu_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* p, __nv_bfloat16* y, int nb, int l, int t, int c, int k, int stride, float eps) {
    conv1_group_norm_gelu(x, w, p, y, nb, l, t, c, k, stride, eps);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_conv1_group_norm_gelu_f16(const __half* x, const __half* w, const __half* p, __half* y, int nb, int l, int t, int c, int k, int stride, float eps) {
    conv1_group_norm_gelu(x, w, p, y, nb, l, t, c, k, stride, eps);
}

// y[r, c] += b[c] in place for y [rows, d] of one storage type T (the linear layers' bias after
// cuBLAS's product; candle's broadcast add reads the bias through a strided index per element
// and writes a new tensor), then with `gelu` the exact GELU of the sum rounded to T (the two
// ops' values; for f32, kl_gelu_fwd's arithmetic). Blocks cover `blockDim.x` columns of every
// `row_groups`-th row: blockIdx.x = row group * column tiles + tile; each thread keeps its bias
// in a register.
template <typename T>
__device__ void bias_add(T* y, const T* b, int rows, int d, int row_groups, int gelu) {
    int tiles = (d + blockDim.x - 1) / blockDim.x;
    int c = (blockIdx.x % tiles) * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float bc = kl_ld(b[c]);
    for (int r = blockIdx.x / tiles; r < rows; r += row_groups) {
        long long k = (long long)r * d + c;
        T s = kl_st<T>(kl_ld(y[k]) + bc);
        if (gelu) {
            float v = kl_ld(s);
            s = kl_st<T>(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
        }
        y[k] = s;
    }
}

extern "C" __global__ void kl_bias_add(float* y, const float* b, int rows, int d, int row_groups, int gelu) {
    bias_add(y, b, rows, d, row_groups, gelu);
}
extern "C" __global__ void kl_bias_add_bf16(__nv_bfloat16* y, const __nv_bfloat16* b, int rows, int d, int row_groups, int gelu) {
    bias_add(y, b, rows, d, row_groups, gelu);
}
extern "C" __global__ void kl_bias_add_f16(__half* y, const __half* b, int rows, int d, int row_groups, int gelu) {
    bias_add(y, b, rows, d, row_groups, gelu);
}

// Its backward (no GELU): with x̂ the normalized input and gy = g w,
// dx = rstd (gy - mean_t(gy) - x̂ mean_t(gy x̂)); out = [dx (nb t c); from kl_tail per clip
// f32 [sum_t g x̂ (c); sum_t g (c)]] for kl_colsum over the clips (dw, db). MASKED (the
// statistics over the kept frames, n of them): every frame's output depends on them, so the
// sums still run over all t frames but are divided by n, and the two correction terms apply to
// the kept frames only (the others' mean and variance derivatives are 0):
// dx = rstd (gy - kept (sum_t gy + x̂ sum_t gy x̂) / n).
template <bool MASKED, typename T>
__device__ void group_norm_cl_bwd(const T* x, const T* w, const T* mask, const T* g, T* out, int nb, int t, int c, float eps) {
    int tiles = (c + KL_GN_CH - 1) / KL_GN_CH;
    int clip = blockIdx.x / tiles;
    if (clip >= nb) return;
    int j = (blockIdx.x % tiles) * KL_GN_CH + (int)(threadIdx.x & (KL_GN_CH - 1));
    int lane = (int)(threadIdx.x / KL_GN_CH);
    bool on = j < c;
    long long o = (long long)clip * t * c;
    const T* mb = mask + (MASKED ? (long long)clip * t : 0);
    auto keep = [&](int i) { return kl_ld(mb[i]) != 0.0f; };
    double m, n;
    float rs;
    gn_moments_kept<MASKED>([&](int i) { return kl_ld(x[o + (long long)i * c + j]); }, keep, t, on, eps, &m, &rs, &n);
    double sg = 0.0, sgx = 0.0;
    if (on)
        for (int i = lane; i < t; i += KL_GN_LANES) {
            long long k = o + (long long)i * c + j;
            float gi = kl_ld(g[k]);
            sg += (double)gi;
            sgx += (double)(gi * ((float)((double)kl_ld(x[k]) - m) * rs));
        }
    gn_lane_sum2(&sg, &sgx);
    if (!on) return;
    float wj = kl_ld(w[j]);
    float mg = (float)(sg / n) * wj, mgx = (float)(sgx / n) * wj;
    for (int i = lane; i < t; i += KL_GN_LANES) {
        long long k = o + (long long)i * c + j;
        float xh = (float)((double)kl_ld(x[k]) - m) * rs;
        // (__fmul_rn as in kl_layer_norm_bwd: one frame gives exactly 0, not an FMA residual.)
        float gw = __fmul_rn(kl_ld(g[k]), wj);
        out[k] = kl_st<T>(((!MASKED || keep(i)) ? gw - mg - xh * mgx : gw) * rs);
    }
    if (lane == 0) {
        float* partial = kl_tail(out, (long long)nb * t * c) + (long long)clip * 2 * c;
        partial[j] = (float)sgx;
        partial[c + j] = (float)sg;
    }
}

extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_bwd(const float* x, const float* w, const float* g, float* out, int nb, int t, int c, float eps) {
    group_norm_cl_bwd<false>(x, w, (const float*)nullptr, g, out, nb, t, c, eps);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* g, __nv_bfloat16* out, int nb, int t, int c, float eps) {
    group_norm_cl_bwd<false>(x, w, (const __nv_bfloat16*)nullptr, g, out, nb, t, c, eps);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_bwd_f16(const __half* x, const __half* w, const __half* g, __half* out, int nb, int t, int c, float eps) {
    group_norm_cl_bwd<false>(x, w, (const __half*)nullptr, g, out, nb, t, c, eps);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_masked_bwd(const float* x, const float* w, const float* mask, const float* g, float* out, int nb, int t, int c, float eps) {
    group_norm_cl_bwd<true>(x, w, mask, g, out, nb, t, c, eps);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_masked_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* mask, const __nv_bfloat16* g, __nv_bfloat16* out, int nb, int t, int c, float eps) {
    group_norm_cl_bwd<true>(x, w, mask, g, out, nb, t, c, eps);
}
extern "C" __global__ void __launch_bounds__(KL_GN_THREADS) kl_group_norm_cl_masked_bwd_f16(const __half* x, const __half* w, const __half* mask, const __half* g, __half* out, int nb, int t, int c, float eps) {
    group_norm_cl_bwd<true>(x, w, mask, g, out, nb, t, c, eps);
}

// klspeech's keyed standard normal stream (src/rng.rs: keyed_normal_vec), bit for bit: value i
// depends only on the key and i. One thread per Box-Muller pair p (values 2p, 2p + 1). Every
// f32 operation is an explicitly rounded intrinsic in the order of the Rust source, so that
// nvcc cannot contract a product and a sum into one FMA (the host code has no FMA either).
__device__ unsigned long long kl_keyed_u64(unsigned long long key, unsigned long long i) {
    unsigned long long z = key + (i + 1ULL) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

__device__ double kl_keyed_uniform(unsigned long long key, unsigned long long i) {
    return __dmul_rn((double)(kl_keyed_u64(key, i) >> 11), 1.0 / 9007199254740992.0);
}

// fastmath.rs: FastExp::fln for f32 (positive normal x).
__device__ float kl_fln(float x) {
    const float LN2_HI = 0.693359375f;
    const float LN2_LO = -2.1219444e-4f;
    unsigned int bits = __float_as_uint(x);
    float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    int big = m > 1.41421356237309504880f;
    if (big) m = __fmul_rn(m, 0.5f);
    float e = (float)((int)((bits >> 23) & 0xffu) - 127 + big);
    float s = __fdiv_rn(__fsub_rn(m, 1.0f), __fadd_rn(m, 1.0f));
    float s2 = __fmul_rn(s, s);
    float q = __fadd_rn(1.0f / 7.0f, __fmul_rn(s2, 1.0f / 9.0f));
    q = __fadd_rn(1.0f / 5.0f, __fmul_rn(s2, q));
    q = __fadd_rn(1.0f / 3.0f, __fmul_rn(s2, q));
    q = __fadd_rn(1.0f, __fmul_rn(s2, q));
    float p = __fmul_rn(__fmul_rn(2.0f, s), q);
    return __fadd_rn(__fmul_rn(e, LN2_HI), __fadd_rn(__fmul_rn(e, LN2_LO), p));
}

extern "C" __global__ void kl_keyed_normal(float* out, int n, unsigned long long key) {
    int pairs = (n + 1) / 2;
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += gridDim.x * blockDim.x) {
        unsigned long long pp = (unsigned long long)p;
        float u1 = __double2float_rn(__dsub_rn(1.0, kl_keyed_uniform(key, 2ULL * pp)));
        float a = __double2float_rn(__dmul_rn(kl_keyed_uniform(key, 2ULL * pp + 1ULL), 4.0));
        float r = __fsqrt_rn(__fmul_rn(-2.0f, kl_fln(u1)));
        unsigned int k = (unsigned int)a;
        if (k > 3u) k = 3u;
        float phi = __fmul_rn(__fsub_rn(__fsub_rn(a, (float)k), 0.5f), 1.57079632679489661923f);
        float p2 = __fmul_rn(phi, phi);
        // sin = phi (1 - p2/6 (1 - p2/20 (1 - p2/42 (1 - p2/72)))), the Rust source's order.
        float t = __fsub_rn(1.0f, __fmul_rn(p2, 1.0f / 72.0f));
        t = __fsub_rn(1.0f, __fmul_rn(__fmul_rn(p2, 1.0f / 42.0f), t));
        t = __fsub_rn(1.0f, __fmul_rn(__fmul_rn(p2, 1.0f / 20.0f), t));
        t = __fsub_rn(1.0f, __fmul_rn(__fmul_rn(p2, 1.0f / 6.0f), t));
        float sn = __fmul_rn(phi, t);
        // cos = 1 - p2/2 (1 - p2/12 (1 - p2/30 (1 - p2/56 (1 - p2/90)))).
        float c = __fsub_rn(1.0f, __fmul_rn(p2, 1.0f / 90.0f));
        c = __fsub_rn(1.0f, __fmul_rn(__fmul_rn(p2, 1.0f / 56.0f), c));
        c = __fsub_rn(1.0f, __fmul_rn(__fmul_rn(p2, 1.0f / 30.0f), c));
        c = __fsub_rn(1.0f, __fmul_rn(__fmul_rn(p2, 1.0f / 12.0f), c));
        float cs = __fsub_rn(1.0f, __fmul_rn(__fmul_rn(p2, 0.5f), c));
        float x = (k & 1u) == 0u ? cs : -sn;
        float y = (k & 1u) == 0u ? sn : cs;
        float sign = k >= 2u ? -1.0f : 1.0f;
        out[2 * (long long)p] = __fmul_rn(__fmul_rn(r, x), sign);
        if (2 * p + 1 < n) out[2 * (long long)p + 1] = __fmul_rn(__fmul_rn(r, y), sign);
    }
}

// The dropout mask of ops::dropout_mask, bit for bit: element i is `scale` (1 / (1 - p) in
// f32) when the i-th uniform of the keyed stream is >= p, else 0. With u = m 2^-53 exactly,
// u >= p is m >= threshold, threshold = ceil(p 2^53) (computed on the host).
extern "C" __global__ void kl_dropout_mask(float* out, int n, unsigned long long key, unsigned long long threshold, float scale) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        out[i] = (kl_keyed_u64(key, (unsigned long long)i) >> 11) >= threshold ? scale : 0.0f;
    }
}

// The gathered columns of a convolution's tap chunk (ops::conv_gemm): x [n, lp, cg] (clips of
// one group's padded frames) -> out [n, t kc, cg] with out row (clip, j) = frame
// (j / kc) stride + k0 + j % kc of the clip, a copy of cg contiguous values. One warp per
// output row (grid-stride over rows), lanes across the row: every load and store coalesced,
// the index arithmetic once per row (candle's index_select divides per element and reads a
// 32-bit index tensor).
template <typename T>
__device__ void gather_taps(const T* x, T* out, int n, int lp, int t, int kc, int cg, int stride, int k0) {
    long long per_clip = (long long)t * kc, rows = (long long)n * per_clip;
    int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    for (long long r = (long long)blockIdx.x * warps + threadIdx.x / 32; r < rows; r += (long long)gridDim.x * warps) {
        long long clip = r / per_clip;
        int j = (int)(r - clip * per_clip);
        long long frame = (long long)(j / kc) * stride + k0 + j % kc;
        const T* src = x + (clip * lp + frame) * cg;
        T* dst = out + r * cg;
        for (int c = lane; c < cg; c += 32) dst[c] = src[c];
    }
}

extern "C" __global__ void kl_gather_taps(const float* x, float* out, int n, int lp, int t, int kc, int cg, int stride, int k0) {
    gather_taps(x, out, n, lp, t, kc, cg, stride, k0);
}
extern "C" __global__ void kl_gather_taps_bf16(const __nv_bfloat16* x, __nv_bfloat16* out, int n, int lp, int t, int kc, int cg, int stride, int k0) {
    gather_taps(x, out, n, lp, t, kc, cg, stride, k0);
}
extern "C" __global__ void kl_gather_taps_f16(const __half* x, __half* out, int n, int lp, int t, int kc, int cg, int stride, int k0) {
    gather_taps(x, out, n, lp, t, kc, cg, stride, k0);
}

// AdamW in place, the float operations of ops::adamw_in_place (and of candle's composite,
// whose `x * c` is `x * c + 0`) in their order, explicitly rounded (no FMA): the same bits as
// the CPU. mv = [m (n); v (n)]:
// m' = ((g - m) c1 + 0) + m, v' = (v b2 + 0) + (g g c2 + 0), with c1 = 1 - b1, c2 = 1 - b2.
// bf16 / f16 (pure half-precision training): the same f32 arithmetic on the stored values,
// each result rounded once to the storage type (the moments as stored feed the update).
// A contiguous copy of a strided view whose last axis is contiguous (the attention's head
// split and merge, the grouped convolution's group-major blocks: candle's strided copy
// computes a multi-axis index per element), with `pad` zero rows after the last row axis
// (the attention's keys and values padded to a multiple of 8 in the same pass). out
// [d0, .., d3, d4 + pad, len]: row r of index (i0, .., i4) (r = ((i0 d1 + i1) d2 + ..)
// (d4 + pad) + i4; leading dims 1) is the view's row at x + sum i_k s_k for i4 < d4, zeros
// after. One warp per row, lanes along it; the index arithmetic once per row.
template <typename T>
__device__ void copy_rows(const T* x, T* out, int len, int d0, int d1, int d2, int d3, int d4, int s0, int s1, int s2, int s3, int s4, int pad) {
    long long d4p = (long long)d4 + pad;
    long long rows = (long long)d0 * d1 * d2 * d3 * d4p;
    int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    for (long long r = (long long)blockIdx.x * warps + threadIdx.x / 32; r < rows; r += (long long)gridDim.x * warps) {
        long long q = r;
        long long i4 = q % d4p;
        T* b = out + r * len;
        if (i4 >= d4) {
            for (int i = lane; i < len; i += 32) b[i] = kl_st<T>(0.0f);
            continue;
        }
        long long src = i4 * s4;
        q /= d4p;
        src += (q % d3) * s3;
        q /= d3;
        src += (q % d2) * s2;
        q /= d2;
        src += (q % d1) * s1;
        q /= d1;
        src += q * s0;
        const T* a = x + src;
        for (int i = lane; i < len; i += 32) b[i] = a[i];
    }
}

extern "C" __global__ void kl_copy_rows(const float* x, float* out, int len, int d0, int d1, int d2, int d3, int d4, int s0, int s1, int s2, int s3, int s4, int pad) {
    copy_rows(x, out, len, d0, d1, d2, d3, d4, s0, s1, s2, s3, s4, pad);
}
extern "C" __global__ void kl_copy_rows_bf16(const __nv_bfloat16* x, __nv_bfloat16* out, int len, int d0, int d1, int d2, int d3, int d4, int s0, int s1, int s2, int s3, int s4, int pad) {
    copy_rows(x, out, len, d0, d1, d2, d3, d4, s0, s1, s2, s3, s4, pad);
}
extern "C" __global__ void kl_copy_rows_f16(const __half* x, __half* out, int len, int d0, int d1, int d2, int d3, int d4, int s0, int s1, int s2, int s3, int s4, int pad) {
    copy_rows(x, out, len, d0, d1, d2, d3, d4, s0, s1, s2, s3, s4, pad);
}

// The attention backward's merge of the three head gradients into the packed projection's
// layout: dq [b, nh, t, hd] and dk, dv [b, nh, tk, hd] (tk >= t: the padded keys' rows after
// each head's t are dropped) -> out [b, t, 3, nh, hd]. One warp per output row, lanes along
// hd; where the backward took a copy of dk's and dv's first t rows, a stack and a transposed
// copy (four passes over the result, six launches), one pass and one launch.
template <typename T>
__device__ void merge_qkv(const T* dq, const T* dk, const T* dv, T* out, int b, int t, int nh, int hd, int tk) {
    long long rows = (long long)b * t * 3 * nh;
    int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    for (long long r = (long long)blockIdx.x * warps + threadIdx.x / 32; r < rows; r += (long long)gridDim.x * warps) {
        long long q = r;
        long long h = q % nh;
        q /= nh;
        int j = (int)(q % 3);
        q /= 3;
        long long tt = q % t, bb = q / t;
        const T* src = j == 0 ? dq + ((bb * nh + h) * t + tt) * hd : (j == 1 ? dk : dv) + ((bb * nh + h) * tk + tt) * hd;
        T* dst = out + r * hd;
        for (int i = lane; i < hd; i += 32) dst[i] = src[i];
    }
}

extern "C" __global__ void kl_merge_qkv(const float* dq, const float* dk, const float* dv, float* out, int b, int t, int nh, int hd, int tk) {
    merge_qkv(dq, dk, dv, out, b, t, nh, hd, tk);
}
extern "C" __global__ void kl_merge_qkv_bf16(const __nv_bfloat16* dq, const __nv_bfloat16* dk, const __nv_bfloat16* dv, __nv_bfloat16* out, int b, int t, int nh, int hd, int tk) {
    merge_qkv(dq, dk, dv, out, b, t, nh, hd, tk);
}
extern "C" __global__ void kl_merge_qkv_f16(const __half* dq, const __half* dk, const __half* dv, __half* out, int b, int t, int nh, int hd, int tk) {
    merge_qkv(dq, dk, dv, out, b, t, nh, hd, tk);
}

// Three contiguous buffers one after another (the attention's q, k and v weights, or biases,
// packed for one projection): out[i] = a[i], then b, then c, a thread per element. candle's
// concatenation runs a 2-D copy kernel per input.
template <typename T>
__device__ void cat3(const T* a, const T* b, const T* c, T* out, int na, int nb, int nc) {
    long long n = (long long)na + nb + nc;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = i < na ? a[i] : (i < (long long)na + nb ? b[i - na] : c[i - na - nb]);
}

extern "C" __global__ void kl_cat3(const float* a, const float* b, const float* c, float* out, int na, int nb, int nc) {
    cat3(a, b, c, out, na, nb, nc);
}
extern "C" __global__ void kl_cat3_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* c, __nv_bfloat16* out, int na, int nb, int nc) {
    cat3(a, b, c, out, na, nb, nc);
}
extern "C" __global__ void kl_cat3_f16(const __half* a, const __half* b, const __half* c, __half* out, int na, int nb, int nc) {
    cat3(a, b, c, out, na, nb, nc);
}

// The adjoint of the gather above for a whole strided convolution (ops::conv_gemm::input_grad):
// the column gradient dcols [n, t, k, c] added back onto the input frames it read, dx [n, l, c]
// (frames of the unpadded input; frame f is padded frame f + padding, which tap j of output
// frame u reads when u stride + j = f + padding). One warp per dx row, lanes across the c
// channels; the taps summed in f32 in increasing j, each row written once (col2im_phases adds
// them in the same order, one tensor op per tap and several copies).
template <typename T>
__device__ void col2im(const T* dcols, T* dx, int n, int l, int t, int k, int c, int stride, int padding) {
    long long rows = (long long)n * l;
    int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    for (long long r = (long long)blockIdx.x * warps + threadIdx.x / 32; r < rows; r += (long long)gridDim.x * warps) {
        long long clip = r / l;
        int f = (int)(r - clip * l) + padding;
        // The taps j = f - u stride for output frames u in [0, t), 0 <= j < k, in increasing j.
        int u_hi = min(f / stride, t - 1);
        int u_lo = f - (k - 1) <= 0 ? 0 : (f - (k - 1) + stride - 1) / stride;
        T* dst = dx + r * c;
        for (int ch = lane; ch < c; ch += 32) {
            float acc = 0.0f;
            for (int u = u_hi; u >= u_lo; --u) acc += kl_ld(dcols[((clip * t + u) * k + (f - u * stride)) * c + ch]);
            dst[ch] = kl_st<T>(acc);
        }
    }
}

extern "C" __global__ void kl_col2im(const float* dcols, float* dx, int n, int l, int t, int k, int c, int stride, int padding) {
    col2im(dcols, dx, n, l, t, k, c, stride, padding);
}
extern "C" __global__ void kl_col2im_bf16(const __nv_bfloat16* dcols, __nv_bfloat16* dx, int n, int l, int t, int k, int c, int stride, int padding) {
    col2im(dcols, dx, n, l, t, k, c, stride, padding);
}
extern "C" __global__ void kl_col2im_f16(const __half* dcols, __half* dx, int n, int l, int t, int k, int c, int stride, int padding) {
    col2im(dcols, dx, n, l, t, k, c, stride, padding);
}

template <typename T>
__device__ void adam_moments(T* mv, const T* g, int n, float c1, float b2, float c2) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float gi = kl_ld(g[i]), m = kl_ld(mv[i]), v = kl_ld(mv[(long long)n + i]);
        mv[i] = kl_st<T>(__fadd_rn(__fadd_rn(__fmul_rn(__fsub_rn(gi, m), c1), 0.0f), m));
        mv[(long long)n + i] = kl_st<T>(__fadd_rn(__fadd_rn(__fmul_rn(v, b2), 0.0f), __fadd_rn(__fmul_rn(__fmul_rn(gi, gi), c2), 0.0f)));
    }
}

extern "C" __global__ void kl_adam_moments(float* mv, const float* g, int n, float c1, float b2, float c2) {
    adam_moments(mv, g, n, c1, b2, c2);
}
extern "C" __global__ void kl_adam_moments_bf16(__nv_bfloat16* mv, const __nv_bfloat16* g, int n, float c1, float b2, float c2) {
    adam_moments(mv, g, n, c1, b2, c2);
}
extern "C" __global__ void kl_adam_moments_f16(__half* mv, const __half* g, int n, float c1, float b2, float c2) {
    adam_moments(mv, g, n, c1, b2, c2);
}

// theta' = (theta d + 0 when decaying) - ((m / ((sqrt(v) inv_bc2 + 0) 1 + eps)) step + 0).
template <typename T>
__device__ void adam_apply(T* theta, const T* mv, int n, int decay, float d, float inv_bc2, float eps, float step) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float th = kl_ld(theta[i]);
        float t = decay ? __fadd_rn(__fmul_rn(th, d), 0.0f) : th;
        float denom = __fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(__fsqrt_rn(kl_ld(mv[(long long)n + i])), inv_bc2), 0.0f), 1.0f), eps);
        theta[i] = kl_st<T>(__fsub_rn(t, __fadd_rn(__fmul_rn(__fdiv_rn(kl_ld(mv[i]), denom), step), 0.0f)));
    }
}

extern "C" __global__ void kl_adam_apply(float* theta, const float* mv, int n, int decay, float d, float inv_bc2, float eps, float step) {
    adam_apply(theta, mv, n, decay, d, inv_bc2, eps, step);
}
extern "C" __global__ void kl_adam_apply_bf16(__nv_bfloat16* theta, const __nv_bfloat16* mv, int n, int decay, float d, float inv_bc2, float eps, float step) {
    adam_apply(theta, mv, n, decay, d, inv_bc2, eps, step);
}
extern "C" __global__ void kl_adam_apply_f16(__half* theta, const __half* mv, int n, int decay, float d, float inv_bc2, float eps, float step) {
    adam_apply(theta, mv, n, decay, d, inv_bc2, eps, step);
}

// Both of AdamW's steps in one pass (a launch a parameter instead of two, the moments read
// once): kl_adam_moments' m and v, stored, then kl_adam_apply's update from the stored values,
// the same float operations in the same order (bit for bit the two kernels in turn).
// SCALED (kl_adam_step_scaled: gradient clipping's coefficient s): each gradient read as
// g s + 0 rounded to T with s rounded to T, the bits of candle's g.affine(s, 0) (which the
// unscaled kernel's caller ran first: a launch and a copy of every gradient a step).
template <bool SCALED, typename T>
__device__ void adam_step(T* theta, T* mv, const T* g, int n, float c1, float b2, float c2, int decay, float d, float inv_bc2, float eps, float step, float s) {
    float sc = kl_ld(kl_st<T>(s));
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float gi = kl_ld(g[i]), m = kl_ld(mv[i]), v = kl_ld(mv[(long long)n + i]);
        if (SCALED) gi = kl_ld(kl_st<T>(__fadd_rn(__fmul_rn(gi, sc), 0.0f)));
        T ms = kl_st<T>(__fadd_rn(__fadd_rn(__fmul_rn(__fsub_rn(gi, m), c1), 0.0f), m));
        T vs = kl_st<T>(__fadd_rn(__fadd_rn(__fmul_rn(v, b2), 0.0f), __fadd_rn(__fmul_rn(__fmul_rn(gi, gi), c2), 0.0f)));
        mv[i] = ms;
        mv[(long long)n + i] = vs;
        float th = kl_ld(theta[i]);
        float t = decay ? __fadd_rn(__fmul_rn(th, d), 0.0f) : th;
        float denom = __fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(__fsqrt_rn(kl_ld(vs)), inv_bc2), 0.0f), 1.0f), eps);
        theta[i] = kl_st<T>(__fsub_rn(t, __fadd_rn(__fmul_rn(__fdiv_rn(kl_ld(ms), denom), step), 0.0f)));
    }
}

extern "C" __global__ void kl_adam_step(float* theta, float* mv, const float* g, int n, float c1, float b2, float c2, int decay, float d, float inv_bc2, float eps, float step) {
    adam_step<false>(theta, mv, g, n, c1, b2, c2, decay, d, inv_bc2, eps, step, 1.0f);
}
extern "C" __global__ void kl_adam_step_bf16(__nv_bfloat16* theta, __nv_bfloat16* mv, const __nv_bfloat16* g, int n, float c1, float b2, float c2, int decay, float d, float inv_bc2, float eps, float step) {
    adam_step<false>(theta, mv, g, n, c1, b2, c2, decay, d, inv_bc2, eps, step, 1.0f);
}
extern "C" __global__ void kl_adam_step_f16(__half* theta, __half* mv, const __half* g, int n, float c1, float b2, float c2, int decay, float d, float inv_bc2, float eps, float step) {
    adam_step<false>(theta, mv, g, n, c1, b2, c2, decay, d, inv_bc2, eps, step, 1.0f);
}
extern "C" __global__ void kl_adam_step_scaled(float* theta, float* mv, const float* g, int n, float c1, float b2, float c2, int decay, float d, float inv_bc2, float eps, float step, float s) {
    adam_step<true>(theta, mv, g, n, c1, b2, c2, decay, d, inv_bc2, eps, step, s);
}
extern "C" __global__ void kl_adam_step_scaled_bf16(__nv_bfloat16* theta, __nv_bfloat16* mv, const __nv_bfloat16* g, int n, float c1, float b2, float c2, int decay, float d, float inv_bc2, float eps, float step, float s) {
    adam_step<true>(theta, mv, g, n, c1, b2, c2, decay, d, inv_bc2, eps, step, s);
}
extern "C" __global__ void kl_adam_step_scaled_f16(__half* theta, __half* mv, const __half* g, int n, float c1, float b2, float c2, int decay, float d, float inv_bc2, float eps, float step, float s) {
    adam_step<true>(theta, mv, g, n, c1, b2, c2, decay, d, inv_bc2, eps, step, s);
}

// The training step's gradient probe (`train::optim::step_probes`: the non-finite check and the
// global norm for clipping) for one gradient g [n] of type T: partial[b] = the sum of the
// squares of block b's grid-stride values, each square and every sum in f64 (a block's threads
// added in a fixed tree), stored as f32; the trainer adds every gradient's partials in f64 (one
// cast and one sum for all of them), where candle's ops took some six launches a gradient and
// a copy of its size. The sum is finite exactly when every value is (an f32 square is exact in
// f64, and none of their sums overflows it) unless a block's sum passes f32's range (values
// near 1e17: PyTorch's f32 norm overflows there too). `partial` is written in place: the
// gradient's slots of the step's buffer of partial sums.
#define KL_SUMSQ_THREADS 256

template <typename T>
__device__ void sum_sq_partial(float* partial, const T* g, int n) {
    __shared__ double sh[KL_SUMSQ_THREADS];
    double s = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        double x = (double)kl_ld(g[i]);
        s += x * x;
    }
    sh[threadIdx.x] = s;
    __syncthreads();
    for (unsigned int st = blockDim.x / 2; st > 0; st >>= 1) {
        if (threadIdx.x < st) sh[threadIdx.x] += sh[threadIdx.x + st];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = (float)sh[0];
}

extern "C" __global__ void __launch_bounds__(KL_SUMSQ_THREADS) kl_sum_sq_partial(float* partial, const float* g, int n) {
    sum_sq_partial(partial, g, n);
}
extern "C" __global__ void __launch_bounds__(KL_SUMSQ_THREADS) kl_sum_sq_partial_bf16(float* partial, const __nv_bfloat16* g, int n) {
    sum_sq_partial(partial, g, n);
}
extern "C" __global__ void __launch_bounds__(KL_SUMSQ_THREADS) kl_sum_sq_partial_f16(float* partial, const __half* g, int n) {
    sum_sq_partial(partial, g, n);
}
