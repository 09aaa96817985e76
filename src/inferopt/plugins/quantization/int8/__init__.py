"""int8 quantization: the optimizer and its quantized modules."""
