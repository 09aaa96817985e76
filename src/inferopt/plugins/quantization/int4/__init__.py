"""int4 (2/3/4-bit) weight quantization: the optimizer and its packed modules."""
