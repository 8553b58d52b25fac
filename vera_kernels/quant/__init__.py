"""bitsandbytes bases: bit-exact dequantization (native C++/CUDA extension with a pure-PyTorch fallback), the base
forward for quantized layers, and merging VeRA deltas into quantized weights. Imported lazily by the layers that need
it: ``import vera_kernels`` imports neither bitsandbytes nor the extension."""
