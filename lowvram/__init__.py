"""The low-VRAM engine: plan a run's memory, place each stage's models on the GPU only while it
works, stream DiT blocks from pinned host memory, decode the VAE in tiles.

Lives here: profiles (what a card of a given size runs) and the one function that settles a run's
configuration, the memory planner and its block schedule, the stages that load and place models,
the block streamer, tiled VAE, attention choice, compile, sequence parallelism, memory probing.
Sub-packages: `generation/` (a generation as a resumable run) and `setup/` (weights and machine).

May import: `quant`, `hyvideo`. Never `cli`, and never its own sub-packages (they build on it).
Nothing here prints.
"""
