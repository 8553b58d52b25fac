// vera_kernels: CPU (OpenMP) kernels dequantizing bitsandbytes 4-bit (nf4/fp4) and int8 row-wise formats.
// Plain C++ (no torch). Build with -fopenmp (optional) and -ffp-contract=off (no a*b+c fusion: the nested
// absmax is fl(fl(a*b)+c) in bitsandbytes, an FMA would change the last bit).
#include "vk_dequant.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

// x86-64 + GCC/Clang: an AVX-512 (F+BW) variant of the 4-bit kernel, selected at run time. It computes the
// same float32 products (a 16-lane multiply of the code table by the block's scale) and looks the results up
// with vpermps / vpermw, so its output is bit-identical to the scalar path.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(VK_NO_SIMD)
#define VK_HAVE_AVX512_PATH 1
#include <immintrin.h>
#endif

namespace vk {

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

// Same as c10::BFloat16(float) (round_to_nearest_even): NaN -> 0x7FC0 (sign dropped).
uint16_t float_to_bf16_rne(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// IEEE binary32 -> binary16, round to nearest even, integer-only (independent of FP flags/contraction).
// Bit-identical to c10::Half(float) for all non-NaN inputs (overflow -> inf, gradual underflow); NaN -> 0x7E00|sign.
uint16_t float_to_fp16_rne(float f) {
    const uint32_t x = f32_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);   // NaN
    if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
    if (ax < 0x38800000u) {                                               // < 2^-14: fp16 subnormal / zero
        if (ax < 0x33000000u) return static_cast<uint16_t>(sign);         // < 2^-25: rounds to 0
        const uint32_t e = ax >> 23;                                     // 102..112
        const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
        const uint32_t shift = 126u - e;                                  // 14..24
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u);
        const uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u))) ++r;
        return static_cast<uint16_t>(sign | r);
    }
    uint32_t r = (ax >> 13) - (112u << 10);  // rebias exponent 127 -> 15
    const uint32_t rem = ax & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // carry into the exponent is correct
    return static_cast<uint16_t>(sign | r);
}

int omp_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

namespace {

struct ConvF32 {
    using T = float;
    static inline float cvt(float v) { return v; }
};
struct ConvF16 {
    using T = uint16_t;
    static inline uint16_t cvt(float v) { return float_to_fp16_rne(v); }
};
struct ConvBF16 {
    using T = uint16_t;
    static inline uint16_t cvt(float v) { return float_to_bf16_rne(v); }
};

// Work is split in chunks of whole quantization blocks; below this many elements run single-threaded.
constexpr int64_t kParallelMinElems = 1 << 15;

inline float block_scale(const float* absmax, const NestedAbsmax* nst, int64_t b) {
    if (nst) {
        const float t = nst->code2[nst->qabsmax[b]] * nst->absmax2[b / nst->blocksize2];
        return t + nst->offset;
    }
    return absmax[b];
}

#ifdef VK_HAVE_AVX512_PATH
// VERA_KERNELS_NO_SIMD=1 (checked on every call) forces the portable scalar path, e.g. to test it.
bool cpu_has_avx512bw() {
    static const bool v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
    const char* env = std::getenv("VERA_KERNELS_NO_SIMD");
    return v && !(env && env[0] && env[0] != '0');
}

#define VK_AVX512_TARGET_PRE __attribute__((target("avx512f,avx512bw,avx512vl")))

// 16 packed bytes -> 32 nibble indices in output order (high nibble first), as 32 bytes.
VK_AVX512_TARGET_PRE inline __m256i nibbles32(const uint8_t* p) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i hi = _mm256_srli_epi16(v, 4);
    const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(0xF));
    return _mm256_or_si256(hi, _mm256_slli_epi16(lo, 8));
}

// Even blocksize only (block starts are byte-aligned).
VK_AVX512_TARGET_PRE void dequant_4bit_avx512_f32(
    const uint8_t* __restrict packed, int64_t n, int64_t blocksize, const float* code16, const float* absmax,
    const NestedAbsmax* nst, float* __restrict out) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const __m512 lut = _mm512_loadu_ps(code16);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelMinElems)
