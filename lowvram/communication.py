"""What sequence parallelism sends between GPUs: bytes per rank per DiT forward, as a pure
function of the sizes, and their time at a link bandwidth (an estimate, not a measurement).

Per block (lowvram/parallel.py), each rank, with h its [image ; text] state and g its image-only
state (bytes of one [tokens, hidden] tensor in the activation dtype):
- Ulysses (u > 1): four all-to-alls, of q (h), of the image keys and values (g each) and of the
  output (h); each keeps 1/u of its tensor and sends the rest: (2h + 2g)(u - 1)/u;
- ring (r > 1): the image keys and values of the Ulysses group's tokens for this rank's heads
  (g each: u times the tokens, 1/u of the heads) go to the next rank at each of r - 1 steps: 2g(r - 1).
The text is on every rank and never sent. Once per forward the final layer's output (out_channels x
patch values per token) is all-gathered: each rank sends its share to world - 1 others. The step
cache's all-reduce (two numbers) is left out.

Time = bytes / bandwidth, for every rank at once over its own link: no latency, no overlap with
compute, no contention (cards without peer-to-peer access, e.g. GeForce cards, exchange through
pinned host memory, the same bytes up one card's link and down another's). A lower bound in that
sense, and an estimate, not measured. The 13B model is guidance-distilled: one forward per step.
"""

import math
from dataclasses import dataclass

from hyvideo.config import DiTConfig
from hyvideo.text_encoder import TEXT_LEN

from .parallel import Layout
from .units import GB

PCIE4_X8_GBS = 12.0  # PCIe 4.0 x8 (15.75 GB/s raw per direction), what a two-card consumer board gives each card


@dataclass(frozen=True)
class Communication:
    """Bytes one rank sends per block and per DiT forward."""

    per_block: int
    blocks: int
    gather: int  # the final layer's output, once per forward

    @property
    def per_forward(self) -> int:
        return self.blocks * self.per_block + self.gather

    def seconds(self, link_gbs: float = PCIE4_X8_GBS) -> float:
        """Time to send one forward's bytes at `link_gbs` GB/s."""
        return self.per_forward / (link_gbs * GB)

    def to_dict(self, link_gbs: float = PCIE4_X8_GBS) -> dict:
        return {"bytes_per_block": self.per_block, "blocks": self.blocks, "gather_bytes": self.gather,
                "gb_per_forward": self.per_forward / GB, "link_gbs": link_gbs, "seconds_per_forward": self.seconds(link_gbs)}


def communication(config: DiTConfig, tokens: int, layout: Layout, text_tokens: int = TEXT_LEN,
                  act_bytes: int = 2) -> Communication:
    """What one rank sends per DiT forward; `tokens`: its image tokens (N / world)."""
    hidden = (tokens + text_tokens) * config.hidden_size * act_bytes  # h
    image = tokens * config.hidden_size * act_bytes  # g
    u, r = layout.ulysses, layout.ring
    ulysses = (2 * hidden + 2 * image) * (u - 1) // u
    ring = 2 * image * (r - 1)
    output = tokens * config.out_channels * math.prod(config.patch_size) * act_bytes
    return Communication(ulysses + ring, config.double_blocks + config.single_blocks, output * (layout.world - 1))
