"""ONNX export of quantized artifacts for ONNX Runtime (CPU, or GPU through onnxruntime-gpu).

`graph.py` builds the decoder graph (quantized Linear layers as `com.microsoft.MatMulNBits`,
carried over from the packed weights without requantizing), `export.py` writes and seals the
export directory, `runtime.py` runs it with a KV cache.
"""
