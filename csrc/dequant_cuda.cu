// vera_kernels: CUDA kernels dequantizing bitsandbytes 4-bit (nf4/fp4, plain or nested absmax) and int8
// row-wise formats. Plain CUDA: no torch header, raw pointers + sizes + a cudaStream_t (see vk_dequant_cuda.h).
//
// Bit-exactness: every product/sum is an explicit round-to-nearest fp32 operation (__fmul_rn/__fadd_rn on the
// device: never contracted into an FMA, whatever -fmad says) and outputs are cast with __float2half_rn /
// __float2bfloat16_rn (round to nearest even), which is what bitsandbytes' CUDA kernels and torch's casts do.
//
// Layout of this file: each kernel is a thin __global__ shell around a VK_THREAD_FN function that does one thread's
// share of the work given its global thread index and the grid's size. Those functions, and the host-side
// launch planning (grid size, which vectorised path is legal), also compile for the host:
// csrc/dequant_cuda_emulate.cu runs them over the whole grid on the CPU, which is how CI checks the kernels'
// indexing, vector paths, tails and partial blocks bit for bit without a GPU (tests/test_dequant_cuda_emulated.py).
// On the host the arithmetic is the host's (binary32 products with contraction off, the headers' host versions of
// the fp16/bf16 casts), equal by IEEE rules to the device intrinsics but not the same code; that, shared memory,
// __ldg and the launch itself are checked on a real GPU only (make gpu-check, against the PyTorch path).
#include "vk_dequant_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

// Per-thread code is __host__ __device__ where the toolkit's fp16/bf16 conversion intrinsics exist for the host too
// (CUDA 13 headers; older ones declare some of them device-only), so that the emulator can run it; device-only with
// older toolkits, which build the same kernels. VK_HD: integer helpers the host-side launch planning also calls.
#if CUDART_VERSION >= 13000
#define VK_THREAD_FN __host__ __device__ __forceinline__
#define VK_HOST_EMULATION 1
#else
#define VK_THREAD_FN __device__ __forceinline__
#define VK_HOST_EMULATION 0
#endif
#define VK_HD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__
#define VK_UNROLL _Pragma("unroll")
#else
#define VK_UNROLL  // the host compiler has no such pragma
#endif

namespace vk_cuda {

constexpr int kThreads = 256;
constexpr float kInv127 = 7.874015718698502e-3f;  // == (float)(1.0 / 127.0)

// ------------------------------------------------------------------------------------------- host/device math
VK_THREAD_FN float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;  // IEEE binary32 multiply; the emulator is compiled with -ffp-contract=off
#endif
}
VK_THREAD_FN float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
template <typename P>
VK_THREAD_FN P ldg(const P* p) {
#ifdef __CUDA_ARCH__
    return __ldg(p);  // read-only cache
#else
    return *p;
#endif
}

template <typename T>
VK_THREAD_FN T cvt_out(float x);
template <>
VK_THREAD_FN float cvt_out<float>(float x) {
    return x;
}
template <>
VK_THREAD_FN __half cvt_out<__half>(float x) {
    return __float2half_rn(x);
}
template <>
VK_THREAD_FN __nv_bfloat16 cvt_out<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

VK_THREAD_FN uint32_t bits16(__half h) { return static_cast<uint32_t>(__half_as_ushort(h)); }
VK_THREAD_FN uint32_t bits16(__nv_bfloat16 h) { return static_cast<uint32_t>(__bfloat16_as_ushort(h)); }

// Every vectorised thread step ends in exactly one 16-byte store: 4 float32 or 8 half/bfloat16 outputs. A warp
// then writes 512 contiguous bytes per store instruction (fully coalesced); two 16-byte stores per thread (what
// float32 output did before) leave each instruction writing every other 16 bytes.
template <typename T>
constexpr int kVecOut = 16 / static_cast<int>(sizeof(T));

