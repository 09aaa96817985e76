"""Built-in backends: where a model runs (cpu, cuda, data-parallel, model-parallel)."""
