// vera_kernels: torch binding of the dequantization kernels (torch.library ops in namespace vera_kernels_quant).
//
//   vera_kernels_quant::dequantize_4bit(Tensor packed, Tensor absmax, Tensor code, int blocksize, int[] shape,
//                                       ScalarType dtype) -> Tensor
//   vera_kernels_quant::dequantize_4bit_nested(Tensor packed, Tensor absmax_q, Tensor absmax2, Tensor code2,
//                                       int blocksize2, Tensor offset, Tensor code, int blocksize, int[] shape,
//                                       ScalarType dtype) -> Tensor
//   vera_kernels_quant::dequantize_int8_rowwise(Tensor CB, Tensor SCB, int mode, ScalarType dtype) -> Tensor
//   vera_kernels_quant::build_info() -> str
//
// This file validates the tensors (clear error messages, VK_CHECK) and calls the plain C++ CPU kernels
// (dequant_cpu.cpp) or the plain CUDA launchers (dequant_cuda.cu, only when compiled with -DWITH_CUDA).
// Only light torch headers are included (torch/library.h + ATen core, not torch/extension.h): this keeps the
// JIT build of the extension at a few seconds instead of ~20 s on a 2-core machine.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "vk_dequant.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "vk_dequant_cuda.h"
#endif

namespace {

// Error messages are built with std::string only (no iostreams): TORCH_CHECK with a single std::string
// argument passes it through, while several arguments are formatted with an ostringstream instantiated in this
// library -- which segfaulted on a machine whose runtime libstdc++ differed from the one compiled against.
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void vk_append(std::string& s, T x) {
    s += std::to_string(x);
}
inline void vk_append(std::string& s, const char* x) { s += x; }
inline void vk_append(std::string& s, const std::string& x) { s += x; }
inline void vk_append(std::string& s, at::ScalarType t) { s += c10::toString(t); }
inline void vk_append(std::string& s, const c10::Device& d) { s += d.str(); }
inline void vk_append(std::string& s, at::IntArrayRef shape) {
    s += "[";
    for (size_t i = 0; i < shape.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(shape[i]);
    }
    s += "]";
}
template <class... A>
std::string vk_str(const A&... a) {
    std::string s;
    (vk_append(s, a), ...);
    return s;
}

#define VK_CHECK(cond, ...) TORCH_CHECK(cond, vk_str(__VA_ARGS__))

int out_dtype_code(at::ScalarType t) {
    switch (t) {
        case at::kFloat:
            return vk::kOutF32;
        case at::kHalf:
            return vk::kOutF16;
        case at::kBFloat16:
            return vk::kOutBF16;
        default:
            VK_CHECK(false, "vera_kernels_quant: output dtype must be float32, float16 or bfloat16, got ", t);
    }
    return 0;
}

int64_t numel_of(at::IntArrayRef shape) {
    int64_t n = 1;
    for (auto d : shape) {
        VK_CHECK(d >= 0, "vera_kernels_quant: negative dimension in shape ", shape);
        n *= d;
    }
    return n;
}

void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
    VK_CHECK(t.device() == ref.device(), op, ": '", name, "' is on ", t.device(), " but 'packed' is on ",
                ref.device());
}

at::Tensor as_f32(const at::Tensor& t, const char* op, const char* name) {
    VK_CHECK(at::isFloatingType(t.scalar_type()), op, ": '", name, "' must be a floating tensor, got ",
                t.scalar_type());
    return t.to(at::kFloat).contiguous();
}

struct Prep4 {
    at::Tensor packed, code, absmax, qabsmax, absmax2, code2, offset;
    int64_t n = 0, nblocks = 0, blocksize = 0, blocksize2 = 0;
    int out_code = 0;
};

