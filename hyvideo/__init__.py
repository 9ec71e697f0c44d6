"""The HunyuanVideo model as plain PyTorch: the DiT (token refiner, 3D RoPE, blocks), the causal
3D VAE, the two text encoders, the flow-matching sampler, and reading the official and diffusers
checkpoints (facts file, §1-§5). Also LoRA and TeaCache step caching, which change what a forward
computes.

May import: torch, transformers, safetensors. Never `quant`, `lowvram` or `cli`; nothing prints.
Knows nothing of offloading: the DiT's `blocks=` argument is the one seam streaming needs.
"""
