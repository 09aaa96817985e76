"""inferopt-worked-examples: three plugins written from inferopt's documentation.

- ``ort_backend``: the ``ort`` backend (ONNX Runtime on the CPU);
- ``tail_latency``: the ``tail-latency`` metric (p99.9 and p50 per batch);
- ``fuse_bn``: the ``fuse-bn`` optimizer (folds BatchNorm2d into the Conv2d before it).

Each module is its own entry point and stays light: torch and onnxruntime are imported inside
the methods that use them.
"""

__version__ = "0.1.0"
