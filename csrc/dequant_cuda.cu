// vera_kernels: CUDA kernels dequantizing bitsandbytes 4-bit (nf4/fp4, plain or nested absmax) and int8
// row-wise formats. Plain CUDA: no torch header, raw pointers + sizes + a cudaStream_t (see vk_dequant_cuda.h).
//
// Bit-exactness: every product/sum is an explicit __fmul_rn/__fadd_rn (never contracted into an FMA, whatever
// -fmad says) and outputs are cast with __float2half_rn / __float2bfloat16_rn (round to nearest even), which
// is what bitsandbytes' CUDA kernels and torch's casts do.
#include "vk_dequant_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr float kInv127 = 7.874015718698502e-3f;  // == (float)(1.0 / 127.0)

template <typename T>
__device__ __forceinline__ T cvt_out(float x);
template <>
__device__ __forceinline__ float cvt_out<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ __half cvt_out<__half>(float x) {
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 cvt_out<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ uint32_t bits16(__half h) { return static_cast<uint32_t>(__half_as_ushort(h)); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 h) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(h));
}

// Store 8 consecutive outputs; dst is 16-byte aligned (checked by the launcher).
template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&v)[8]) {
    uint4 p;
    p.x = bits16(cvt_out<T>(v[0])) | (bits16(cvt_out<T>(v[1])) << 16);
    p.y = bits16(cvt_out<T>(v[2])) | (bits16(cvt_out<T>(v[3])) << 16);
    p.z = bits16(cvt_out<T>(v[4])) | (bits16(cvt_out<T>(v[5])) << 16);
    p.w = bits16(cvt_out<T>(v[6])) | (bits16(cvt_out<T>(v[7])) << 16);
    *reinterpret_cast<uint4*>(dst) = p;
}
template <>
__device__ __forceinline__ void store8<float>(float* dst, const float (&v)[8]) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

struct ScaleArgs {
    const float* absmax;    // plain
    const uint8_t* qabsmax; // nested
    const float* absmax2;
    const float* code2;
    int64_t blocksize2;
    const float* offset;
};

template <bool NESTED>
__device__ __forceinline__ float block_scale(const ScaleArgs& a, int64_t blk, float offset) {
    if (NESTED) {
        const float t = __fmul_rn(__ldg(a.code2 + __ldg(a.qabsmax + blk)), __ldg(a.absmax2 + blk / a.blocksize2));
        return __fadd_rn(t, offset);
    } else {
        return __ldg(a.absmax + blk);
    }
}

// Each thread handles groups of 4 packed bytes (8 outputs); the 16-entry code table sits in shared memory
// (16 distinct words in 16 distinct banks: lookups never conflict).
template <typename T, bool NESTED>
__global__ void __launch_bounds__(kThreads)
    dequant4_kernel(const uint8_t* __restrict__ packed, int64_t n, int64_t blocksize, const float* __restrict__ code16,
                    ScaleArgs sa, T* __restrict__ out, bool vec_ok) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = code16[threadIdx.x];
    __syncthreads();

    const float offset = NESTED ? __ldg(sa.offset) : 0.0f;
    const int64_t nbytes = (n + 1) >> 1;
    const int64_t ngroups = (nbytes + 3) >> 2;
    const bool uniform = (blocksize & 7) == 0;  // the 8 outputs of a group share one quantization block
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups; g += stride) {
        const int64_t b0 = g << 2;
        const int64_t e0 = b0 << 1;
        if (vec_ok && uniform && e0 + 8 <= n) {
            const uint32_t w = __ldg(reinterpret_cast<const unsigned int*>(packed + b0));
            const float s = block_scale<NESTED>(sa, e0 / blocksize, offset);
            float v[8];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t byte = (w >> (8 * j)) & 0xFFu;
                v[2 * j] = __fmul_rn(lut[byte >> 4], s);
                v[2 * j + 1] = __fmul_rn(lut[byte & 0xFu], s);
            }
            store8<T>(out + e0, v);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int64_t b = b0 + j;
                if (b >= nbytes) break;
                const int64_t e = b << 1;
                const uint32_t byte = packed[b];
                // blocksize is even: both nibbles of a byte belong to the same block
                const float s = block_scale<NESTED>(sa, e / blocksize, offset);
                out[e] = cvt_out<T>(__fmul_rn(lut[byte >> 4], s));
                if (e + 1 < n) out[e + 1] = cvt_out<T>(__fmul_rn(lut[byte & 0xFu], s));
            }
        }
    }
}

template <int MODE>
__device__ __forceinline__ float int8_value(int8_t q, float s, float s_mode1) {
    if (MODE == 0) return __fmul_rn(__fmul_rn(static_cast<float>(q), s), kInv127);
    return __fmul_rn(static_cast<float>(q), s_mode1);
}

template <typename T>
__device__ __forceinline__ void store4(T* dst, float a, float b, float c, float d) {
    uint2 p;
    p.x = bits16(cvt_out<T>(a)) | (bits16(cvt_out<T>(b)) << 16);
    p.y = bits16(cvt_out<T>(c)) | (bits16(cvt_out<T>(d)) << 16);
    *reinterpret_cast<uint2*>(dst) = p;
}
template <>
__device__ __forceinline__ void store4<float>(float* dst, float a, float b, float c, float d) {
    *reinterpret_cast<float4*>(dst) = make_float4(a, b, c, d);
}

