// Runs one launch of a klspeech kernel on the CPU emulator (emu.h), for tests/cuda_kernels.rs.
//
// stdin (little-endian): u32 name length, the name, u32 grid, u32 block, u32 argument count,
// then per argument a tag byte and its value: 'b' an f32 buffer (u32 n, n f32), 'h' a bf16 and
// 'e' an f16 buffer (u32 n, n u16), 'n' a null pointer, 'i' an i32, 'f' an f32, 'u' a u64.
// stdout: every buffer after the launch, in order (tag byte, u32 n, its n values). Arguments
// must match the kernel's parameters in number and kind, or it exits 2.
#include "emu.h"

#include "../../src/ops/cuda/kernels.cu"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <utility>

struct Arg {
    char tag;
    std::vector<float> buf;
    std::vector<__nv_bfloat16> bf;
    std::vector<__half> hf;
    int32_t i = 0;
    float f = 0.0f;
    uint64_t u = 0;
};

[[noreturn]] static void fail(const std::string& what) {
    std::fprintf(stderr, "cuda_emu: %s\n", what.c_str());
    std::exit(2);
}

static void read_exact(void* p, size_t n) {
    if (std::fread(p, 1, n, stdin) != n) fail("short input");
}

// A buffer argument's storage and tag by element type: f32 'b', bf16 'h', f16 'e'.
template <typename T> struct Buf;
template <> struct Buf<float> {
    static constexpr char tag = 'b';
    static std::vector<float>& of(Arg& a) { return a.buf; }
};
template <> struct Buf<__nv_bfloat16> {
    static constexpr char tag = 'h';
    static std::vector<__nv_bfloat16>& of(Arg& a) { return a.bf; }
};
template <> struct Buf<__half> {
    static constexpr char tag = 'e';
    static std::vector<__half>& of(Arg& a) { return a.hf; }
};

template <typename T> struct Get;
// An input buffer of the kernel's element type, or a null pointer ('n').
template <typename T> struct Get<const T*> {
    static const T* from(Arg& a) {
        if (a.tag == 'n') return nullptr;
        if (a.tag != Buf<T>::tag) fail(std::string("expected a buffer tagged ") + Buf<T>::tag);
        return Buf<T>::of(a).data();
    }
};
// An output buffer of the kernel's element type.
template <typename T> struct Get<T*> {
    static T* from(Arg& a) {
        if (a.tag != Buf<T>::tag) fail(std::string("expected an output buffer tagged ") + Buf<T>::tag);
        return Buf<T>::of(a).data();
    }
};
template <> struct Get<int> {
    static int from(Arg& a) {
        if (a.tag != 'i') fail("expected an i32");
        return a.i;
    }
};
template <> struct Get<unsigned long long> {
    static unsigned long long from(Arg& a) {
        if (a.tag != 'u') fail("expected a u64");
        return a.u;
    }
};
template <> struct Get<float> {
    static float from(Arg& a) {
        if (a.tag != 'f') fail("expected an f32");
        return a.f;
    }
};

using Runner = std::function<void(unsigned, unsigned, std::vector<Arg>&)>;

template <typename... P, size_t... I>
static void call(void (*k)(P...), unsigned g, unsigned b, std::vector<Arg>& a, std::index_sequence<I...>) {
    emu_launch(g, b, k, Get<P>::from(a[I])...);
}

template <typename... P> static Runner runner(void (*k)(P...)) {
    return [k](unsigned g, unsigned b, std::vector<Arg>& a) {
        if (a.size() != sizeof...(P)) fail("wrong argument count");
        call(k, g, b, a, std::index_sequence_for<P...>{});
    };
}

