"""Loading models and tokenizers, calibration text, surgery and stitching, export and the runtime loader. Imports only allocator.core and kernels."""
