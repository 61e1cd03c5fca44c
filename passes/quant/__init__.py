"""Quantization: number formats, the quantized weight value, algorithms and the quantize driver."""
