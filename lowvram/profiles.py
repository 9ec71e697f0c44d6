"""Memory profiles: declarative TOML files saying how to run on a GPU of a given size.

A profile names the VRAM it is made for, how the DiT is stored (fp8 | int8 | bf16) and streamed
(resident blocks, prefetch depth, token chunk), how the LLM text encoder is stored (nf4 | bf16),
the VAE tile sizes, the pinned-memory policy, the step cache, attention kernel, compile and FP8
matmul. Shipped profiles live in the top-level `profiles/` folder (plain, 24gb, 16gb, 12gb, 8gb);
users can pass their own TOML file instead. Every profile runs the same code (loader, block
streamer, token chunks, tiled VAE); "plain" just sets them so that nothing is quantized, streamed,
chunked or tiled.

    profile = load_profile("16gb")            # a shipped one, by name
    profile = load_profile("my-card.toml")    # a user's file
    candidates = settle_profile("auto", Overrides(step_cache="fast"), gpu=True)

`settle_profile` is the one place a run's configuration is settled: the profile it names with the
user's per-run overrides (`--cache`, `--attention`, `--compile`, `--fp8-matmul`, `--pin/--no-pin`)
applied and validated, once, before planning. Which of the candidates fits, and its memory plan,
is `lowvram.planner.resolve`'s business; the plan's profile is what the run stores and runs.

Every problem with a file is a one-line HyVideoError that names the file and the field.
"""

import dataclasses
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from hyvideo.errors import HyVideoError
from hyvideo.step_cache import STEP_CACHES as CACHE_PRESETS
from quant.bytes import DIT_SCHEMES, ENCODER_SCHEMES, QUANT_POLICIES
from quant.fp8 import FP8_MATMULS

from .attention_choice import CHOICES as ATTENTION_CHOICES
from .units import GIB

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the `tomli` backport (dependency `tomli; python_version < "3.11"`)
    import tomli as tomllib

def _profiles_dir() -> Path:
    """The shipped profiles: package data of the top-level `profiles` package."""
    try:
        from importlib.resources import files

        return Path(str(files("profiles")))
    except (ImportError, TypeError):
        return Path(__file__).resolve().parent.parent / "profiles"


PROFILES_DIR = _profiles_dir()


@dataclass(frozen=True)
class Profile:
    name: str
    vram_budget_gb: float  # GiB of GPU memory the profile is made for
    description: str = ""
    dit_scheme: str = "fp8"  # fp8 | int8 | bf16
    quant_policy: str = "blocks"  # which DiT linears are quantized (quant/policy.py)
    encoder_scheme: str = "nf4"  # LLM text encoder: nf4 | bf16
    resident_blocks: int | str = "auto"  # DiT blocks kept on the GPU: "auto" (fit the budget) or a count
    prefetch_depth: int = 2  # streamed blocks copied ahead of use
    token_chunk: int = 4096  # tokens per chunk of per-token DiT work (bounds activations); 0: no chunks
    vae_spatial_tile: int = 32  # VAE tile size in latents (multiple of 4; official 32 = 256 px); 0: untiled
    vae_temporal_tile: int = 16  # VAE tile length in latent frames (multiple of 4; official 16); 0: untiled
    pin_memory: bool = True  # page-lock the host copies of streamed blocks (faster copies)
    pinned_ram_cap_gb: float = 16.0  # GiB of host memory that may be page-locked
    step_cache: str = "off"  # skip the DiT's blocks on some steps: off | safe | fast (TeaCache) | deepcache (1.5)
    attention: str = "auto"  # auto | sdpa | sage | flash (lowvram/attention_choice.py)
    compile: bool = False  # torch.compile the DiT's blocks (lowvram/compile.py)
    fp8_matmul: str = "dequant"  # FP8 linears: dequant | scaled_mm (FP8 tensor cores) | auto (if measured faster)
    source: str = dataclasses.field(default="", compare=False)  # file it was read from

    @property
    def vram_budget_bytes(self) -> int:
        return int(self.vram_budget_gb * GIB)

    @property
    def pinned_ram_cap_bytes(self) -> int:
        return int(self.pinned_ram_cap_gb * GIB)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}


