"""Sparse weight formats and their Triton kernels, each beside its pure-torch reference.

The structured options of the search space need no custom kernel: pruned layers are smaller dense matrices
that run on the stock GEMMs. The unstructured and N:M options store their weights in a sparse format:
  - kernels.bitmap: one bit per element plus the packed non-zeros (unstructured sparsity; the export format),
  - kernels.csr8:   each non-zero with a one-byte in-segment column (unstructured; a decode kernel whose work
                    follows the stored values, an alternative format the export does not choose yet),
  - kernels.nm:     N:M (e.g. 2:4) values and packed in-group indices,
  - kernels.bsr:    block-sparse rows (only blocks holding a non-zero are stored).
Each format module has compress / decompress, reference_matmul (torch) and triton_matmul (Triton), and a weight
class with tensors() / from_tensors() / nbytes. kernels.formats registers them by name, kernels.ops wraps each in
a torch.library custom op (Triton on CUDA, the torch reference on CPU), and kernels.sparse_linear.SparseLinear is
the nn.Module the exported model and the GPU profiler both run. Failures on unsupported input raise
kernels.errors.UnsupportedShape.

Importing this package loads none of the kernels; import the submodules. Without a GPU, set TRITON_INTERPRET=1
before importing them to run the kernels in Triton's interpreter (as the tests do)."""
