"""Triton kernels of fastdistil, installed as fastdistil.kernels. Importing this package never touches a GPU."""
