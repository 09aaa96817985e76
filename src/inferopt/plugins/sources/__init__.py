"""Built-in model and data sources."""
