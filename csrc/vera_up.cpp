// vera_kernels: the up node as a C++ autograd Function (vera_kernels/ops/native_up.py loads it).
//
//   vera_up(base, h, B_s, lambda_d, lambda_b) -> base + h R^T,   R = diag(lambda_b) B_s diag(lambda_d)
//   vera_up_py_backward(...): the same forward, backward through a registered Python function (the triton backend)
//
// The very same math, aten ops and dtype rules as vera_kernels/ops/vera_torch.py: VeraUpFunction (its docstring
// has the derivation); tests/test_native_up.py checks that both give bit-identical results. Why C++: a small
// training step is bound by the host, and a Python autograd.Function costs a Python frame in forward and another in
// backward (the autograd engine calls back into Python), ~10 us per adapted layer on the development machine. Here
// the engine never leaves C++. Saved for backward, as there: h and references to B_s and the lambdas, never R.
//
// Light headers (no torch/extension.h) keep the one-off JIT build at ~20 s on a 2-core machine.
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/outer.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

Tensor as_dtype(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// R = diag(lambda_b) B_s diag(lambda_d): float32 products (whatever the lambdas' dtype), one rounding to dtype
Tensor fold(const Tensor& B_s, const Tensor& lambda_d, const Tensor& lambda_b, at::ScalarType dtype) {
    return as_dtype(at::outer(as_dtype(lambda_b, at::kFloat), as_dtype(lambda_d, at::kFloat)).mul_(B_s), dtype);
}

// forward of both up nodes: y = base + h R^T (R folded per call, never saved)
Tensor up_forward(AutogradContext* ctx, const Tensor& base, const Tensor& h, const Tensor& B_s,
                  const Tensor& lambda_d, const Tensor& lambda_b) {
    ctx->save_for_backward({h, B_s, lambda_d, lambda_b});
    const auto cd = h.scalar_type();
    Tensor R_t = fold(B_s, lambda_d, lambda_b, cd).t();
    if (base.scalar_type() == cd) return at::addmm(base, h, R_t);
    // a float32 branch on a low-precision base (the CPU rule): added in float32, one rounding to base's dtype
    return at::addmm(base.to(cd), h, R_t).to(base.scalar_type());
}

struct VeraUp : public torch::autograd::Function<VeraUp> {
    static Tensor forward(AutogradContext* ctx, const Tensor& base, const Tensor& h, const Tensor& B_s,
                          const Tensor& lambda_d, const Tensor& lambda_b) {
        return up_forward(ctx, base, h, B_s, lambda_d, lambda_b);
    }

    static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
        auto saved = ctx->get_saved_variables();
        const Tensor& h = saved[0];
        const Tensor& B_s = saved[1];
        const Tensor& lambda_d = saved[2];
        const Tensor& lambda_b = saved[3];
        const Tensor& g = grads[0];
        const bool need_base = ctx->needs_input_grad(0), need_h = ctx->needs_input_grad(1);
        const bool need_ld = ctx->needs_input_grad(3), need_lb = ctx->needs_input_grad(4);
        const auto cd = h.scalar_type();
        Tensor gc = as_dtype(g, cd);
        Tensor grad_h, grad_ld, grad_lb;
        if (need_h) grad_h = at::mm(gc, fold(B_s, lambda_d, lambda_b, cd));
        if (need_ld || need_lb) {
            Tensor GB = as_dtype(at::mm(gc.t(), h), at::kFloat).mul_(B_s);  // (out, r): G = g^T h, times B_s
            if (need_lb) grad_lb = as_dtype(at::mv(GB, as_dtype(lambda_d, at::kFloat)), lambda_b.scalar_type());
            if (need_ld) grad_ld = as_dtype(at::mv(GB.t(), as_dtype(lambda_b, at::kFloat)), lambda_d.scalar_type());
        }
        return {need_base ? g : Tensor(), grad_h, Tensor(), grad_ld, grad_lb};
    }
};

