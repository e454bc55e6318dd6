"""Training: epoch functions (plain torch), the Ray Train worker loop and trainer."""
