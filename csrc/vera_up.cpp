// vera_kernels: the up node as a C++ autograd Function (vera_kernels/ops/native_up.py loads it).
//
//   vera_up(base, h, B_s, lambda_d, lambda_b) -> base + h R^T,   R = diag(lambda_b) B_s diag(lambda_d)
//   vera_up_py_backward(...): the same forward, backward through a registered Python function (the triton backend)
//   vera_down_py(x, A_s, seed, p): the triton backend's dropout down node, through registered Python functions
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

// which of (base, h, B_s, lambda_d, lambda_b) an up node's backward must give a gradient for
struct UpNeeds {
    bool base, h, ld, lb;
    explicit UpNeeds(AutogradContext* ctx)
        : base(ctx->needs_input_grad(0)), h(ctx->needs_input_grad(1)), ld(ctx->needs_input_grad(3)),
          lb(ctx->needs_input_grad(4)) {}
};

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
        const UpNeeds need(ctx);
        const auto cd = h.scalar_type();
        Tensor gc = as_dtype(g, cd);
        Tensor grad_h, grad_ld, grad_lb;
        if (need.h) grad_h = at::mm(gc, fold(B_s, lambda_d, lambda_b, cd));
        if (need.ld || need.lb) {
            Tensor GB = as_dtype(at::mm(gc.t(), h), at::kFloat).mul_(B_s);  // (out, r): G = g^T h, times B_s
            if (need.lb) grad_lb = as_dtype(at::mv(GB, as_dtype(lambda_d, at::kFloat)), lambda_b.scalar_type());
            if (need.ld) grad_ld = as_dtype(at::mv(GB.t(), as_dtype(lambda_b, at::kFloat)), lambda_d.scalar_type());
        }
        return {need.base ? g : Tensor(), grad_h, Tensor(), grad_ld, grad_lb};
    }
};

// The triton backend's nodes whose kernels Triton launches from Python, registered once with set_triton_functions:
//   up_backward(g, h, B_s, lambda_d, lambda_b, G, Bl, dlb, grad_h) -> partials of dlambda_d     (vera_up_py_backward)
//       (launches into the outputs allocated here; G = g^T h computed here, G and dlb None without lambda gradients)
//   down_forward(x, A_s, seed, p) -> h,   down_backward(grad_h, A_s, seed, p) -> grad_x          (vera_down_py)
// (vera_triton's _up_bwd_into, _down_fwd_impl, _down_bwd_impl). The engine enters Python for those calls only, not
// for the nodes' bookkeeping (context, saved tensors, needs_input_grad, the gradient tuple) as it does for a Python
// autograd.Function: ~50 us less per node on the development machine (bench/host_overhead.py).
py::object* up_backward_fn = nullptr;  // set once; never freed (no Python object destroyed at exit without the GIL)
py::object* down_forward_fn = nullptr;
py::object* down_backward_fn = nullptr;

void set_slot(py::object*& slot, py::object fn) {
    if (slot == nullptr) slot = new py::object(std::move(fn));
    else *slot = std::move(fn);
}

void set_triton_functions(py::object up_backward, py::object down_forward, py::object down_backward) {
    set_slot(up_backward_fn, std::move(up_backward));
    set_slot(down_forward_fn, std::move(down_forward));
    set_slot(down_backward_fn, std::move(down_backward));
}

[[noreturn]] void rethrow(const char* what, py::error_already_set& e) {
    // the Python error's text, as a C++ error the engine can carry to the caller's thread
    throw std::runtime_error(std::string("vera_kernels: the triton ") + what + " failed: " + e.what());
}

struct VeraUpPyBackward : public torch::autograd::Function<VeraUpPyBackward> {
    static Tensor forward(AutogradContext* ctx, const Tensor& base, const Tensor& h, const Tensor& B_s,
                          const Tensor& lambda_d, const Tensor& lambda_b) {
        TORCH_CHECK(up_backward_fn != nullptr, "vera_kernels: vera_up_py_backward needs set_triton_functions first");
        return up_forward(ctx, base, h, B_s, lambda_d, lambda_b);
    }

