"""Profiles: shipped files load, malformed files fail with one line naming the field, unknown names
list the shipped ones, and `choose_profile` picks the fastest profile that fits."""

import json

import pytest

from hyvideo.errors import HyVideoError
from lowvram.planner import choose_profile
from lowvram.profiles import PROFILES_DIR, available_profiles, load_profile, profile_from_dict, shipped_profiles
from lowvram.units import GIB
SHIPPED = ["plain", "24gb", "16gb", "12gb", "8gb"]


def test_all_shipped_profiles_load():
    assert available_profiles() == SHIPPED  # fastest (largest budget) first
    for profile in shipped_profiles():
        assert (PROFILES_DIR / f"{profile.name}.toml").is_file()  # file name = profile name
        assert profile.dit_scheme == ("bf16" if profile.name == "plain" else "fp8") and profile.description
        assert load_profile(profile.name) == profile
    p24 = load_profile("24gb")
    assert (p24.vram_budget_gb, p24.encoder_scheme, p24.vae_spatial_tile, p24.vae_temporal_tile) == (24.0, "bf16", 32, 16)
    json.dumps(p24.to_dict())  # plain values: the CLI prints it as JSON


def test_user_profile_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nvram_budget_gb = 10\nresident_blocks = 12\nquant_policy = "blocks-no-mod"\n')
    profile = load_profile(str(path))
    assert profile.name == "mine" and profile.resident_blocks == 12 and profile.vram_budget_gb == 10.0
    assert profile.quant_policy == "blocks-no-mod"
    assert profile.token_chunk == 4096 and profile.source == str(path)  # defaults for the rest


@pytest.mark.parametrize("body, field", [
    ('name = "x"\nvram_budget_gb = 8\nprefetch_depth = "two"\n', "prefetch_depth"),
    ('name = "x"\nvram_budget_gb = 8\ndit_scheme = "fp16"\n', "dit_scheme"),
    ('name = "x"\nvram_budget_gb = 8\nresident_blocks = "many"\n', "resident_blocks"),
    ('name = "x"\nvram_budget_gb = 8\nvae_spatial_tile = 30\n', "vae_spatial_tile"),
    ('name = "x"\nvram_budget_gb = 8\npin_memory = 1\n', "pin_memory"),
    ('name = "x"\nvram_budget_gb = 8\ntoken_chunk = true\n', "token_chunk"),
    ('name = "x"\nvram_budget_gb = -1\n', "vram_budget_gb"),
    ('name = "x"\nvram_budget_gb = 8\nvram_budget = 8\n', "vram_budget"),
    ('name = "x"\n', "vram_budget_gb"),
    ('name = "x"\nvram_budget_gb = 8\nquant_policy = "all"\n', "quant_policy"),
])
def test_malformed_profile_names_the_field(tmp_path, body, field):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(HyVideoError) as info:
        load_profile(path)
    message = str(info.value)
    assert f"'{field}'" in message and str(path) in message and "\n" not in message


def test_invalid_toml_is_one_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x\nvram_budget_gb = 8\n')
    with pytest.raises(HyVideoError, match="not valid TOML") as info:
        load_profile(path)
    assert "\n" not in str(info.value)


def test_unknown_profile_name_lists_available():
    with pytest.raises(HyVideoError) as info:
        load_profile("32gb")
    assert all(name in str(info.value) for name in SHIPPED)
    with pytest.raises(HyVideoError, match="not found"):
        load_profile("missing/profile.toml")


@pytest.mark.parametrize("free, expected", [(80, "24gb"), (23.5, "24gb"), (11, "12gb"), (7.5, "8gb")])
def test_choose_profile_picks_the_fastest_that_fits(free, expected):
    chosen, _ = choose_profile(int(free * GIB), 64 * GIB, 1280, 720, 129, shipped_profiles())
    assert chosen.name == expected
    assert chosen.vram_budget_gb == min(free, load_profile(expected).vram_budget_gb)  # auto resident uses what is free


def test_choose_profile_is_monotonic_in_vram():
    order = {name: i for i, name in enumerate(SHIPPED)}
    previous = len(SHIPPED)
    for free in (7, 8, 10, 12, 14, 16, 20, 24, 40):
        rank = order[choose_profile(int(free * GIB), 64 * GIB, 1280, 720, 129, shipped_profiles())[0].name]
        assert rank <= previous  # more VRAM never picks a slower profile
        previous = rank


def test_choose_profile_reports_what_is_missing():
    with pytest.raises(HyVideoError, match="no profile fits") as info:
        choose_profile(4 * GIB, 64 * GIB, 1280, 720, 129, shipped_profiles())
    assert "8gb" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(HyVideoError, match="RAM"):  # streaming needs host RAM for the blocks
        choose_profile(8 * GIB, 4 * GIB, 1280, 720, 129, shipped_profiles())


def test_profile_from_dict_round_trip():
    profile = load_profile("16gb")
    assert profile_from_dict(profile.to_dict(), "copy") == profile
