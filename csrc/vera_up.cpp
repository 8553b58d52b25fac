// vera_kernels: the up node as a C++ autograd Function (vera_kernels/ops/native_up.py loads it).
//
//   vera_up(base, h, B_s, lambda_d, lambda_b) -> base + h R^T,   R = diag(lambda_b) B_s diag(lambda_d)
//   vera_up_py_backward(...): the same forward, backward through a registered Python function (the triton backend)
//   vera_down_py(x, A_s, seed, p): the triton backend's dropout down node, through registered Python functions
//   vera_down(x, A_s, seed, p): h = dropout(x) A_s^T, the torch backend's down node (VeraDownFunction in C++)
//   dropout_apply(t, seed, p, inplace): the torch backend's seeded dropout of a (rows, cols) tensor
//
// The very same math, aten ops and dtype rules as vera_kernels/ops/vera_torch.py: VeraUpFunction (its docstring
// has the derivation); tests/test_native_up.py checks that both give bit-identical results. Why C++: a small
// training step is bound by the host, and a Python autograd.Function costs a Python frame in forward and another in
// backward (the autograd engine calls back into Python), ~10 us per adapted layer on the development machine. Here
// the engine never leaves C++. Saved for backward, as there: h and references to B_s and the lambdas, never R.
//
// Light headers (no torch/extension.h) keep the one-off JIT build at ~20 s on a 2-core machine.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ScalarOps.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/outer.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

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
//   up_backward(g, h, B_s, lambda_d, lambda_b, G, Bl, dlb, grad_h) -> (partials of dlambda_d, LaunchReplay or None)
//       (launches into the outputs allocated here; G = g^T h computed here, G and dlb None without lambda gradients;
//       the replay, kept here by signature, relaunches the same plan next time without it: see LaunchReplay)
//   down_forward(x, A_s, seed, p) -> (h, LaunchReplay or None),
//   down_backward(grad_h, A_s, seed, p) -> (grad_x, LaunchReplay or None)                         (vera_down_py)
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

// ---------------------------------------------------------------------------------------------- launch replays
// A launch plan of vera_triton (_LaunchPlan: Triton launches bound to slots, triton_launch.BoundLaunch) replayed from
// here, so that a backward at a signature seen before enters Python for the launch guard alone, not for the key, the
// plan, the slot checks and the launcher calls (Python that runs cold inside the engine: 2-3x its cost in a loop).
// The same steps as BoundLaunch.__call__: every used slot's dtype and 16-byte alignment against the bound ones, then
// the guard (triton_launch.launch_guard: the switch, the device, no hook or instrumentation, the same launcher,
// unchanged globals; it returns the stream), then each launcher with the arguments the bound call passes. Any
// difference returns false and the caller takes the Python path, which falls back further on its own.
struct ReplayLaunch {
    py::object kernel, launcher;  // the CompiledKernel and its launcher as bound (the guard checks it is still)
    py::object g0, g1, g2;
    std::vector<py::object> args;                          // the bound arguments; tensor places refilled per call
    std::vector<std::pair<size_t, size_t>> positions;      // (argument index, slot index)
    std::vector<std::tuple<size_t, at::ScalarType, bool>> specs;  // (slot, dtype, 16-byte aligned) of used slots
    std::vector<py::object> kw_values;
};

struct LaunchReplay {
    py::object guard;  // () -> the stream to launch on, or None: take the Python path
    std::vector<ReplayLaunch> launches;
    std::vector<std::vector<int64_t>> out_shapes;  // the outputs the plan allocates (appended to the slots)
    std::vector<at::ScalarType> out_dtypes;
    std::vector<bool> out_none;  // an output the plan leaves None (an undefined tensor here)
    int64_t runs = 0;

