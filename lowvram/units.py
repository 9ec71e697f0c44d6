"""Byte units, defined once: memory is budgeted and reported in GiB (what torch and nvidia-smi
report), link bandwidths are quoted in decimal GB/s."""

GIB = 2**30
GB = 10**9
