"""Our layout mapping against diffusers' own official->diffusers converter."""

import torch

from hyvideo.config import DIT_CONFIGS
from hyvideo.diffusers_keys import diffusers_to_official, official_to_diffusers
from hyvideo.dit import HunyuanVideoDiT
from tests.diffusers_oracle import official_to_diffusers as diffusers_convert
from tests.random_weights import randomize_


def tiny_official_sd():
    model = HunyuanVideoDiT(DIT_CONFIGS["tiny"])
    randomize_(model, seed=3)
    return model.state_dict()


def test_official_to_diffusers_equals_diffusers_converter():
    sd = tiny_official_sd()
    ours = official_to_diffusers(sd)
    theirs = diffusers_convert(sd, DIT_CONFIGS["tiny"].hidden_size)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_diffusers_to_official_round_trip():
    sd = tiny_official_sd()
    converted = diffusers_convert(sd, DIT_CONFIGS["tiny"].hidden_size)
    back, missing, unused = diffusers_to_official(converted, list(sd))
    assert missing == [] and unused == []
    assert sorted(back) == sorted(sd)
    for key in sd:
        assert torch.equal(back[key], sd[key]), key


def test_missing_and_unused_keys_are_reported():
    sd = tiny_official_sd()
    converted = official_to_diffusers(sd)
    del converted["transformer_blocks.0.attn.to_k.weight"]
    converted["some.extra.weight"] = torch.zeros(1)
    _, missing, unused = diffusers_to_official(converted, list(sd))
    assert missing == ["transformer_blocks.0.attn.to_k.weight"]
    assert unused == ["some.extra.weight"]
