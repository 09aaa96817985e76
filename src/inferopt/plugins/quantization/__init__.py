"""Built-in quantization: int8 and int4, and their shared calibration."""
