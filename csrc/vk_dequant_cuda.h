// vera_kernels: CUDA launchers for the dequantization kernels (plain C ABI, no torch).
//
// All pointers are device pointers; launches are asynchronous on `stream`. Each launcher returns the
// cudaError_t of the launch (cudaGetLastError() right after it), 0 (cudaSuccess) when fine.
// out_dtype: 0 = float32, 1 = float16, 2 = bfloat16 (vk::OutDType).
// Arithmetic is documented in vk_dequant.h; products and sums use __fmul_rn / __fadd_rn (never fused)
// and casts use __float2half_rn / __float2bfloat16_rn (round to nearest even, as torch).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Plain absmax: absmax has ceil(n / blocksize) floats. blocksize must be even and > 0.
int vk_dequant_4bit_cuda(const uint8_t* packed, int64_t n, int64_t blocksize, const float* code16,
                         const float* absmax, void* out, int out_dtype, cudaStream_t stream);

// Nested absmax: scale[b] = fl(fl(code2[qabsmax[b]] * absmax2[b / blocksize2]) + offset[0]).
int vk_dequant_4bit_nested_cuda(const uint8_t* packed, int64_t n, int64_t blocksize, const float* code16,
                                const uint8_t* qabsmax, const float* absmax2, const float* code2,
                                int64_t blocksize2, const float* offset, void* out, int out_dtype,
                                cudaStream_t stream);

// CB: rows x cols int8 row-major; SCB: rows floats. mode 0: int8_vectorwise_dequant order, 1: MatMul8bitFp order.
int vk_dequant_int8_rowwise_cuda(const int8_t* cb, const float* scb, int64_t rows, int64_t cols, int mode,
                                 void* out, int out_dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
