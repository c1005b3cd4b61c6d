"""Triton kernels of fastdistil, installed as fastdistil.kernels. Importing this package never touches a GPU.

KERNEL_MODULES lists the kernel modules; each follows the protocol in spec.py (compile_specs(), cost()).
"""
KERNEL_MODULES: tuple[str, ...] = ("layer_norm", "gelu", "embedding", "attention", "kd", "relation", "matmul",
                                   "padding")
