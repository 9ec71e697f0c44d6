"""The HunyuanVideo model as plain PyTorch: the DiT (token refiner, 3D RoPE, blocks), the causal
3D VAE, the two text encoders, the flow-matching sampler, and reading the official and diffusers
checkpoints (facts file, §1-§5). Also LoRA, TeaCache step caching and RIFLEx, which change what a
forward computes, and a latent-to-RGB projection for live previews.

May import: torch, transformers, safetensors. Never `quant`, `lowvram` or `cli`; nothing prints.
Knows nothing of offloading: the DiT's `blocks=` argument is the one seam streaming needs.
"""
