"""Built-in knowledge distillation."""
