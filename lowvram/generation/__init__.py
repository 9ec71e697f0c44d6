"""A generation as a resumable run: the pre-flight checks, the runner (text, denoise, decode with a
checkpoint after every step), the run folder on disk, batches, prompt rewriting, video files, the live preview,
per-stage measurement, `lowvram bench`, and the ranks of a multi-GPU run with their launcher.

May import: the engine (`lowvram.*`), `lowvram.setup` (the demo's tiny model), `quant`, `hyvideo`.
Never `cli`. Nothing here prints: progress goes to a `lowvram.progress.Reporter`.
"""
