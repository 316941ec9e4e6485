"""The level database: calibration statistics, structured OBS and sparse pruners, levels on disk. Imports only allocator.core, allocator.model and kernels."""