// One CTA per row (grid-stride over rows); threads stride over the columns, 4 at a time when aligned.
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads)
    int8_rowwise_kernel(const int8_t* __restrict__ cb, const float* __restrict__ scb, int64_t rows, int64_t cols,
                        T* __restrict__ out, bool vec4) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float s = __ldg(scb + r);
        const float s1 = __fmul_rn(s, kInv127);
        const int8_t* src = cb + r * cols;
        T* dst = out + r * cols;
        if (vec4) {
            const int64_t c4 = cols >> 2;
            for (int64_t i = threadIdx.x; i < c4; i += blockDim.x) {
                const char4 q = __ldg(reinterpret_cast<const char4*>(src) + i);
                store4<T>(dst + 4 * i, int8_value<MODE>(q.x, s, s1), int8_value<MODE>(q.y, s, s1),
                          int8_value<MODE>(q.z, s, s1), int8_value<MODE>(q.w, s, s1));
            }
        } else {
            for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
                dst[c] = cvt_out<T>(int8_value<MODE>(src[c], s, s1));
            }
        }
    }
}

inline unsigned int grid_for(int64_t work_items) {
    int64_t blocks = (work_items + kThreads - 1) / kThreads;
    if (blocks < 1) blocks = 1;
    if (blocks > (int64_t(1) << 30)) blocks = int64_t(1) << 30;
    return static_cast<unsigned int>(blocks);
}

inline bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

template <bool NESTED>
int launch_dequant4(const uint8_t* packed, int64_t n, int64_t blocksize, const float* code16, const ScaleArgs& sa,
                    void* out, int out_dtype, cudaStream_t stream) {
    if (n <= 0) return static_cast<int>(cudaSuccess);
    if (blocksize <= 0 || (blocksize & 1)) return static_cast<int>(cudaErrorInvalidValue);
    const int64_t ngroups = (((n + 1) >> 1) + 3) >> 2;
    const unsigned int grid = grid_for(ngroups);
    const bool vec_ok = aligned(packed, 4) && aligned(out, 16);
    switch (out_dtype) {
        case 0:
            dequant4_kernel<float, NESTED><<<grid, kThreads, 0, stream>>>(packed, n, blocksize, code16, sa,
                                                                          static_cast<float*>(out), vec_ok);
            break;
        case 1:
            dequant4_kernel<__half, NESTED><<<grid, kThreads, 0, stream>>>(packed, n, blocksize, code16, sa,
                                                                           static_cast<__half*>(out), vec_ok);
            break;
        case 2:
            dequant4_kernel<__nv_bfloat16, NESTED><<<grid, kThreads, 0, stream>>>(
                packed, n, blocksize, code16, sa, static_cast<__nv_bfloat16*>(out), vec_ok);
            break;
        default:
            return static_cast<int>(cudaErrorInvalidValue);
    }
    return static_cast<int>(cudaGetLastError());
}

template <int MODE>
int launch_int8(const int8_t* cb, const float* scb, int64_t rows, int64_t cols, void* out, int out_dtype,
                cudaStream_t stream) {
    int64_t g = rows < (int64_t(1) << 30) ? rows : (int64_t(1) << 30);
    const unsigned int grid = static_cast<unsigned int>(g);
    const int elt = out_dtype == 0 ? 4 : 2;
    const bool vec4 = (cols % 4) == 0 && aligned(cb, 4) && aligned(out, 4 * elt);
    switch (out_dtype) {
        case 0:
            int8_rowwise_kernel<float, MODE><<<grid, kThreads, 0, stream>>>(cb, scb, rows, cols,
                                                                             static_cast<float*>(out), vec4);
            break;
        case 1:
            int8_rowwise_kernel<__half, MODE><<<grid, kThreads, 0, stream>>>(cb, scb, rows, cols,
                                                                              static_cast<__half*>(out), vec4);
            break;
        case 2:
            int8_rowwise_kernel<__nv_bfloat16, MODE><<<grid, kThreads, 0, stream>>>(
                cb, scb, rows, cols, static_cast<__nv_bfloat16*>(out), vec4);
            break;
        default:
            return static_cast<int>(cudaErrorInvalidValue);
    }
    return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int vk_dequant_4bit_cuda(const uint8_t* packed, int64_t n, int64_t blocksize, const float* code16,
                                    const float* absmax, void* out, int out_dtype, cudaStream_t stream) {
    ScaleArgs sa{absmax, nullptr, nullptr, nullptr, 1, nullptr};
    return launch_dequant4<false>(packed, n, blocksize, code16, sa, out, out_dtype, stream);
}

extern "C" int vk_dequant_4bit_nested_cuda(const uint8_t* packed, int64_t n, int64_t blocksize, const float* code16,
                                           const uint8_t* qabsmax, const float* absmax2, const float* code2,
                                           int64_t blocksize2, const float* offset, void* out, int out_dtype,
                                           cudaStream_t stream) {
    if (blocksize2 <= 0) return static_cast<int>(cudaErrorInvalidValue);
    ScaleArgs sa{nullptr, qabsmax, absmax2, code2, blocksize2, offset};
    return launch_dequant4<true>(packed, n, blocksize, code16, sa, out, out_dtype, stream);
}

extern "C" int vk_dequant_int8_rowwise_cuda(const int8_t* cb, const float* scb, int64_t rows, int64_t cols, int mode,
                                            void* out, int out_dtype, cudaStream_t stream) {
    if (rows <= 0 || cols <= 0) return static_cast<int>(cudaSuccess);
    if (mode == 0) return launch_int8<0>(cb, scb, rows, cols, out, out_dtype, stream);
    if (mode == 1) return launch_int8<1>(cb, scb, rows, cols, out, out_dtype, stream);
    return static_cast<int>(cudaErrorInvalidValue);
}