    LaunchReplay(py::object guard_fn, const py::list& launch_specs, const py::list& outputs) : guard(std::move(guard_fn)) {
        // launch_specs: (kernel, launcher, (g0, g1, g2), args, ((arg, slot), ...), ((slot, dtype, aligned), ...),
        // kw_values) per launch (BoundLaunch.native_spec); outputs: ((shape, dtype) or None, ...)
        for (const py::handle item : launch_specs) {
            const auto spec = item.cast<py::tuple>();
            ReplayLaunch l;
            l.kernel = spec[0].cast<py::object>();
            l.launcher = spec[1].cast<py::object>();
            const auto grid = spec[2].cast<py::tuple>();
            l.g0 = grid[0].cast<py::object>();
            l.g1 = grid[1].cast<py::object>();
            l.g2 = grid[2].cast<py::object>();
            for (const py::handle a : spec[3].cast<py::tuple>()) l.args.push_back(py::reinterpret_borrow<py::object>(a));
            for (const py::handle pos : spec[4].cast<py::tuple>()) {
                const auto ij = pos.cast<py::tuple>();
                l.positions.emplace_back(ij[0].cast<size_t>(), ij[1].cast<size_t>());
            }
            for (const py::handle sp : spec[5].cast<py::tuple>()) {
                const auto t = sp.cast<py::tuple>();
                l.specs.emplace_back(t[0].cast<size_t>(), t[1].cast<at::ScalarType>(), t[2].cast<bool>());
            }
            for (const py::handle v : spec[6].cast<py::tuple>()) l.kw_values.push_back(py::reinterpret_borrow<py::object>(v));
            launches.push_back(std::move(l));
        }
        for (const py::handle item : outputs) {
            out_none.push_back(item.is_none());
            if (item.is_none()) {
                out_shapes.emplace_back();
                out_dtypes.push_back(at::kFloat);
                continue;
            }
            const auto o = item.cast<py::tuple>();
            out_shapes.push_back(o[0].cast<std::vector<int64_t>>());
            out_dtypes.push_back(o[1].cast<at::ScalarType>());
        }
    }

    // Launches with ``slots`` (inputs, undefined = None) and the outputs it allocates (returned in ``outputs``), or
    // returns false having launched nothing. Needs the GIL.
    bool run(std::vector<Tensor> slots, std::vector<Tensor>& outputs) {
        const auto options = slots[0].options();
        for (size_t i = 0; i < out_shapes.size(); ++i) {
            outputs.push_back(out_none[i] ? Tensor() : at::empty(out_shapes[i], options.dtype(out_dtypes[i])));
            slots.push_back(outputs.back());
        }
        for (const auto& l : launches) {
            for (const auto& [j, dtype, aligned] : l.specs) {
                if (j >= slots.size() || !slots[j].defined() || slots[j].scalar_type() != dtype || !slots[j].has_storage())
                    return false;
                if ((reinterpret_cast<uintptr_t>(slots[j].const_data_ptr()) % 16 == 0) != aligned) return false;
            }
        }
        py::object stream = guard();
        if (stream.is_none()) return false;
        py::object none = py::none();
        for (const auto& l : launches) {
            const size_t n_args = l.args.size();
            py::tuple call(9 + n_args + l.kw_values.size());
            size_t k = 0;
            auto put = [&call, &k](py::object v) { PyTuple_SET_ITEM(call.ptr(), k++, v.release().ptr()); };
            put(l.g0);
            put(l.g1);
            put(l.g2);
            put(stream);
            // read per call, as BoundLaunch does (set by the kernel's handle loading, which the guard's check of
            // its launcher has run)
            put(l.kernel.attr("function"));
            put(l.kernel.attr("packed_metadata"));
            put(none);  // launch metadata and the enter/exit hooks: none is registered (the guard checked)
            put(none);
            put(none);
            std::vector<py::object> args = l.args;
            for (const auto& [i, j] : l.positions) args[i] = py::cast(slots[j]);
            for (auto& a : args) put(std::move(a));
            for (const auto& v : l.kw_values) put(v);
            PyObject* result = PyObject_Call(l.launcher.ptr(), call.ptr(), nullptr);
            if (result == nullptr) throw py::error_already_set();
            Py_DECREF(result);
        }
        ++runs;
        return true;
    }
};

// The replays kept by signature (each caller its own map, all under the GIL); never freed at exit (their Python
// objects need the GIL), emptied by clear_replays (triton_launch.clear) and when they would grow past the limit.
constexpr size_t REPLAY_LIMIT = 256;
using ReplayKey = std::vector<int64_t>;

// One call site's replays by signature, and how many of its calls took the Python path.
struct ReplaySite {
    std::map<ReplayKey, std::shared_ptr<LaunchReplay>> replays;
    int64_t python = 0;
};
ReplaySite* up_backward_site = new ReplaySite();
ReplaySite* down_forward_site = new ReplaySite();
ReplaySite* down_backward_site = new ReplaySite();

