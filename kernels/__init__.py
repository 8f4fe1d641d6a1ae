"""Triton kernels of fastnca (installed as fastnca.kernels): one op per file."""
