"""Weight quantization for the DiT and the LLM text encoder.

One concept per module: `policy` (which linears), `fp8` / `int8` (the two DiT schemes: make the
quantized state dict, swap modules for runtime), `schemes` (the table of their handlers, which the
cache, the byte accounting and the stages look up), `tencent_fp8` (Tencent's FP8 release), `nf4`
(4-bit LLM encoder), `cache` (quantize once, load many times), `bytes` (memory accounting).
Nothing is imported here, so `import quant.bytes` does not pull in quanto or bitsandbytes.

May import: `hyvideo`, optimum-quanto, bitsandbytes. Never `lowvram` or `cli`; nothing prints.
"""
