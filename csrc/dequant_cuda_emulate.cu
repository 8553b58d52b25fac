// vera_kernels (tests only): the CUDA dequantization kernels' per-thread code run on the CPU over the whole grid.
//
// dequant_cuda.cu writes each kernel as a __global__ shell around a __host__ __device__ function doing one
// thread's work; this file includes it and runs those functions for every (block, thread) of the grid that the
// real launch would use (the same planning code picks the grid and the vector paths), on host pointers. Built by
// tests/test_dequant_cuda_emulated.py with nvcc into a shared library and called through ctypes; not part of the
// extension. What it cannot see: shared memory, __ldg, the launch itself (make gpu-check runs those on a GPU).
//
// Entry points mirror vk_dequant_cuda.h's, on host memory and without a stream, plus max_blocks: a cap on the
// grid (0 = none) so that the tests also exercise the kernels' grid-stride loops.
#include "dequant_cuda.cu"

#if !VK_HOST_EMULATION
#error "the host emulation needs CUDA 13 headers (host versions of the fp16/bf16 conversion intrinsics)"
#endif
#if defined(__FLT_EVAL_METHOD__) && __FLT_EVAL_METHOD__ != 0
#error "build the emulator with SSE math (no x87 excess precision), and -ffp-contract=off"
#endif

namespace {

struct HostEmulation {
    int64_t max_blocks;

    int64_t blocks(unsigned int grid) const {
        return (max_blocks > 0 && max_blocks < grid) ? max_blocks : static_cast<int64_t>(grid);
    }
    template <class T, bool NESTED>
    int dequant4(const vk_cuda::Dequant4Args& a, unsigned int grid) {
        const int64_t threads = blocks(grid) * vk_cuda::kThreads;
        for (int64_t t = 0; t < threads; ++t) vk_cuda::dequant4_thread<T, NESTED>(a, a.code16, t, threads);
        return 0;
    }
    template <class T, int MODE>
    int int8(const vk_cuda::Int8Args& a, unsigned int grid) {
        const int64_t nblocks = blocks(grid);
        for (int64_t b = 0; b < nblocks; ++b) {
            for (int64_t t = 0; t < vk_cuda::kThreads; ++t) {
                vk_cuda::int8_thread<T, MODE>(a, b, nblocks, t, vk_cuda::kThreads);
            }
        }
        return 0;
    }
};

}  // namespace

extern "C" int vk_emulate_dequant_4bit(const uint8_t* packed, int64_t n, int64_t blocksize, const float* code16,
                                       const float* absmax, void* out, int out_dtype, int64_t max_blocks) {
    vk_cuda::Dequant4Args a{packed, n, blocksize, code16, absmax, nullptr, nullptr, nullptr, 1, nullptr, out, false};
    HostEmulation exec{max_blocks};
    return vk_cuda::run_dequant4<false>(a, out_dtype, exec);
}

extern "C" int vk_emulate_dequant_4bit_nested(const uint8_t* packed, int64_t n, int64_t blocksize,
                                              const float* code16, const uint8_t* qabsmax, const float* absmax2,
                                              const float* code2, int64_t blocksize2, const float* offset,
                                              void* out, int out_dtype, int64_t max_blocks) {
    vk_cuda::Dequant4Args a{packed,  n,     blocksize,  code16, nullptr, qabsmax,
                            absmax2, code2, blocksize2, offset, out,     false};
    HostEmulation exec{max_blocks};
    return vk_cuda::run_dequant4<true>(a, out_dtype, exec);
}

extern "C" int vk_emulate_dequant_int8_rowwise(const int8_t* cb, const float* scb, int64_t rows, int64_t cols,
                                               int mode, void* out, int out_dtype, int64_t max_blocks) {
    vk_cuda::Int8Args a{cb, scb, rows, cols, out, false};
    HostEmulation exec{max_blocks};
    return vk_cuda::run_int8(a, mode, out_dtype, exec);
}
