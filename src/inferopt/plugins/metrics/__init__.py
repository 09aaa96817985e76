"""Built-in metrics: latency, throughput, accuracy, fidelity, size, memory, compute."""
