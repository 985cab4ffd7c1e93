"""What a model does on clean and triggered inputs, and the metric formulas."""
