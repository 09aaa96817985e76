"""The built-in plugins. Each module is registered through the ``inferopt`` entry-point group
exactly like a third-party plugin, and can be blocked the same way."""
