"""Quantized types, the core every layer shares: number formats and `TensorQuant` (formats.py),
`QuantizedWeight`, what quantization schemes and recipes are (scheme.py), and how quantized weights
are stored (store.py). Imports nothing above the core."""
