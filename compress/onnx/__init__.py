"""ONNX export of quantized artifacts for ONNX Runtime (CPU, or GPU through onnxruntime-gpu).

`graph.py` builds the decoder graph (quantized Linear layers as `com.microsoft.MatMulNBits`,
carried over from the packed weights without requantizing), `layers.py` holds what differs by
family (windows, rotary tables, q/k norms, norm placement, activations, logit post-processing)
and refuses from config.json what the graph cannot express, `export.py` writes and seals the
export directory, `runtime.py` runs it with a KV cache.
"""
