"""Built-in pruning: unstructured zeros and structured channel removal."""