def _fail(source: str, message: str) -> HyVideoError:
    return HyVideoError(f"profile {source}: {message}")


_NUMBER = (int, float)
# Each field: (type(s), check or None, what a valid value is).
FIELD_CHECKS = {
    "name": (str, lambda v: bool(v.strip()), "must be a non-empty string"),
    "description": (str, None, "must be a string"),
    "vram_budget_gb": (_NUMBER, lambda v: v > 0, "must be a positive number of GiB"),
    "dit_scheme": (str, lambda v: v in DIT_SCHEMES, f"must be one of {', '.join(DIT_SCHEMES)}"),
    "quant_policy": (str, lambda v: v in QUANT_POLICIES, f"must be one of {', '.join(QUANT_POLICIES)}"),
    "encoder_scheme": (str, lambda v: v in ENCODER_SCHEMES, f"must be one of {', '.join(ENCODER_SCHEMES)}"),
    "resident_blocks": ((str, int), lambda v: v == "auto" if isinstance(v, str) else v >= 0,
                        "must be \"auto\" or a block count >= 0"),
    "prefetch_depth": (int, lambda v: v >= 1, "must be an integer >= 1"),
    "token_chunk": (int, lambda v: v >= 0, "must be a number of tokens (0: the whole sequence)"),
    "vae_spatial_tile": (int, lambda v: v >= 0 and v % 4 == 0, "must be a multiple of 4 latents (0: untiled)"),
    "vae_temporal_tile": (int, lambda v: v >= 0 and v % 4 == 0, "must be a multiple of 4 latent frames (0: untiled)"),
    "pin_memory": (bool, None, "must be true or false"),
    "pinned_ram_cap_gb": (_NUMBER, lambda v: v >= 0, "must be a number of GiB >= 0"),
    "step_cache": (str, lambda v: v in CACHE_PRESETS, f"must be one of {', '.join(CACHE_PRESETS)}"),
    "attention": (str, lambda v: v in ATTENTION_CHOICES, f"must be one of {', '.join(ATTENTION_CHOICES)}"),
    "compile": (bool, None, "must be true or false"),
    "fp8_matmul": (str, lambda v: v in FP8_MATMULS, f"must be one of {', '.join(FP8_MATMULS)}"),
}


def field_problem(name: str, value) -> str | None:
    """What is wrong with `value` for field `name` ("must be ... (got ...)"), or None."""
    expected, check, hint = FIELD_CHECKS[name]
    types = expected if isinstance(expected, tuple) else (expected,)
    ok = bool in types if isinstance(value, bool) else isinstance(value, types)  # true is not a count
    if not ok or (check is not None and not check(value)):
        return f"{hint} (got {value!r})"
    return None


def profile_from_dict(values: dict, source: str = "<dict>") -> Profile:
    """Validate `values` (a parsed TOML table) into a Profile; errors name the field."""
    known = {f.name for f in fields(Profile)} - {"source"}
    for key in values:
        if key not in known:
            raise _fail(source, f"unknown field '{key}' (known fields: {', '.join(sorted(known))})")
    for required in ("name", "vram_budget_gb"):
        if required not in values:
            raise _fail(source, f"missing field '{required}'")
    for key, value in values.items():
        if problem := field_problem(key, value):
            raise _fail(source, f"field '{key}' {problem}")
    values = dict(values)
    for key in ("vram_budget_gb", "pinned_ram_cap_gb"):
        if key in values:
            values[key] = float(values[key])
    return Profile(**values, source=source)