// the parts of the Python plan keys (vera_triton: _up_bwd_planned, _down_fwd_planned, _down_bwd_planned): each
// tensor's shape and strides, then the first tensor's dtype and device and the float32 matmul precision
void key_tensor(ReplayKey& key, const Tensor& t) {
    key.push_back(t.dim());
    for (const int64_t v : t.sizes()) key.push_back(v);
    for (const int64_t v : t.strides()) key.push_back(v);
}

void key_tail(ReplayKey& key, const Tensor& t) {
    key.push_back(static_cast<int64_t>(t.scalar_type()));
    key.push_back(static_cast<int64_t>(t.device().type()));
    key.push_back(t.device().index());
    key.push_back(t.scalar_type() == at::kFloat ? static_cast<int64_t>(at::globalContext().float32MatmulPrecision())
                                                 : -1);
}

int64_t key_double(double v) {
    int64_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    return bits;
}

// a registered function's (output, replay) result; anything else is an error (never iterated into a tuple)
py::tuple result_pair(py::object out) {
    if (!py::isinstance<py::tuple>(out) || py::len(out) != 2)
        throw std::runtime_error("vera_kernels: a triton node's Python function must return (output, replay)");
    return py::reinterpret_borrow<py::tuple>(out);
}

// The site's replay for ``key`` with ``slots`` (its one output), else ``python()`` -> (output or None, LaunchReplay
// or None), whose replay is kept for the key. Needs the GIL.
template <typename Python>
Tensor run_site(ReplaySite& site, const ReplayKey& key, std::vector<Tensor> slots, Python python) {
    static_assert(std::is_same_v<decltype(python()), py::object>, "python() returns the function's result");
    auto it = site.replays.find(key);
    if (it != site.replays.end()) {
        std::vector<Tensor> outs;
        if (it->second->run(std::move(slots), outs)) return outs.at(0);
    }
    ++site.python;
    py::tuple out = result_pair(python());
    if (!out[1].is_none()) {
        if (site.replays.size() >= REPLAY_LIMIT) site.replays.clear();
        site.replays[key] = out[1].cast<std::shared_ptr<LaunchReplay>>();
    }
    return out[0].is_none() ? Tensor() : out[0].cast<Tensor>();
}

void clear_replays() {
    for (ReplaySite* site : {up_backward_site, down_forward_site, down_backward_site}) site->replays.clear();
}