#endif
    for (int64_t b = 0; b < nblocks; ++b) {
        const __m512 slut = _mm512_mul_ps(lut, _mm512_set1_ps(block_scale(absmax, nst, b)));
        alignas(64) float tab[16];
        _mm512_store_ps(tab, slut);
        const int64_t start = b * blocksize;
        const int64_t end = (start + blocksize < n) ? start + blocksize : n;
        const int64_t npairs = (end - start) >> 1;
        const uint8_t* __restrict p = packed + (start >> 1);
        float* __restrict o = out + start;
        int64_t j = 0;
        for (; j + 16 <= npairs; j += 16) {
            const __m256i w = nibbles32(p + j);
            const __m512i i0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(w));
            const __m512i i1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(w, 1));
            _mm512_storeu_ps(o + 2 * j, _mm512_permutexvar_ps(i0, slut));
            _mm512_storeu_ps(o + 2 * j + 16, _mm512_permutexvar_ps(i1, slut));
        }
        for (; j < npairs; ++j) {
            const uint8_t byte = p[j];
            o[2 * j] = tab[byte >> 4];
            o[2 * j + 1] = tab[byte & 0xF];
        }
        if (start + 2 * npairs < end) o[2 * npairs] = tab[p[npairs] >> 4];
    }
}

#define VK_AVX512_TARGET VK_AVX512_TARGET_PRE

// 16 floats -> 16 bf16, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16 / float_to_bf16_rne).
VK_AVX512_TARGET inline __m256i cvt16_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

// 16 floats -> 16 fp16, round to nearest even (IEEE: overflow -> inf, gradual underflow); NaN -> 0x7E00|sign
// (as c10::Half / float_to_fp16_rne).
VK_AVX512_TARGET inline __m256i cvt16_fp16(__m512 v) {
    __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    if (nan) {
        const __m256i sign = _mm256_and_si256(
            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)), _mm256_set1_epi16(-32768));
        h = _mm256_mask_mov_epi16(h, nan, _mm256_or_si256(sign, _mm256_set1_epi16(0x7E00)));
    }
    return h;
}

template <bool BF16>
VK_AVX512_TARGET void dequant_4bit_avx512_u16(const uint8_t* __restrict packed, int64_t n, int64_t blocksize,
                                              const float* code16, const float* absmax, const NestedAbsmax* nst,
                                              uint16_t* __restrict out) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const __m512 lut = _mm512_loadu_ps(code16);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelMinElems)
#endif
    for (int64_t b = 0; b < nblocks; ++b) {
        // converted table of this block: cast(fl32(code * scale)), 16 lanes at once
        const __m512 slut = _mm512_mul_ps(lut, _mm512_set1_ps(block_scale(absmax, nst, b)));
        const __m256i t16 = BF16 ? cvt16_bf16(slut) : cvt16_fp16(slut);
        const __m512i vtab = _mm512_zextsi256_si512(t16);
        alignas(32) uint16_t tab[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(tab), t16);
        const int64_t start = b * blocksize;
        const int64_t end = (start + blocksize < n) ? start + blocksize : n;
        const int64_t npairs = (end - start) >> 1;
        const uint8_t* __restrict p = packed + (start >> 1);
        uint16_t* __restrict o = out + start;
        int64_t j = 0;
        for (; j + 16 <= npairs; j += 16) {
            const __m512i idx = _mm512_cvtepu8_epi16(nibbles32(p + j));
            _mm512_storeu_si512(reinterpret_cast<void*>(o + 2 * j), _mm512_permutexvar_epi16(idx, vtab));
        }
        for (; j < npairs; ++j) {
            const uint8_t byte = p[j];
            o[2 * j] = tab[byte >> 4];
            o[2 * j + 1] = tab[byte & 0xF];
        }
        if (start + 2 * npairs < end) o[2 * npairs] = tab[p[npairs] >> 4];
    }
}
#endif  // VK_HAVE_AVX512_PATH

template <class Conv>
void dequant_4bit_impl(const uint8_t* __restrict packed, int64_t n, int64_t blocksize, const float* code16,
                       const float* __restrict absmax, const NestedAbsmax* nested, typename Conv::T* __restrict out) {
    using T = typename Conv::T;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    float lut[16];
    for (int i = 0; i < 16; ++i) lut[i] = code16[i];
    NestedAbsmax nst{};
    const bool is_nested = nested != nullptr;
    if (is_nested) nst = *nested;

#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelMinElems)
#endif
    for (int64_t b = 0; b < nblocks; ++b) {
        float scale;
        if (is_nested) {
            const float t = nst.code2[nst.qabsmax[b]] * nst.absmax2[b / nst.blocksize2];
            scale = t + nst.offset;
        } else {
            scale = absmax[b];
        }
        // 16-entry table of already-converted outputs for this block: fl(code * scale) then cast.
        T tab[16];
        for (int i = 0; i < 16; ++i) tab[i] = Conv::cvt(lut[i] * scale);

        const int64_t start = b * blocksize;
        const int64_t end = (start + blocksize < n) ? start + blocksize : n;
        int64_t e = start;
        if (e & 1) {  // odd block start (odd blocksize only): low nibble of a shared byte
            out[e] = tab[packed[e >> 1] & 0xF];
            ++e;
        }
        const int64_t pair_end = e + ((end - e) & ~int64_t(1));
        const uint8_t* __restrict p = packed + (e >> 1);
        T* __restrict o = out + e;
        const int64_t npairs = (pair_end - e) >> 1;
        for (int64_t j = 0; j < npairs; ++j) {
            const uint8_t byte = p[j];
            o[2 * j] = tab[byte >> 4];
            o[2 * j + 1] = tab[byte & 0xF];
        }
        if (pair_end < end) {  // odd tail: high nibble only
            out[pair_end] = tab[packed[pair_end >> 1] >> 4];
        }
    }
}