// The triton backend's up node (no fused base): VeraUp's forward; its backward calls the Python function given
// to set_up_backward (vera_triton._up_bwd_impl, whose Triton launches fuse the lambda reductions) as
//     grad_h, dlambda_d, dlambda_b = backward(g, h, B_s, lambda_d, lambda_b, need_lambdas)
// (the lambda gradients float32, empty when not asked). The engine enters Python for that call only, not for the
// node's bookkeeping (context, saved tensors, needs_input_grad, the gradient tuple) as it does for a Python
// autograd.Function: ~50 us less per layer call on the development machine (bench/host_overhead.py).
py::object* up_backward_fn = nullptr;  // set once; never freed (no Python object destroyed at exit without the GIL)

void set_up_backward(py::object fn) {
    if (up_backward_fn == nullptr) up_backward_fn = new py::object(std::move(fn));
    else *up_backward_fn = std::move(fn);
}

struct VeraUpPyBackward : public torch::autograd::Function<VeraUpPyBackward> {
    static Tensor forward(AutogradContext* ctx, const Tensor& base, const Tensor& h, const Tensor& B_s,
                          const Tensor& lambda_d, const Tensor& lambda_b) {
        TORCH_CHECK(up_backward_fn != nullptr, "vera_kernels: vera_up_py_backward needs set_up_backward first");
        return up_forward(ctx, base, h, B_s, lambda_d, lambda_b);
    }

    static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
        auto saved = ctx->get_saved_variables();
        const Tensor& lambda_d = saved[2];
        const Tensor& lambda_b = saved[3];
        const Tensor& g = grads[0];
        const bool need_base = ctx->needs_input_grad(0), need_h = ctx->needs_input_grad(1);
        const bool need_ld = ctx->needs_input_grad(3), need_lb = ctx->needs_input_grad(4);
        Tensor grad_h, grad_ld, grad_lb;
        if (need_h || need_ld || need_lb) {
            py::gil_scoped_acquire gil;  // the engine runs this without the GIL (on CUDA, on its device thread)
            try {
                py::tuple out = (*up_backward_fn)(g, saved[0], saved[1], lambda_d, lambda_b, need_ld || need_lb);
                TORCH_CHECK(out.size() == 3, "vera_kernels: the up node's backward must return 3 tensors");
                if (need_h) grad_h = out[0].cast<Tensor>();
                if (need_ld) grad_ld = as_dtype(out[1].cast<Tensor>(), lambda_d.scalar_type());
                if (need_lb) grad_lb = as_dtype(out[2].cast<Tensor>(), lambda_b.scalar_type());
            } catch (py::error_already_set& e) {
                // the Python error's text, as a C++ error the engine can carry to the caller's thread
                throw std::runtime_error(std::string("vera_kernels: the triton up node's backward failed: ") +
                                         e.what());
            }
        }
        return {need_base ? g : Tensor(), grad_h, Tensor(), grad_ld, grad_lb};
    }
};

Tensor vera_up(const Tensor& base, const Tensor& h, const Tensor& B_s, const Tensor& lambda_d,
               const Tensor& lambda_b) {
    return VeraUp::apply(base, h, B_s, lambda_d, lambda_b);
}

Tensor vera_up_py_backward(const Tensor& base, const Tensor& h, const Tensor& B_s, const Tensor& lambda_d,
                           const Tensor& lambda_b) {
    return VeraUpPyBackward::apply(base, h, B_s, lambda_d, lambda_b);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("vera_up", &vera_up, "base + h R^T with R = diag(lambda_b) B_s diag(lambda_d) (VeraUpFunction in C++)");
    m.def("vera_up_py_backward", &vera_up_py_backward,
          "vera_up's forward; backward through the Python function given to set_up_backward");
    m.def("set_up_backward", &set_up_backward, "the Python backward of vera_up_py_backward");
}