py::dict replay_stats() {
    py::dict d;
    const std::pair<const char*, ReplaySite*> sites[] = {
        {"up_backward", up_backward_site}, {"down_forward", down_forward_site}, {"down_backward", down_backward_site}};
    for (const auto& [name, site] : sites) {
        int64_t runs = 0;
        for (const auto& kv : site->replays) runs += kv.second->runs;
        d[py::str(std::string(name) + "_replays")] = site->replays.size();
        d[py::str(std::string(name) + "_replayed")] = runs;
        d[py::str(std::string(name) + "_python")] = site->python;
    }
    return d;
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
        const Tensor& g = grads[0];
        const UpNeeds need(ctx);
        Tensor grad_h, grad_ld, grad_lb;
        if (need.h || need.ld || need.lb) {
            // here: G = g^T h, the outputs, the partials' sum and the replay of a known signature's launches; in
            // Python (a new signature, or anything a replay does not accept): _up_bwd_into's launches
            const bool lambdas = need.ld || need.lb;
            const Tensor lambda_d = saved[2].contiguous(), lambda_b = saved[3].contiguous();
            const int64_t n_out = B_s.size(0), r = B_s.size(1);
            Tensor G = lambdas ? at::mm(g.t(), h) : Tensor();
            Tensor Bl = at::empty({n_out, r}, g.options());
            Tensor dlb = lambdas ? at::empty({n_out}, g.options().dtype(at::kFloat)) : Tensor();
            Tensor gh = at::empty({g.size(0), r}, g.options());
            Tensor part;
            {
                py::gil_scoped_acquire gil;  // the engine runs this without the GIL (on CUDA, on its device thread)
                try {
                    ReplayKey key;
                    for (const Tensor* t : {&g, &h, &B_s}) key_tensor(key, *t);
                    key.push_back(lambdas);
                    key_tail(key, g);
                    part = run_site(*up_backward_site, key, {g, h, B_s, lambda_d, lambda_b, G, Bl, dlb, gh}, [&] {
                        return (*up_backward_fn)(g, h, B_s, lambda_d, lambda_b, lambdas ? py::cast(G) : py::none(),
                                                 Bl, lambdas ? py::cast(dlb) : py::none(), gh);
                    });
                } catch (py::error_already_set& e) {
                    rethrow("up node's backward", e);
                }
            }
            if (need.h) grad_h = gh;
            if (need.ld) grad_ld = as_dtype(part.sum(0), saved[2].scalar_type());
            if (need.lb) grad_lb = as_dtype(dlb, saved[3].scalar_type());
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
            const Tensor w_kn = as_dtype(A_s, x.scalar_type()).t();  // as _down_fwd_planned makes it
            ReplayKey key;
            key_tensor(key, x);
            key_tensor(key, w_kn);
            key.push_back(key_double(p));
            key_tail(key, x);
            return run_site(*down_forward_site, key, {x, w_kn, seed},
                            [&] { return (*down_forward_fn)(x, A_s, seed, p); });
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
                const Tensor& grad_h = grads[0];
                const Tensor A = as_dtype(saved[0], grad_h.scalar_type());  // as _down_bwd_planned makes it
                ReplayKey key;
                key_tensor(key, grad_h);
                key_tensor(key, A);
                key.push_back(key_double(p));
                key_tail(key, grad_h);
                grad_x = run_site(*down_backward_site, key, {grad_h, A, saved[1]},
                                  [&] { return (*down_backward_fn)(grad_h, saved[0], saved[1], p); });
            } catch (py::error_already_set& e) {
                rethrow("down node's backward", e);
            }
        }
        return {grad_x, Tensor(), Tensor(), Tensor()};
    }
};

// ---------------------------------------------------------------------------------------------- the torch backend's dropout
// The keep-mask of vera_torch.dropout_keep_mask (its docstring defines it): element (i, j) of a (rows, cols) input is
// kept when mix31(r_i ^ c_j) >= int(p * 2^31), with r_i = mix31(mix31((i + seed_lo) & M) ^ seed_hi) and
// c_j = (j * phi) & M, M = 2^31 - 1. The Python one computes it in int64 tensors, where no product reaches 2^63. Here
// the per-element part runs in uint32: for v < 2^31, (v * K) mod 2^32 keeps the low 31 bits of v * K, so
// (v * K) & M is the same value, and everything else is shifts and xors of values below 2^31. On the CPU the mask is
// never materialised: one pass reads t and writes dropout(t) (the Python one makes ~12 int64 passes over (rows x
// cols), each a fresh allocation: 100 ms against ~10 ms here at 2048 x 2048 on the development machine). On other
// devices the same integers come from aten ops (the Python function's, in C++).
constexpr int64_t kM31 = 0x7FFFFFFF;

inline uint32_t mix31(uint32_t v) {
    v ^= v >> 16;
    v = (v * 0x7FEB352Du) & 0x7FFFFFFFu;
    v ^= v >> 15;
    v = (v * 0x846CA68Bu) & 0x7FFFFFFFu;
    return v ^ (v >> 16);
}

Tensor mix31_tensor(const Tensor& t) {  // vera_torch._mix31 on int64 tensors
    Tensor v = t.bitwise_xor(t.bitwise_right_shift(16));
    v = v.mul(0x7FEB352DLL).bitwise_and_(kM31);
    v = v.bitwise_xor(v.bitwise_right_shift(15));
    v = v.mul(0x846CA68BLL).bitwise_and_(kM31);
    return v.bitwise_xor(v.bitwise_right_shift(16));
}

// p * 2^31 exactly (a power-of-two scaling), truncated as Python's int() truncates
int64_t keep_threshold(double p) { return static_cast<int64_t>(p * 2147483648.0); }