Prep4 prepare_4bit(const char* op, const at::Tensor& packed, const at::Tensor& code, int64_t blocksize,
                   at::IntArrayRef shape, at::ScalarType dtype) {
    Prep4 p;
    VK_CHECK(packed.scalar_type() == at::kByte, op,
                ": 'packed' must be uint8 (view other quant_storage dtypes as uint8 first), got ",
                packed.scalar_type());
    VK_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
    p.out_code = out_dtype_code(dtype);
    p.n = numel_of(shape);
    p.blocksize = blocksize;
    p.nblocks = (p.n + blocksize - 1) / blocksize;
    const int64_t need = (p.n + 1) / 2;
    VK_CHECK(packed.numel() >= need, op, ": 'packed' holds ", packed.numel(), " bytes but shape ", shape,
                " (", p.n, " elements) needs ", need);
    check_same_device(packed, code, op, "code");
    VK_CHECK(code.numel() == 16, op, ": 'code' must have 16 entries (the 4-bit code table), got ", code.numel());
    p.packed = packed.contiguous();
    p.code = as_f32(code, op, "code");
    return p;
}

void check_absmax(const char* op, const Prep4& p, const at::Tensor& absmax) {
    VK_CHECK(absmax.numel() >= p.nblocks, op, ": 'absmax' has ", absmax.numel(), " entries, ", p.nblocks,
                " blocks of ", p.blocksize, " elements need one each");
}

void prepare_nested(const char* op, Prep4& p, const at::Tensor& absmax_q, const at::Tensor& absmax2,
                    const at::Tensor& code2, int64_t blocksize2, const at::Tensor& offset) {
    check_same_device(p.packed, absmax_q, op, "absmax_q");
    check_same_device(p.packed, absmax2, op, "absmax2");
    check_same_device(p.packed, code2, op, "code2");
    check_same_device(p.packed, offset, op, "offset");
    VK_CHECK(absmax_q.scalar_type() == at::kByte, op, ": 'absmax_q' (nested absmax codes) must be uint8, got ",
                absmax_q.scalar_type());
    check_absmax(op, p, absmax_q);
    VK_CHECK(blocksize2 > 0, op, ": blocksize2 (nested blocksize) must be positive, got ", blocksize2);
    const int64_t nb2 = (p.nblocks + blocksize2 - 1) / blocksize2;
    VK_CHECK(absmax2.numel() >= nb2, op, ": 'absmax2' has ", absmax2.numel(), " entries, needs ", nb2);
    VK_CHECK(code2.numel() == 256, op, ": 'code2' (nested code table) must have 256 entries, got ",
                code2.numel());
    VK_CHECK(offset.numel() == 1 && offset.scalar_type() == at::kFloat, op,
                ": 'offset' must be a single float32 value, got ", offset.numel(), " elements of ",
                offset.scalar_type());
    p.qabsmax = absmax_q.contiguous();
    p.absmax2 = as_f32(absmax2, op, "absmax2");
    p.code2 = as_f32(code2, op, "code2");
    p.offset = offset.contiguous();
    p.blocksize2 = blocksize2;
}

at::Tensor empty_out(const at::Tensor& like, at::IntArrayRef shape, at::ScalarType dtype) {
    return at::empty(shape, like.options().dtype(dtype));
}

// ------------------------------------------------------------------------------------------------ CPU
at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
    const char* op = "vera_kernels_quant::dequantize_4bit";
    Prep4 p = prepare_4bit(op, packed, code, blocksize, shape, dtype);
    check_same_device(packed, absmax, op, "absmax");
    check_absmax(op, p, absmax);
    p.absmax = as_f32(absmax, op, "absmax");
    at::Tensor out = empty_out(packed, shape, dtype);
    vk::dequant_4bit_cpu(p.packed.data_ptr<uint8_t>(), p.n, p.blocksize, p.code.data_ptr<float>(),
                         p.absmax.data_ptr<float>(), nullptr, out.data_ptr(), p.out_code);
    return out;
}

at::Tensor dequantize_4bit_nested_cpu(const at::Tensor& packed, const at::Tensor& absmax_q, const at::Tensor& absmax2,
                                      const at::Tensor& code2, int64_t blocksize2, const at::Tensor& offset,
                                      const at::Tensor& code, int64_t blocksize, at::IntArrayRef shape,
                                      at::ScalarType dtype) {
    const char* op = "vera_kernels_quant::dequantize_4bit_nested";
    Prep4 p = prepare_4bit(op, packed, code, blocksize, shape, dtype);
    prepare_nested(op, p, absmax_q, absmax2, code2, blocksize2, offset);
    at::Tensor out = empty_out(packed, shape, dtype);
    vk::NestedAbsmax nst{p.qabsmax.data_ptr<uint8_t>(), p.absmax2.data_ptr<float>(), p.code2.data_ptr<float>(),
                         p.blocksize2, *p.offset.data_ptr<float>()};
    vk::dequant_4bit_cpu(p.packed.data_ptr<uint8_t>(), p.n, p.blocksize, p.code.data_ptr<float>(), nullptr, &nst,
                         out.data_ptr(), p.out_code);
    return out;
}

