// vera_kernels: dequantization of bitsandbytes formats -- plain C++ interface of the CPU kernels.
//
// No torch (and no CUDA) header here: the kernels take raw pointers and sizes. The torch binding
// (ops.cpp) validates tensors and calls these.
//
// Arithmetic (bit-exact with bitsandbytes 0.50.2, see vera_kernels/quant/dequant.py for the details):
//   4-bit : out[i] = cast<T>( fl32( code16[nibble(i)] * scale[i / blocksize] ) )
//           nibble(i) = i even ? packed[i/2] >> 4 : packed[i/2] & 0xF   (high nibble first)
//           scale[b]  = absmax[b]                                     (plain absmax)
//                     = fl32( fl32(code2[qabsmax[b]] * absmax2[b / blocksize2]) + offset )   (nested)
//   int8  : mode 0 (int8_vectorwise_dequant): out = cast<T>( fl32( fl32(float(CB) * SCB[r]) * C ) )
//           mode 1 (MatMul8bitFp)           : out = cast<T>( fl32( float(CB) * fl32(SCB[r] * C) ) )
//           C = (float)(1/127) = 7.874015718698502e-3f
//   cast<T>: float -> fp16 / bf16 round-to-nearest-even, identical to torch's Tensor.to().
#pragma once

#include <cstdint>

namespace vk {

enum OutDType : int { kOutF32 = 0, kOutF16 = 1, kOutBF16 = 2 };

// Double-quantized ("nested") absmax description (bitsandbytes QuantState.state2 + offset).
struct NestedAbsmax {
    const uint8_t* qabsmax;  // one uint8 code per 4-bit block
    const float* absmax2;    // one float per blocksize2 entries of qabsmax
    const float* code2;      // 256-entry code table (state2.code)
    int64_t blocksize2;
    float offset;
};

// n: number of output elements; packed holds (n + 1) / 2 bytes. absmax is ignored when nested != nullptr.
void dequant_4bit_cpu(const uint8_t* packed, int64_t n, int64_t blocksize, const float* code16,
                      const float* absmax, const NestedAbsmax* nested, void* out, int out_dtype);

// CB: rows x cols int8 (row-major), SCB: rows floats.
void dequant_int8_rowwise_cpu(const int8_t* cb, const float* scb, int64_t rows, int64_t cols, int mode,
                              void* out, int out_dtype);

// Scalar conversions used by the kernels (exposed for testing / reuse).
uint16_t float_to_bf16_rne(float f);
uint16_t float_to_fp16_rne(float f);

int omp_threads();

}  // namespace vk