constexpr float kInv127 = 7.874015718698502e-3f;  // == (float)(1.0 / 127.0)

template <class Conv>
void dequant_int8_impl(const int8_t* __restrict cb, const float* __restrict scb, int64_t rows, int64_t cols,
                       int mode, typename Conv::T* __restrict out) {
    using T = typename Conv::T;
    const bool use_lut = cols >= 512;  // per-row 256-entry table of converted outputs
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMinElems)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        const float s = scb[r];
        const float s_mode1 = s * kInv127;
        const int8_t* __restrict src = cb + r * cols;
        T* __restrict dst = out + r * cols;
        if (use_lut) {
            T tab[256];
            for (int q = -128; q < 128; ++q) {
                float v;
                if (mode == 0) {
                    const float t = static_cast<float>(q) * s;
                    v = t * kInv127;
                } else {
                    v = static_cast<float>(q) * s_mode1;
                }
                tab[q & 0xFF] = Conv::cvt(v);
            }
            for (int64_t c = 0; c < cols; ++c) dst[c] = tab[static_cast<uint8_t>(src[c])];
        } else if (mode == 0) {
            for (int64_t c = 0; c < cols; ++c) {
                const float t = static_cast<float>(src[c]) * s;
                dst[c] = Conv::cvt(t * kInv127);
            }
        } else {
            for (int64_t c = 0; c < cols; ++c) dst[c] = Conv::cvt(static_cast<float>(src[c]) * s_mode1);
        }
    }
}

}  // namespace

void dequant_4bit_cpu(const uint8_t* packed, int64_t n, int64_t blocksize, const float* code16,
                      const float* absmax, const NestedAbsmax* nested, void* out, int out_dtype) {
    if (n <= 0 || blocksize <= 0) return;
#ifdef VK_HAVE_AVX512_PATH
    if (blocksize % 2 == 0 && cpu_has_avx512bw()) {
        switch (out_dtype) {
            case kOutF32:
                dequant_4bit_avx512_f32(packed, n, blocksize, code16, absmax, nested, static_cast<float*>(out));
                return;
            case kOutF16:
                dequant_4bit_avx512_u16<false>(packed, n, blocksize, code16, absmax, nested,
                                               static_cast<uint16_t*>(out));
                return;
            default:
                dequant_4bit_avx512_u16<true>(packed, n, blocksize, code16, absmax, nested,
                                              static_cast<uint16_t*>(out));
                return;
        }
    }
#endif
    switch (out_dtype) {
        case kOutF32:
            dequant_4bit_impl<ConvF32>(packed, n, blocksize, code16, absmax, nested, static_cast<float*>(out));
            break;
        case kOutF16:
            dequant_4bit_impl<ConvF16>(packed, n, blocksize, code16, absmax, nested, static_cast<uint16_t*>(out));
            break;
        default:
            dequant_4bit_impl<ConvBF16>(packed, n, blocksize, code16, absmax, nested, static_cast<uint16_t*>(out));
            break;
    }
}

void dequant_int8_rowwise_cpu(const int8_t* cb, const float* scb, int64_t rows, int64_t cols, int mode, void* out,
                              int out_dtype) {
    if (rows <= 0 || cols <= 0) return;
    switch (out_dtype) {
        case kOutF32:
            dequant_int8_impl<ConvF32>(cb, scb, rows, cols, mode, static_cast<float*>(out));
            break;
        case kOutF16:
            dequant_int8_impl<ConvF16>(cb, scb, rows, cols, mode, static_cast<uint16_t*>(out));
            break;
        default:
            dequant_int8_impl<ConvBF16>(cb, scb, rows, cols, mode, static_cast<uint16_t*>(out));
            break;
    }
}

}  // namespace vk
