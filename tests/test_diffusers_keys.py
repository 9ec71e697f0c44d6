"""Our layout mapping against diffusers' own official->diffusers converter; the lazy view."""

import pytest
import torch

from hyvideo.checkpoint import check_state_dict
from hyvideo.config import DIT_CONFIGS
from hyvideo.diffusers_keys import diffusers_to_official, official_to_diffusers
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.errors import HyVideoError
from tests.diffusers_oracle import official_to_diffusers as diffusers_convert
from tests.helpers import randomize_


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
    """The lazy view gives exactly the official tensors (the old eager fusion was held to the same
    test), in the order asked for, and leaves its source as it was."""
    sd = tiny_official_sd()
    converted = diffusers_convert(sd, DIT_CONFIGS["tiny"].hidden_size)
    back, missing, unused = diffusers_to_official(converted, list(sd))
    assert missing == [] and unused == []
    assert list(back) == list(sd) and len(back) == len(sd)
    for key in sd:
        assert torch.equal(back[key], sd[key]), key
    assert sorted(converted) == sorted(diffusers_convert(sd, DIT_CONFIGS["tiny"].hidden_size))  # nothing popped


def test_view_fuses_on_access_and_checks_without_reading():
    sd = tiny_official_sd()
    converted = diffusers_convert(sd, DIT_CONFIGS["tiny"].hidden_size)
    view, _, _ = diffusers_to_official(converted, list(sd))
    first, second = view["double_blocks.0.img_attn_qkv.weight"], view["double_blocks.0.img_attn_qkv.weight"]
    assert first is not second and first.data_ptr() != second.data_ptr()  # made afresh, nothing cached
    assert view["img_in.proj.weight"] is converted["x_embedder.proj.weight"]  # renamed only: the source tensor

    # Names and shapes come from meta tensors too: the checks read no tensor data.
    meta, _, _ = diffusers_to_official({k: v.to("meta") for k, v in converted.items()}, list(sd))
    assert meta.shapes() == {k: tuple(v.shape) for k, v in sd.items()}
    with torch.device("meta"):
        model = HunyuanVideoDiT(DIT_CONFIGS["tiny"])
    check_state_dict(model, meta, "tiny")
    converted["single_transformer_blocks.1.attn.to_k.weight"] = torch.zeros(64, 7)  # cannot be fused with q and v
    bad, _, _ = diffusers_to_official(converted, list(sd))
    with pytest.raises(HyVideoError, match=r"mis-shaped .*single_blocks.1.linear1.weight \(64, 7\)"):
        check_state_dict(model, bad, "tiny")


def test_missing_and_unused_keys_are_reported():
    sd = tiny_official_sd()
    converted = official_to_diffusers(sd)
    del converted["transformer_blocks.0.attn.to_k.weight"]
    converted["some.extra.weight"] = torch.zeros(1)
    _, missing, unused = diffusers_to_official(converted, list(sd))
    assert missing == ["transformer_blocks.0.attn.to_k.weight"]
    assert unused == ["some.extra.weight"]


@pytest.mark.parametrize("name", ["tiny-i2v-16ch", "tiny-i2v-33ch"])
def test_i2v_layouts_use_the_same_names(name):
    """Both I2V DiTs keep the text-to-video tensor names in both layouts: diffusers' token-replace
    blocks name their modulation `norm1.linear` / `norm.linear` as before (one layer serves both
    vectors); latent_concat only widens x_embedder and has no guidance_embedder. So the official <->
    diffusers mapping is the T2V one; the I2V DiT loads through it, tensor for tensor."""
    from tests.diffusers_oracle import diffusers_transformer

    model = HunyuanVideoDiT(DIT_CONFIGS[name])
    randomize_(model, seed=4)
    sd = model.state_dict()
    diffusers_model = diffusers_transformer(DIT_CONFIGS[name], sd)  # loads strict: names and shapes match
    assert sorted(official_to_diffusers(sd)) == sorted(diffusers_model.state_dict())
    back, missing, unused = diffusers_to_official(diffusers_model.state_dict(), list(sd))
    assert missing == [] and unused == []
    assert all(torch.equal(back[key], sd[key]) for key in sd)
    assert ("guidance_in.mlp.0.weight" in sd) == (name == "tiny-i2v-16ch")