def _read(path: Path) -> Profile:
    try:
        with path.open("rb") as f:
            values = tomllib.load(f)
    except OSError as error:
        raise HyVideoError(f"cannot read profile {path}: {error.strerror or error}") from error
    except tomllib.TOMLDecodeError as error:
        raise _fail(str(path), f"not valid TOML: {error}") from error
    return profile_from_dict(values, str(path))


def available_profiles() -> list[str]:
    """Names of the shipped profiles, fastest first (largest VRAM budget first)."""
    return [p.name for p in shipped_profiles()]


def shipped_profiles() -> list[Profile]:
    profiles = [_read(path) for path in sorted(PROFILES_DIR.glob("*.toml"))]
    return sorted(profiles, key=lambda p: -p.vram_budget_gb)


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name ("16gb"), or a user's TOML file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith(".toml") or path.is_file() or "/" in text or "\\" in text:
        if not path.is_file():
            raise HyVideoError(f"profile file not found: {path}")
        return _read(path)
    shipped = PROFILES_DIR / f"{text}.toml"
    if not shipped.is_file():
        raise HyVideoError(f"unknown profile {text!r}; available: {', '.join(available_profiles())} "
                           "(or pass the path of a .toml file)")
    return _read(shipped)


# Per-run options that override a profile's field, as the CLI spells them (errors name the option).
OVERRIDE_OPTIONS = {"step_cache": "--cache", "attention": "--attention", "compile": "--compile",
                    "fp8_matmul": "--fp8-matmul", "pin_memory": "--pin/--no-pin"}


@dataclass(frozen=True)
class Overrides:
    """The user's per-run changes to the profile's fields; None: as the profile says."""

    step_cache: str | None = None  # --cache off | safe | fast | deepcache
    attention: str | None = None  # --attention auto | sdpa | sage | flash
    compile: bool | None = None  # --compile / --no-compile
    fp8_matmul: str | None = None  # --fp8-matmul dequant | scaled_mm | auto
    pin_memory: bool | None = None  # --pin / --no-pin

    def given(self) -> dict:
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}


def with_overrides(profile: Profile, overrides: Overrides) -> Profile:
    """`profile` with the user's overrides, each checked by the same rule as a profile file's field."""
    given = overrides.given()
    for name, value in given.items():
        if problem := field_problem(name, value):
            raise HyVideoError(f"{OVERRIDE_OPTIONS[name]} {problem}")
    return dataclasses.replace(profile, **given) if given else profile


def settle_profile(spec: "str | Profile", overrides: Overrides = Overrides(), *, gpu: bool = True) -> list[Profile]:
    """The run's profile(s), settled once: `spec` (auto | a shipped name | a .toml path | a Profile,
    e.g. the demo's) with the user's overrides applied and validated. "auto" gives every shipped
    profile, fastest first, for the planner to take the fastest that fits; without a GPU "auto" is
    "plain". A bad name, file or option value is one HyVideoError."""
    if isinstance(spec, Profile):
        profiles = [spec]
    elif spec == "auto":
        profiles = shipped_profiles() if gpu else [load_profile("plain")]
    else:
        profiles = [load_profile(spec)]
    return [with_overrides(profile, overrides) for profile in profiles]


# Profiles stored by runs started before the step cache took preset names (resumable unchanged).
_STORED_STEP_CACHE = {("off", None): "off", ("teacache", 0.10): "safe", ("teacache", 0.15): "fast"}


def stored_profile(values: dict, run_id: str) -> Profile:
    """The profile a run stored in its settings (`to_dict()` plus "source"), validated again."""
    values = dict(values)
    source = values.pop("source", None) or values.get("name", "?")
    if "step_cache_threshold" in values:
        threshold = values.pop("step_cache_threshold")
        method = values.get("step_cache", "off")
        values["step_cache"] = _STORED_STEP_CACHE.get((method, None if method == "off" else threshold), method)
    try:
        return profile_from_dict(values, source)
    except HyVideoError as error:
        raise HyVideoError(f"run {run_id} was started by an older lowvram ({error}); start a new run with `lowvram generate`") from None
