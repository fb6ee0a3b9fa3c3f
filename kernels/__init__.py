"""Hand-written CUDA kernels for ParScale decoding; see kernels/fused.py (the only entry point)."""
