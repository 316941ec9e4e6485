"""The bottom layer: model shape, units, options and patterns, budgets, configs, the plan, errors, registry. Imports nothing above it (only kernels)."""
