"""Code generation: the `KernelSpec` of a fused pattern and the Jinja templates that render it."""
