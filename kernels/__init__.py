"""Triton kernels for attnstab (installed as `attnstab_kernels`)."""
