"""dfqkern: data-free quantization of vision models with packed low-bit kernels."""
__version__ = "0.1.0"
