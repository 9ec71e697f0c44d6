"""Precision policy: which DiT modules are stored quantized, everything else stays bf16.

A policy names the `nn.Linear` modules inside the transformer blocks whose *weights* get quantized
(FP8 or INT8). Biases, norm weights, the embedders (img_in, txt_in with its refiner, time_in,
vector_in, guidance_in) and the final layer always stay in the compute dtype: together they are only
0.36 B of the 12.82 B parameters (facts §1.1, §1.14), and they set the scale of every activation.

Policies (`POLICIES`):

- "blocks" (default): the 320 block linears Tencent quantizes in its FP8 release (facts §1.14):
  per double block img/txt x {mod.linear, attn_qkv, attn_proj, mlp.fc1, mlp.fc2}, per single block
  {linear1, linear2, modulation.linear}; 12,457,082,880 weight elements.
- "blocks-no-mod": the same without the modulation linears (img_mod.linear, txt_mod.linear,
  modulation.linear): 9.06 B quantized elements, the 3.40 B modulation elements (2 x 56.6 M per
  double block, 28.3 M per single block) stay bf16, i.e. +3.4 GB of weights at FP8/INT8.

Why "blocks" is the default. Measured in tests/test_quant_policy.py (CPU, seeded).

Per layer (one [256, 3072] linear = the 13B fan-in, 64 normal input tokens, relative error
||y_q - y|| / ||y|| against the float32 output of the unquantized weights):

  weights                             fp8 per-channel   fp8 per-tensor   int8 per-channel
  normal                              2.62 %            2.62 %           0.85 %
  Student-t df=3 (heavy-tailed)       2.53 %            2.65 %           3.84 %
  normal + 4 input columns x10        2.53 %            2.57 %           3.46 %

- FP8 (e4m3, 3 mantissa bits) is a floating-point format: its *relative* rounding error is the same
  for small and large weights (2.65 % RMS in theory), whatever the distribution, per-channel or
  per-tensor (per-tensor only loses weights more than 2^14 below the layer maximum to e4m3's
  subnormals).
- INT8 is a uniform grid set by each row's largest weight: 3x better than FP8 on normal weights,
  worse on heavy tails or outlier input columns (they stretch every row's grid).
- Per layer, a modulation linear is no different from any other. On the whole model it is.

Whole tiny DiT (fp8 per-channel, float32 compute; quantizing one kind of block linear at a time;
normal / Student-t weights):

  mod.linear + modulation.linear   2.16 / 2.07 %      mlp.fc1 + fc2   1.92 / 1.46 %
  attn_qkv                         0.89 / 0.60 %      attn_proj       0.82 / 0.68 %
  linear1 (single)                 0.85 / 0.73 %      linear2         0.87 / 0.78 %
  policy "blocks"                  3.08 / 2.69 %      "blocks-no-mod" 2.35 / 1.95 %   (int8: 0.76 -> 0.60 %)

The modulation linears are the most sensitive kind, for about the same share of the weights as the
MLPs (29 % vs 31 % of the tiny model's quantized elements; 27 % of the 13B's). The likely reason:
their input (vec) is the same for every token, so their rounding error is one systematic
shift/scale/gate error shared by all tokens, not noise that averages out over tokens.
Excluding them removes about a quarter of the FP8 error (3.1 % -> 2.4 %), but costs 3.40 B
elements = +3.4 GB at 8 bits (13.2 GB -> 16.6 GB of DiT weights, quant/bytes.py), more than a
16 GB card can spare. Tencent ships its FP8 checkpoint with them quantized, evidence that the full
model tolerates it. Hence "blocks" by default (Tencent's set), and "blocks-no-mod" for a profile
with memory to spare that wants the last bit of fidelity.
"""

from dataclasses import dataclass

import torch.nn as nn

from hyvideo.config import DiTConfig
from hyvideo.errors import HyVideoError

STREAMS = ("img", "txt")
DOUBLE_LINEARS = ("mod.linear", "attn_qkv", "attn_proj", "mlp.fc1", "mlp.fc2")  # per stream
SINGLE_LINEARS = ("linear1", "linear2", "modulation.linear")
MODULATION_LINEARS = ("img_mod.linear", "txt_mod.linear", "modulation.linear")


@dataclass(frozen=True)
class QuantPolicy:
    """Which linears, relative to one block, are quantized in every double / single block."""

    name: str
    double: tuple[str, ...]  # e.g. "img_attn_qkv"
    single: tuple[str, ...]  # e.g. "linear1"

    def module_names(self, config: DiTConfig) -> list[str]:
        """Full module paths (state-dict key without ".weight") of the quantized linears."""
        names = [f"double_blocks.{i}.{n}" for i in range(config.double_blocks) for n in self.double]
        names += [f"single_blocks.{i}.{n}" for i in range(config.single_blocks) for n in self.single]
        return names

    def block_names(self, kind: str) -> tuple[str, ...]:
        """Quantized linears relative to one block of `kind` ("double" or "single")."""
        if kind not in ("double", "single"):
            raise ValueError(f"block kind must be 'double' or 'single', not {kind!r}")
        return self.double if kind == "double" else self.single

    def select(self, model: nn.Module) -> list[str]:
        """The policy's module paths in `model`, checked to exist and to be nn.Linear."""
        names = self.module_names(model.config)
        for name in names:
            module = model.get_submodule(name)
            if type(module) is not nn.Linear:
                raise TypeError(f"{name} is {type(module).__name__}, expected nn.Linear (already quantized?)")
        return names


def _double(*exclude: str) -> tuple[str, ...]:
    return tuple(f"{s}_{n}" for s in STREAMS for n in DOUBLE_LINEARS if f"{s}_{n}" not in exclude)


POLICIES: dict[str, QuantPolicy] = {
    "blocks": QuantPolicy("blocks", _double(), SINGLE_LINEARS),
    "blocks-no-mod": QuantPolicy(
        "blocks-no-mod", _double(*MODULATION_LINEARS), tuple(n for n in SINGLE_LINEARS if n not in MODULATION_LINEARS)
    ),
}
DEFAULT_POLICY = "blocks"


def get_policy(policy: "str | QuantPolicy") -> QuantPolicy:
    """A policy by name (profiles store names) or passed through."""
    if isinstance(policy, QuantPolicy):
        return policy
    if policy not in POLICIES:
        raise HyVideoError(f"unknown quantization policy {policy!r}: choose one of {', '.join(POLICIES)}")
    return POLICIES[policy]