template <typename scalar_t>
void dropout_cpu_kernel(const scalar_t* src, scalar_t* dst, int64_t rows, int64_t cols, int64_t seed, double p) {
    using opmath_t = at::opmath_type<scalar_t>;
    // the scale as torch's mul_ by a Python float takes it: rounded once to the op's math type (float for float32
    // and the half types, double for float64), then x * s rounded to x's dtype; dropped elements are +0, as
    // masked_fill(~keep, 0) leaves them
    const opmath_t scale = static_cast<opmath_t>(1.0 / (1.0 - p));
    const int64_t lo = seed & kM31, hi = (seed >> 31) & kM31, thr = keep_threshold(p);
    std::vector<uint32_t> col(cols);
    for (int64_t j = 0; j < cols; ++j)
        col[j] = static_cast<uint32_t>((static_cast<uint64_t>(j) * 0x9E3779B1ull) & kM31);
    const uint32_t* c = col.data();
    for (int64_t i = 0; i < rows; ++i) {
        const uint32_t r = mix31(mix31(static_cast<uint32_t>((i + lo) & kM31)) ^ static_cast<uint32_t>(hi));
        const scalar_t* s = src + i * cols;
        scalar_t* d = dst + i * cols;
        for (int64_t j = 0; j < cols; ++j) {
            const bool keep = static_cast<int64_t>(mix31(r ^ c[j])) >= thr;
            d[j] = keep ? static_cast<scalar_t>(static_cast<opmath_t>(s[j]) * scale) : static_cast<scalar_t>(0);
        }
    }
}

// the fused pass reads and writes memory directly: plain strided CPU tensors only (not a fake, functional or other
// Python-level tensor, which must see the aten ops)
bool fusable(const Tensor& t) {
    constexpr c10::DispatchKeySet kTraced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                           c10::DispatchKey::PythonTLSSnapshot});
    return t.device().is_cpu() && t.layout() == at::kStrided && !t.key_set().has_any(kTraced);
}

// dropout(t) with the seed's mask, (m * t) / (1 - p) in t's dtype: vera_torch._dropped, bit for bit. ``inplace``
// writes it into t where it can (t contiguous, or not on the CPU) and returns t; else the result is new. ``fused``
// false takes the aten-op path of non-CPU devices on the CPU too (tests compare the two).
Tensor dropout_apply(const Tensor& t, const Tensor& seed, double p, bool inplace, bool fused) {
    TORCH_CHECK(t.dim() == 2, "vera_kernels: dropout_apply takes a (rows, cols) tensor, got ", t.dim(), " dims");
    TORCH_CHECK(p >= 0.0 && p < 1.0, "vera_kernels: dropout probability must be in [0, 1), got ", p);
    const int64_t rows = t.size(0), cols = t.size(1);
    if (fused && fusable(t) && fusable(seed)) {
        const int64_t s = seed.item<int64_t>();
        Tensor src = t.contiguous();
        Tensor dst = inplace && src.is_same(t) ? t : at::empty_like(src, at::MemoryFormat::Contiguous);
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "vera_dropout_apply", [&] {
            dropout_cpu_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), rows,
                                         cols, s, p);
        });
        return dst;
    }
    const auto i64 = t.options().dtype(at::kLong);
    const Tensor sd = seed.to(i64);
    const Tensor lo = sd.bitwise_and(kM31), hi = sd.bitwise_right_shift(31).bitwise_and_(kM31);
    const Tensor r = mix31_tensor(mix31_tensor(at::arange(rows, i64).add(lo).bitwise_and_(kM31)).bitwise_xor(hi));
    const Tensor c = at::arange(cols, i64).mul(0x9E3779B1LL).bitwise_and_(kM31);
    const Tensor dropped = mix31_tensor(r.unsqueeze(1).bitwise_xor(c)).lt(keep_threshold(p));
    // the scale as Python passes a float: a wrapped-number tensor (mul_.Tensor, math in the op's math type); the
    // Scalar overload, mul_.Scalar, would round it to t's dtype first (bf16: a different result)
    const Tensor scale = at::native::wrapped_scalar_tensor(1.0 / (1.0 - p));
    return inplace ? t.masked_fill_(dropped, 0).mul_(scale) : t.masked_fill(dropped, 0).mul_(scale);
}

