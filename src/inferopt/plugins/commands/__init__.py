"""Built-in CLI commands: tune, compare, new-plugin."""