struct PrepInt8 {
    at::Tensor cb, scb;
    int64_t rows = 0, cols = 0;
    int out_code = 0;
};

PrepInt8 prepare_int8(const at::Tensor& CB, const at::Tensor& SCB, int64_t mode, at::ScalarType dtype) {
    const char* op = "vera_kernels_quant::dequantize_int8_rowwise";
    PrepInt8 p;
    VK_CHECK(CB.scalar_type() == at::kChar, op, ": 'CB' must be int8, got ", CB.scalar_type());
    VK_CHECK(CB.dim() >= 1, op, ": 'CB' must have at least one dimension");
    VK_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (int8_vectorwise_dequant) or 1 (MatMul8bitFp), got ",
                mode);
    VK_CHECK(SCB.device() == CB.device(), op, ": 'SCB' is on ", SCB.device(), " but 'CB' is on ", CB.device());
    p.out_code = out_dtype_code(dtype);
    p.cols = CB.size(-1);
    p.rows = 1;
    for (int64_t i = 0; i + 1 < CB.dim(); ++i) p.rows *= CB.size(i);
    VK_CHECK(SCB.numel() == p.rows, op, ": 'SCB' must have one scale per row of CB (", p.rows, "), got ",
                SCB.numel());
    p.cb = CB.contiguous();
    p.scb = as_f32(SCB, op, "SCB");
    return p;
}

at::Tensor dequantize_int8_rowwise_cpu(const at::Tensor& CB, const at::Tensor& SCB, int64_t mode,
                                       at::ScalarType dtype) {
    PrepInt8 p = prepare_int8(CB, SCB, mode, dtype);
    at::Tensor out = at::empty(CB.sizes(), CB.options().dtype(dtype));
    vk::dequant_int8_rowwise_cpu(p.cb.data_ptr<int8_t>(), p.scb.data_ptr<float>(), p.rows, p.cols,
                                 static_cast<int>(mode), out.data_ptr(), p.out_code);
    return out;
}