// h = dropout(x) A_s^T (vera_torch.VeraDownFunction in C++: the same ops, dtype rules and saved tensors; its
// docstring has the derivation): saved A_s and the seed, the mask regenerated in backward.
struct VeraDown : public torch::autograd::Function<VeraDown> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& A_s, const std::optional<Tensor>& seed,
                          double p) {
        const Tensor sd = seed.has_value() ? *seed : Tensor();
        ctx->save_for_backward({A_s, sd});
        ctx->saved_data["p"] = p;
        const Tensor x_ad = p > 0.0 ? dropout_apply(x, sd, p, false, true) : x;
        return at::mm(x_ad, as_dtype(A_s, x.scalar_type()).t());
    }

    static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
        if (!ctx->needs_input_grad(0)) return {Tensor(), Tensor(), Tensor(), Tensor()};
        auto saved = ctx->get_saved_variables();
        const double p = ctx->saved_data["p"].toDouble();
        const Tensor& grad_h = grads[0];
        Tensor grad_x = at::mm(grad_h, as_dtype(saved[0], grad_h.scalar_type()));
        if (p > 0.0) grad_x = dropout_apply(grad_x, saved[1], p, true, true);
        return {grad_x, Tensor(), Tensor(), Tensor()};
    }
};

Tensor vera_down(const Tensor& x, const Tensor& A_s, const std::optional<Tensor>& seed, double p) {
    return VeraDown::apply(x, A_s, seed, p);
}

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

// A plain linear layer with one adapter and no dropout, in one call from Python (ops.run_linear): base = x W^T + b
// (aten's linear, as F.linear), h = x A_s^T (aten's mm, as the torch backend's down; or a sibling's h, given), then
// the up node (VeraUp, or VeraUpPyBackward for the triton backend). The same ops in the same order as the Python
// path, so the same autograd graph and results; what it saves is the Python between them (frames and the
// arguments of three op calls). Returns (y, h).
std::tuple<Tensor, Tensor> vera_linear_plain(bool triton_backward, const Tensor& x, const Tensor& weight,
                                             const std::optional<Tensor>& bias, const Tensor& A_s,
                                             const std::optional<Tensor>& h_given, const Tensor& B_s,
                                             const Tensor& lambda_d, const Tensor& lambda_b) {
    Tensor base = at::linear(x, weight, bias);
    Tensor h = h_given.has_value() ? *h_given : at::mm(x, A_s.t());
    Tensor y = triton_backward ? VeraUpPyBackward::apply(base, h, B_s, lambda_d, lambda_b)
                               : VeraUp::apply(base, h, B_s, lambda_d, lambda_b);
    return {y, h};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("vera_linear_plain", &vera_linear_plain,
          "(x W^T + b + the up node's delta on h = x A_s^T or the h given, h): vera_linear_plain(triton_backward, x, "
          "weight, bias, A_s, h, B_s, lambda_d, lambda_b)");
    m.def("vera_up", &vera_up, "base + h R^T with R = diag(lambda_b) B_s diag(lambda_d) (VeraUpFunction in C++)");
    m.def("vera_up_py_backward", &vera_up_py_backward,
          "vera_up's forward; backward through the up_backward given to set_triton_functions");
    m.def("vera_down", &vera_down, "h = dropout(x) A_s^T (VeraDownFunction in C++)");
    m.def("dropout_apply", &dropout_apply, py::arg("t"), py::arg("seed"), py::arg("p"), py::arg("inplace") = false,
          py::arg("fused") = true,
          "dropout(t) with the torch backend's seeded keep-mask (vera_torch.dropout_keep_mask), in t's dtype");
    m.def("vera_down_py", &vera_down_py,
          "h = dropout(x) A_s^T through the down_forward / down_backward given to set_triton_functions");
    py::class_<LaunchReplay, std::shared_ptr<LaunchReplay>>(m, "LaunchReplay",
        "a launch plan replayed from C++ (vera_triton._LaunchPlan.replay)")
        .def(py::init<py::object, py::list, py::list>(), py::arg("guard"), py::arg("launches"), py::arg("outputs"))
        .def_readonly("runs", &LaunchReplay::runs);
    m.def("clear_replays", &clear_replays, "forget every kept LaunchReplay (triton_launch.clear)");
    m.def("replay_stats", &replay_stats, "how the triton up node's backwards ran: replayed here or in Python");
    m.def("set_triton_functions", &set_triton_functions,
          "the Python functions of vera_up_py_backward and vera_down_py (up_backward, down_forward, down_backward)");
}