template <typename T>
VK_THREAD_FN void store16(T* dst, const float (&v)[kVecOut<T>]) {
    uint4 p;
    p.x = bits16(cvt_out<T>(v[0])) | (bits16(cvt_out<T>(v[1])) << 16);
    p.y = bits16(cvt_out<T>(v[2])) | (bits16(cvt_out<T>(v[3])) << 16);
    p.z = bits16(cvt_out<T>(v[4])) | (bits16(cvt_out<T>(v[5])) << 16);
    p.w = bits16(cvt_out<T>(v[6])) | (bits16(cvt_out<T>(v[7])) << 16);
    *reinterpret_cast<uint4*>(dst) = p;
}
template <>
VK_THREAD_FN void store16<float>(float* dst, const float (&v)[kVecOut<float>]) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
}

inline bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

inline unsigned int grid_for(int64_t work_items) {
    int64_t blocks = (work_items + kThreads - 1) / kThreads;
    if (blocks < 1) blocks = 1;
    if (blocks > (int64_t(1) << 30)) blocks = int64_t(1) << 30;
    return static_cast<unsigned int>(blocks);
}

// ------------------------------------------------------------------------------------------- 4-bit
struct Dequant4Args {
    const uint8_t* packed;
    int64_t n;
    int64_t blocksize;
    const float* code16;
    const float* absmax;     // plain
    const uint8_t* qabsmax;  // nested
    const float* absmax2;
    const float* code2;
    int64_t blocksize2;
    const float* offset;
    void* out;
    bool vec_ok;  // set by plan_dequant4 for the output type
};

template <bool NESTED>
VK_THREAD_FN float block_scale(const Dequant4Args& a, int64_t blk, float offset) {
    if (NESTED) {
        const float t = mul_rn(ldg(a.code2 + ldg(a.qabsmax + blk)), ldg(a.absmax2 + blk / a.blocksize2));
        return add_rn(t, offset);
    } else {
        return ldg(a.absmax + blk);
    }
}

// A thread step covers kVecOut<T> outputs: kVecOut<T> / 2 packed bytes, loaded as one word.
template <typename T>
using PackedWord = std::conditional_t<kVecOut<T> == 8, unsigned int, unsigned short>;

template <typename T>
VK_HD int64_t dequant4_steps(int64_t n) {
    constexpr int64_t bytes = kVecOut<T> / 2;
    return (((n + 1) >> 1) + bytes - 1) / bytes;
}

// One thread's share: steps first, first + stride, ...; lut is the 16-entry code table (shared memory on the GPU).
template <typename T, bool NESTED>
VK_THREAD_FN void dequant4_thread(const Dequant4Args& a, const float* lut, int64_t first, int64_t stride) {
    constexpr int kOut = kVecOut<T>;
    constexpr int kBytes = kOut / 2;
    T* out = static_cast<T*>(a.out);
    const float offset = NESTED ? ldg(a.offset) : 0.0f;
    const int64_t nbytes = (a.n + 1) >> 1;
    const int64_t steps = dequant4_steps<T>(a.n);
    const bool uniform = (a.blocksize % kOut) == 0;  // the step's outputs share one quantization block
    for (int64_t g = first; g < steps; g += stride) {
        const int64_t b0 = g * kBytes;
        const int64_t e0 = b0 << 1;
        if (a.vec_ok && uniform && e0 + kOut <= a.n) {
            const uint32_t w = ldg(reinterpret_cast<const PackedWord<T>*>(a.packed + b0));
            const float s = block_scale<NESTED>(a, e0 / a.blocksize, offset);
            float v[kOut];
VK_UNROLL
            for (int j = 0; j < kBytes; ++j) {
                const uint32_t byte = (w >> (8 * j)) & 0xFFu;  // little endian: byte j is packed[b0 + j]
                v[2 * j] = mul_rn(lut[byte >> 4], s);
                v[2 * j + 1] = mul_rn(lut[byte & 0xFu], s);
            }
            store16<T>(out + e0, v);
        } else {
VK_UNROLL
            for (int j = 0; j < kBytes; ++j) {
                const int64_t b = b0 + j;
                if (b >= nbytes) break;
                const int64_t e = b << 1;
                const uint32_t byte = a.packed[b];
                // blocksize is even: both nibbles of a byte belong to the same block
                const float s = block_scale<NESTED>(a, e / a.blocksize, offset);
                out[e] = cvt_out<T>(mul_rn(lut[byte >> 4], s));
                if (e + 1 < a.n) out[e + 1] = cvt_out<T>(mul_rn(lut[byte & 0xFu], s));
            }
        }
    }
}