// ------------------------------------------------------------------------------------------------ CUDA
#ifdef WITH_CUDA
void check_launch(int err, const char* op) {
    VK_CHECK(err == static_cast<int>(cudaSuccess), op, ": CUDA kernel launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void check_even_blocksize(const char* op, int64_t blocksize) {
    VK_CHECK(blocksize % 2 == 0, op, ": the CUDA kernel needs an even blocksize, got ", blocksize);
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
    const char* op = "vera_kernels_quant::dequantize_4bit";
    c10::cuda::CUDAGuard guard(packed.device());
    Prep4 p = prepare_4bit(op, packed, code, blocksize, shape, dtype);
    check_even_blocksize(op, blocksize);
    check_same_device(packed, absmax, op, "absmax");
    check_absmax(op, p, absmax);
    p.absmax = as_f32(absmax, op, "absmax");
    at::Tensor out = empty_out(packed, shape, dtype);
    if (p.n == 0) return out;
    const int err = vk_dequant_4bit_cuda(p.packed.data_ptr<uint8_t>(), p.n, p.blocksize, p.code.data_ptr<float>(),
                                         p.absmax.data_ptr<float>(), out.data_ptr(), p.out_code,
                                         c10::cuda::getCurrentCUDAStream().stream());
    check_launch(err, op);
    return out;
}

at::Tensor dequantize_4bit_nested_cuda(const at::Tensor& packed, const at::Tensor& absmax_q,
                                       const at::Tensor& absmax2, const at::Tensor& code2, int64_t blocksize2,
                                       const at::Tensor& offset, const at::Tensor& code, int64_t blocksize,
                                       at::IntArrayRef shape, at::ScalarType dtype) {
    const char* op = "vera_kernels_quant::dequantize_4bit_nested";
    c10::cuda::CUDAGuard guard(packed.device());
    Prep4 p = prepare_4bit(op, packed, code, blocksize, shape, dtype);
    check_even_blocksize(op, blocksize);
    prepare_nested(op, p, absmax_q, absmax2, code2, blocksize2, offset);
    at::Tensor out = empty_out(packed, shape, dtype);
    if (p.n == 0) return out;
    const int err = vk_dequant_4bit_nested_cuda(
        p.packed.data_ptr<uint8_t>(), p.n, p.blocksize, p.code.data_ptr<float>(), p.qabsmax.data_ptr<uint8_t>(),
        p.absmax2.data_ptr<float>(), p.code2.data_ptr<float>(), p.blocksize2, p.offset.data_ptr<float>(),
        out.data_ptr(), p.out_code, c10::cuda::getCurrentCUDAStream().stream());
    check_launch(err, op);
    return out;
}

at::Tensor dequantize_int8_rowwise_cuda(const at::Tensor& CB, const at::Tensor& SCB, int64_t mode,
                                        at::ScalarType dtype) {
    const char* op = "vera_kernels_quant::dequantize_int8_rowwise";
    c10::cuda::CUDAGuard guard(CB.device());
    PrepInt8 p = prepare_int8(CB, SCB, mode, dtype);
    at::Tensor out = at::empty(CB.sizes(), CB.options().dtype(dtype));
    if (p.rows == 0 || p.cols == 0) return out;
    const int err = vk_dequant_int8_rowwise_cuda(p.cb.data_ptr<int8_t>(), p.scb.data_ptr<float>(), p.rows, p.cols,
                                                 static_cast<int>(mode), out.data_ptr(), p.out_code,
                                                 c10::cuda::getCurrentCUDAStream().stream());
    check_launch(err, op);
    return out;
}
#endif

// No iostreams here: plain string concatenation (an ostringstream in this function crashed on a machine whose
// libstdc++ differed from the one the extension was compiled against).
std::string build_info() {
    std::string s = "cpu(openmp threads=" + std::to_string(vk::omp_threads()) + ")";
#ifdef WITH_CUDA
    s += "+cuda";
#endif
    return s;
}

}  // namespace

TORCH_LIBRARY(vera_kernels_quant, m) {
    m.def(
        "dequantize_4bit(Tensor packed, Tensor absmax, Tensor code, int blocksize, int[] shape, "
        "ScalarType dtype) -> Tensor");
    m.def(
        "dequantize_4bit_nested(Tensor packed, Tensor absmax_q, Tensor absmax2, Tensor code2, int blocksize2, "
        "Tensor offset, Tensor code, int blocksize, int[] shape, ScalarType dtype) -> Tensor");
    m.def("dequantize_int8_rowwise(Tensor CB, Tensor SCB, int mode, ScalarType dtype) -> Tensor");
    m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(vera_kernels_quant, CPU, m) {
    m.impl("dequantize_4bit", &dequantize_4bit_cpu);
    m.impl("dequantize_4bit_nested", &dequantize_4bit_nested_cpu);
    m.impl("dequantize_int8_rowwise", &dequantize_int8_rowwise_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(vera_kernels_quant, CUDA, m) {
    m.impl("dequantize_4bit", &dequantize_4bit_cuda);
    m.impl("dequantize_4bit_nested", &dequantize_4bit_nested_cuda);
    m.impl("dequantize_int8_rowwise", &dequantize_int8_rowwise_cuda);
}
#endif

// Python module entry point, so that the prebuilt extension imports as `vera_kernels._C` (and the JIT one under
// its own name). Importing it is all that is needed: the ops register themselves when the library is loaded.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define VK_CONCAT_(a, b) a##b
#define VK_CONCAT(a, b) VK_CONCAT_(a, b)
#define VK_STR_(a) #a
#define VK_STR(a) VK_STR_(a)

extern "C" PyMODINIT_FUNC VK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, VK_STR(TORCH_EXTENSION_NAME),
                                     "vera_kernels native dequantization ops (torch.ops.vera_kernels_quant)", -1,
                                     nullptr, nullptr, nullptr, nullptr, nullptr};
    return PyModule_Create(&def);
}