    static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
        auto saved = ctx->get_saved_variables();
        const Tensor& h = saved[0];
        const Tensor& B_s = saved[1];
        const Tensor& lambda_d = saved[2];
        const Tensor& lambda_b = saved[3];
        const Tensor& g = grads[0];
        const UpNeeds need(ctx);
        Tensor grad_h, grad_ld, grad_lb;
        if (need.h || need.ld || need.lb) {
            // here: G = g^T h, the outputs and the partials' sum; in Python: the two Triton launches only
            const bool lambdas = need.ld || need.lb;
            const int64_t n_out = B_s.size(0), r = B_s.size(1);
            Tensor G = lambdas ? at::mm(g.t(), h) : Tensor();
            Tensor Bl = at::empty({n_out, r}, g.options());
            Tensor dlb = lambdas ? at::empty({n_out}, g.options().dtype(at::kFloat)) : Tensor();
            Tensor gh = at::empty({g.size(0), r}, g.options());
            Tensor part;
            {
                py::gil_scoped_acquire gil;  // the engine runs this without the GIL (on CUDA, on its device thread)
                try {
                    py::object out = (*up_backward_fn)(g, h, B_s, lambda_d.contiguous(), lambda_b.contiguous(),
                                                       lambdas ? py::cast(G) : py::none(), Bl,
                                                       lambdas ? py::cast(dlb) : py::none(), gh);
                    if (lambdas) part = out.cast<Tensor>();
                } catch (py::error_already_set& e) {
                    rethrow("up node's backward", e);
                }
            }
            if (need.h) grad_h = gh;
            if (need.ld) grad_ld = as_dtype(part.sum(0), lambda_d.scalar_type());
            if (need.lb) grad_lb = as_dtype(dlb, lambda_b.scalar_type());
        }
        return {need.base ? g : Tensor(), grad_h, Tensor(), grad_ld, grad_lb};
    }
};

// h = dropout(x) A_s^T with the mask drawn inside the down kernel (vera_triton.VeraDownTritonFunction in C++).
struct VeraDownPy : public torch::autograd::Function<VeraDownPy> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& A_s, const Tensor& seed, double p) {
        TORCH_CHECK(down_forward_fn != nullptr, "vera_kernels: vera_down_py needs set_triton_functions first");
        ctx->save_for_backward({A_s, seed});
        ctx->saved_data["p"] = p;
        py::gil_scoped_acquire gil;  // (held already when called from Python: a no-op)
        try {
            return (*down_forward_fn)(x, A_s, seed, p).cast<Tensor>();
        } catch (py::error_already_set& e) {
            rethrow("down node's forward", e);
        }
    }

    static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
        if (!ctx->needs_input_grad(0)) return {Tensor(), Tensor(), Tensor(), Tensor()};
        auto saved = ctx->get_saved_variables();
        const double p = ctx->saved_data["p"].toDouble();
        Tensor grad_x;
        {
            py::gil_scoped_acquire gil;
            try {
                grad_x = (*down_backward_fn)(grads[0], saved[0], saved[1], p).cast<Tensor>();
            } catch (py::error_already_set& e) {
                rethrow("down node's backward", e);
            }
        }
        return {grad_x, Tensor(), Tensor(), Tensor()};
    }
};

Tensor vera_up(const Tensor& base, const Tensor& h, const Tensor& B_s, const Tensor& lambda_d,
               const Tensor& lambda_b) {
    return VeraUp::apply(base, h, B_s, lambda_d, lambda_b);
}

Tensor vera_down_py(const Tensor& x, const Tensor& A_s, const Tensor& seed, double p) {
    return VeraDownPy::apply(x, A_s, seed, p);
}

Tensor vera_up_py_backward(const Tensor& base, const Tensor& h, const Tensor& B_s, const Tensor& lambda_d,
                           const Tensor& lambda_b) {
    return VeraUpPyBackward::apply(base, h, B_s, lambda_d, lambda_b);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("vera_up", &vera_up, "base + h R^T with R = diag(lambda_b) B_s diag(lambda_d) (VeraUpFunction in C++)");
    m.def("vera_up_py_backward", &vera_up_py_backward,
          "vera_up's forward; backward through the up_backward given to set_triton_functions");
    m.def("vera_down_py", &vera_down_py,
          "h = dropout(x) A_s^T through the down_forward / down_backward given to set_triton_functions");
    m.def("set_triton_functions", &set_triton_functions,
          "the Python functions of vera_up_py_backward and vera_down_py (up_backward, down_forward, down_backward)");
}