template <typename T, bool NESTED>
__global__ void __launch_bounds__(kThreads) dequant4_kernel(Dequant4Args a) {
    __shared__ float lut[16];  // 16 distinct words in 16 distinct banks: lookups never conflict
    if (threadIdx.x < 16) lut[threadIdx.x] = a.code16[threadIdx.x];
    __syncthreads();
    dequant4_thread<T, NESTED>(a, lut, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                               static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// The launch for output type T: grid size, and whether the vector path is legal (word-aligned packed bytes,
// 16-byte-aligned output).
template <typename T>
unsigned int plan_dequant4(Dequant4Args& a) {
    a.vec_ok = aligned(a.packed, sizeof(PackedWord<T>)) && aligned(a.out, 16);
    return grid_for(dequant4_steps<T>(a.n));
}

// ------------------------------------------------------------------------------------------- int8 row-wise
struct Int8Args {
    const int8_t* cb;
    const float* scb;
    int64_t rows;
    int64_t cols;
    void* out;
    bool vec4;  // set by plan_int8 for the output type
};

template <int MODE>
VK_THREAD_FN float int8_value(int8_t q, float s, float s_mode1) {
    if (MODE == 0) return mul_rn(mul_rn(static_cast<float>(q), s), kInv127);
    return mul_rn(static_cast<float>(q), s_mode1);
}

template <typename T>
VK_THREAD_FN void store4(T* dst, float a, float b, float c, float d) {
    uint2 p;
    p.x = bits16(cvt_out<T>(a)) | (bits16(cvt_out<T>(b)) << 16);
    p.y = bits16(cvt_out<T>(c)) | (bits16(cvt_out<T>(d)) << 16);
    *reinterpret_cast<uint2*>(dst) = p;
}
template <>
VK_THREAD_FN void store4<float>(float* dst, float a, float b, float c, float d) {
    *reinterpret_cast<float4*>(dst) = make_float4(a, b, c, d);
}

// One CTA per row (grid-stride over rows); the CTA's threads stride over the columns, 4 at a time when aligned.
template <typename T, int MODE>
VK_THREAD_FN void int8_thread(const Int8Args& a, int64_t block, int64_t nblocks, int64_t tid, int64_t nthreads) {
    for (int64_t r = block; r < a.rows; r += nblocks) {
        const float s = ldg(a.scb + r);
        const float s1 = mul_rn(s, kInv127);
        const int8_t* src = a.cb + r * a.cols;
        T* dst = static_cast<T*>(a.out) + r * a.cols;
        if (a.vec4) {
            const int64_t c4 = a.cols >> 2;
            for (int64_t i = tid; i < c4; i += nthreads) {
                const char4 q = ldg(reinterpret_cast<const char4*>(src) + i);
                store4<T>(dst + 4 * i, int8_value<MODE>(q.x, s, s1), int8_value<MODE>(q.y, s, s1),
                          int8_value<MODE>(q.z, s, s1), int8_value<MODE>(q.w, s, s1));
            }
        } else {
            for (int64_t c = tid; c < a.cols; c += nthreads) {
                dst[c] = cvt_out<T>(int8_value<MODE>(src[c], s, s1));
            }
        }
    }
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) int8_rowwise_kernel(Int8Args a) {
    int8_thread<T, MODE>(a, blockIdx.x, gridDim.x, threadIdx.x, blockDim.x);
}

template <typename T>
unsigned int plan_int8(Int8Args& a) {
    a.vec4 = (a.cols % 4) == 0 && aligned(a.cb, 4) && aligned(a.out, 4 * sizeof(T));
    return static_cast<unsigned int>(a.rows < (int64_t(1) << 30) ? a.rows : (int64_t(1) << 30));
}

// ------------------------------------------------------------------------------------------- dispatch
// Calls f(T{}) for the output type code (0 float32, 1 float16, 2 bfloat16); cudaErrorInvalidValue otherwise.
template <typename F>
int with_out_type(int out_dtype, F&& f) {
    switch (out_dtype) {
        case 0:
            return f(float{});
        case 1:
            return f(__half{});
        case 2:
            return f(__nv_bfloat16{});
        default:
            return static_cast<int>(cudaErrorInvalidValue);
    }
}

// The entry points' argument checks and type dispatch, shared by the CUDA launches and the host emulator. Exec
// runs a planned grid: `template <class T, bool NESTED> int dequant4(const Dequant4Args&, unsigned grid)` and
// `template <class T, int MODE> int int8(const Int8Args&, unsigned grid)`.
template <bool NESTED, class Exec>
int run_dequant4(Dequant4Args a, int out_dtype, Exec& exec) {
    if (a.n <= 0) return static_cast<int>(cudaSuccess);
    if (a.blocksize <= 0 || (a.blocksize & 1)) return static_cast<int>(cudaErrorInvalidValue);
    if (NESTED && a.blocksize2 <= 0) return static_cast<int>(cudaErrorInvalidValue);
    return with_out_type(out_dtype, [&](auto tag) {
        using T = decltype(tag);
        const unsigned int grid = plan_dequant4<T>(a);
        return exec.template dequant4<T, NESTED>(a, grid);
    });
}

template <class Exec>
int run_int8(Int8Args a, int mode, int out_dtype, Exec& exec) {
    if (a.rows <= 0 || a.cols <= 0) return static_cast<int>(cudaSuccess);
    if (mode != 0 && mode != 1) return static_cast<int>(cudaErrorInvalidValue);
    return with_out_type(out_dtype, [&](auto tag) {
        using T = decltype(tag);
        const unsigned int grid = plan_int8<T>(a);
        return mode == 0 ? exec.template int8<T, 0>(a, grid) : exec.template int8<T, 1>(a, grid);
    });
}

struct CudaLaunch {
    cudaStream_t stream;
    template <class T, bool NESTED>
    int dequant4(const Dequant4Args& a, unsigned int grid) {
        dequant4_kernel<T, NESTED><<<grid, kThreads, 0, stream>>>(a);
        return static_cast<int>(cudaGetLastError());
    }
    template <class T, int MODE>
    int int8(const Int8Args& a, unsigned int grid) {
        int8_rowwise_kernel<T, MODE><<<grid, kThreads, 0, stream>>>(a);
        return static_cast<int>(cudaGetLastError());
    }
};

}  // namespace vk_cuda

extern "C" int vk_dequant_4bit_cuda(const uint8_t* packed, int64_t n, int64_t blocksize, const float* code16,
                                    const float* absmax, void* out, int out_dtype, cudaStream_t stream) {
    vk_cuda::Dequant4Args a{packed, n, blocksize, code16, absmax, nullptr, nullptr, nullptr, 1, nullptr, out, false};
    vk_cuda::CudaLaunch exec{stream};
    return vk_cuda::run_dequant4<false>(a, out_dtype, exec);
}

extern "C" int vk_dequant_4bit_nested_cuda(const uint8_t* packed, int64_t n, int64_t blocksize, const float* code16,
                                           const uint8_t* qabsmax, const float* absmax2, const float* code2,
                                           int64_t blocksize2, const float* offset, void* out, int out_dtype,
                                           cudaStream_t stream) {
    vk_cuda::Dequant4Args a{packed,  n,     blocksize,  code16, nullptr, qabsmax,
                            absmax2, code2, blocksize2, offset, out,     false};
    vk_cuda::CudaLaunch exec{stream};
    return vk_cuda::run_dequant4<true>(a, out_dtype, exec);
}

extern "C" int vk_dequant_int8_rowwise_cuda(const int8_t* cb, const float* scb, int64_t rows, int64_t cols, int mode,
                                            void* out, int out_dtype, cudaStream_t stream) {
    vk_cuda::Int8Args a{cb, scb, rows, cols, out, false};
    vk_cuda::CudaLaunch exec{stream};
    return vk_cuda::run_int8(a, mode, out_dtype, exec);
}
