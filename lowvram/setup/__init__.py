"""Getting ready for a run: downloading weights, extracting LLaVA's language model into
`text_encoder/`, `lowvram doctor`'s checks, and the random-weight model folders (full size or tiny,
with tiny tokenizers) that tests, the demo and `lowvram bench` use instead of a download.

May import: the engine (`lowvram.*`), `quant`, `hyvideo`. Never `lowvram.generation` or `cli`.
"""