int main() {
    std::map<std::string, Runner> kernels = {
        {"kl_standardize_fwd", runner(kl_standardize_fwd)},
        {"kl_standardize_fwd_bf16", runner(kl_standardize_fwd_bf16)},
        {"kl_standardize_fwd_f16", runner(kl_standardize_fwd_f16)},
        {"kl_standardize_bwd", runner(kl_standardize_bwd)},
        {"kl_standardize_bwd_bf16", runner(kl_standardize_bwd_bf16)},
        {"kl_standardize_bwd_f16", runner(kl_standardize_bwd_f16)},
        {"kl_softmax_bwd", runner(kl_softmax_bwd)},
        {"kl_softmax_bwd_bf16", runner(kl_softmax_bwd_bf16)},
        {"kl_softmax_bwd_f16", runner(kl_softmax_bwd_f16)},
        {"kl_gelu_fwd", runner(kl_gelu_fwd)},
        {"kl_gelu_fwd_bf16", runner(kl_gelu_fwd_bf16)},
        {"kl_gelu_fwd_f16", runner(kl_gelu_fwd_f16)},
        {"kl_gelu_bwd", runner(kl_gelu_bwd)},
        {"kl_gelu_bwd_bf16", runner(kl_gelu_bwd_bf16)},
        {"kl_gelu_bwd_f16", runner(kl_gelu_bwd_f16)},
        {"kl_attn_softmax", runner(kl_attn_softmax)},
        {"kl_attn_softmax_bf16", runner(kl_attn_softmax_bf16)},
        {"kl_attn_softmax_f16", runner(kl_attn_softmax_f16)},
        {"kl_klnorm_fwd", runner(kl_klnorm_fwd)},
        {"kl_klnorm_fwd_bf16", runner(kl_klnorm_fwd_bf16)},
        {"kl_klnorm_fwd_f16", runner(kl_klnorm_fwd_f16)},
        {"kl_klnorm_bwd", runner(kl_klnorm_bwd)},
        {"kl_klnorm_bwd_bf16", runner(kl_klnorm_bwd_bf16)},
        {"kl_klnorm_bwd_f16", runner(kl_klnorm_bwd_f16)},
        {"kl_colsum", runner(kl_colsum)},
        {"kl_layer_norm_fwd", runner(kl_layer_norm_fwd)},
        {"kl_layer_norm_fwd_bf16", runner(kl_layer_norm_fwd_bf16)},
        {"kl_layer_norm_fwd_f16", runner(kl_layer_norm_fwd_f16)},
        {"kl_residual_layer_norm", runner(kl_residual_layer_norm)},
        {"kl_residual_layer_norm_bf16", runner(kl_residual_layer_norm_bf16)},
        {"kl_residual_layer_norm_f16", runner(kl_residual_layer_norm_f16)},
        {"kl_layer_norm_bwd", runner(kl_layer_norm_bwd)},
        {"kl_layer_norm_bwd_bf16", runner(kl_layer_norm_bwd_bf16)},
        {"kl_layer_norm_bwd_f16", runner(kl_layer_norm_bwd_f16)},
        {"kl_group_norm_cl_fwd", runner(kl_group_norm_cl_fwd)},
        {"kl_group_norm_cl_fwd_bf16", runner(kl_group_norm_cl_fwd_bf16)},
        {"kl_group_norm_cl_fwd_f16", runner(kl_group_norm_cl_fwd_f16)},
        {"kl_group_norm_cl_masked_fwd", runner(kl_group_norm_cl_masked_fwd)},
        {"kl_group_norm_cl_masked_fwd_bf16", runner(kl_group_norm_cl_masked_fwd_bf16)},
        {"kl_group_norm_cl_masked_fwd_f16", runner(kl_group_norm_cl_masked_fwd_f16)},
        {"kl_sum_sq_partial", runner(kl_sum_sq_partial)},
        {"kl_sum_sq_partial_bf16", runner(kl_sum_sq_partial_bf16)},
        {"kl_sum_sq_partial_f16", runner(kl_sum_sq_partial_f16)},
        {"kl_conv1_group_norm_gelu", runner(kl_conv1_group_norm_gelu)},
        {"kl_conv1_group_norm_gelu_bf16", runner(kl_conv1_group_norm_gelu_bf16)},
        {"kl_conv1_group_norm_gelu_f16", runner(kl_conv1_group_norm_gelu_f16)},
        {"kl_bias_add", runner(kl_bias_add)},
        {"kl_bias_add_bf16", runner(kl_bias_add_bf16)},
        {"kl_bias_add_f16", runner(kl_bias_add_f16)},
        {"kl_group_norm_cl_bwd", runner(kl_group_norm_cl_bwd)},
        {"kl_group_norm_cl_bwd_bf16", runner(kl_group_norm_cl_bwd_bf16)},
        {"kl_group_norm_cl_bwd_f16", runner(kl_group_norm_cl_bwd_f16)},
        {"kl_group_norm_cl_masked_bwd", runner(kl_group_norm_cl_masked_bwd)},
        {"kl_group_norm_cl_masked_bwd_bf16", runner(kl_group_norm_cl_masked_bwd_bf16)},
        {"kl_group_norm_cl_masked_bwd_f16", runner(kl_group_norm_cl_masked_bwd_f16)},
        {"kl_keyed_normal", runner(kl_keyed_normal)},
        {"kl_dropout_mask", runner(kl_dropout_mask)},
        {"kl_gather_taps", runner(kl_gather_taps)},
        {"kl_gather_taps_bf16", runner(kl_gather_taps_bf16)},
        {"kl_gather_taps_f16", runner(kl_gather_taps_f16)},
        {"kl_cat3", runner(kl_cat3)},
        {"kl_cat3_bf16", runner(kl_cat3_bf16)},
        {"kl_cat3_f16", runner(kl_cat3_f16)},
        {"kl_merge_qkv", runner(kl_merge_qkv)},
        {"kl_merge_qkv_bf16", runner(kl_merge_qkv_bf16)},
        {"kl_merge_qkv_f16", runner(kl_merge_qkv_f16)},
        {"kl_copy_rows", runner(kl_copy_rows)},
        {"kl_copy_rows_bf16", runner(kl_copy_rows_bf16)},
        {"kl_copy_rows_f16", runner(kl_copy_rows_f16)},
        {"kl_col2im", runner(kl_col2im)},
        {"kl_col2im_bf16", runner(kl_col2im_bf16)},
        {"kl_col2im_f16", runner(kl_col2im_f16)},
        {"kl_adam_moments", runner(kl_adam_moments)},
        {"kl_adam_moments_bf16", runner(kl_adam_moments_bf16)},
        {"kl_adam_moments_f16", runner(kl_adam_moments_f16)},
        {"kl_adam_apply", runner(kl_adam_apply)},
        {"kl_adam_apply_bf16", runner(kl_adam_apply_bf16)},
        {"kl_adam_apply_f16", runner(kl_adam_apply_f16)},
        {"kl_adam_step", runner(kl_adam_step)},
        {"kl_adam_step_bf16", runner(kl_adam_step_bf16)},
        {"kl_adam_step_f16", runner(kl_adam_step_f16)},
        {"kl_adam_step_scaled", runner(kl_adam_step_scaled)},
        {"kl_adam_step_scaled_bf16", runner(kl_adam_step_scaled_bf16)},
        {"kl_adam_step_scaled_f16", runner(kl_adam_step_scaled_f16)},
    };
    uint32_t len;
    read_exact(&len, 4);
    std::string name(len, '\0');
    read_exact(name.data(), len);
    uint32_t grid, block, nargs;
    read_exact(&grid, 4);
    read_exact(&block, 4);
    read_exact(&nargs, 4);
    std::vector<Arg> args(nargs);
    for (auto& a : args) {
        read_exact(&a.tag, 1);
        // A buffer: u32 n, then its n values.
        auto read_buf = [](auto& v) {
            uint32_t n;
            read_exact(&n, 4);
            v.resize(n);
            read_exact(v.data(), sizeof(v[0]) * (size_t)n);
        };
        if (a.tag == 'b') {
            read_buf(a.buf);
        } else if (a.tag == 'h') {
            read_buf(a.bf);
        } else if (a.tag == 'e') {
            read_buf(a.hf);
        } else if (a.tag == 'i') {
            read_exact(&a.i, 4);
        } else if (a.tag == 'f') {
            read_exact(&a.f, 4);
        } else if (a.tag == 'u') {
            read_exact(&a.u, 8);
        } else if (a.tag != 'n') {
            fail("unknown argument tag");
        }
    }
    auto k = kernels.find(name);
    if (k == kernels.end()) fail("unknown kernel " + name);
    if (block == 0 || (block & (block - 1)) != 0 || block > 1024) fail("block size must be a power of two up to 1024");
    k->second(grid, block, args);
    for (auto& a : args) {
        auto write_buf = [&](const auto& v) {
            uint32_t n = (uint32_t)v.size();
            std::fwrite(&a.tag, 1, 1, stdout);
            std::fwrite(&n, 4, 1, stdout);
            std::fwrite(v.data(), sizeof(v[0]), n, stdout);
        };
        if (a.tag == 'b') write_buf(a.buf);
        if (a.tag == 'h') write_buf(a.bf);
        if (a.tag == 'e') write_buf(a.hf);
    }
    return 0;
}
