"""The `lowvram` Typer app and what every command shares: the two consoles (results on stdout,
progress and errors on stderr), common options, and one-line user errors (exit code 2)."""


import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

# plain dataclasses, no torch: the HunyuanVideo-1.5 transformer names for --model's help
from hyvideo.v15_config import V15_SAMPLING

app = typer.Typer(
    name="lowvram", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="HunyuanVideo 13B text-to-video on one 16-24 GB NVIDIA GPU, with resumable runs.",
)
profiles_app = typer.Typer(help="List the memory profiles, or show one (`profiles show NAME`).", invoke_without_command=True)
app.add_typer(profiles_app, name="profiles")

out = Console(highlight=False, soft_wrap=True)  # results: tables, paths, JSON
err = Console(stderr=True, highlight=False, soft_wrap=True)  # progress, warnings, errors

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# Options that several commands take, declared once (with their environment variables).
RunsDir = typer.Option(Path("runs"), "--runs-dir", envvar="LOWVRAM_RUNS_DIR", help="Where run folders live.")
CacheDir = typer.Option(None, "--cache-dir", envvar="LOWVRAM_CACHE_DIR",
                        help="Where quantized weights are kept (default: MODEL_DIR/lowvram-cache).")
ModelDir = typer.Option(None, "--model-dir", envvar="LOWVRAM_MODEL_DIR",
                        help="Weights folder (default: ./ckpts if it holds a model, else the huggingface_hub cache).")
WhichModel = typer.Option(None, "--model", envvar="LOWVRAM_MODEL",
                          help="Which model in the folder: hunyuanvideo (13B), i2v (its image-to-video release, where "
                          "ckpts/ holds both; --image picks it too), 1.5, or a HunyuanVideo-1.5 transformer such as "
                          "1.5-720p_t2v (default: detected from the folder).")
Device = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available).")
ProfileName = typer.Option("auto", "--profile", help="Memory profile: auto, a name (`lowvram profiles`) or a .toml file.")
# The video's size, as generate, plan and bench take it (lowvram.sizes.resolve_size).
Size = typer.Option(None, "--size", help="WIDTHxHEIGHT, multiples of 16 (e.g. 1280x720).")
Resolution = typer.Option(None, "--resolution", help="Official bucket: 540p or 720p (default 720p; HunyuanVideo-1.5: its "
                          "transformer's own, 480p or 720p, at --aspect).")
Aspect = typer.Option(None, "--aspect", help="With --resolution: 16:9, 9:16, 4:3, 3:4 or 1:1 (default 16:9).")
Frames = typer.Option(None, "--frames", show_default=False, help="Number of frames, 4k+1 up to 261; default the "
                      "trained length: 129 (5.4 s at 24 fps), 121 for HunyuanVideo-1.5; 1 = a PNG image.")
Riflex = typer.Option("auto", "--riflex", help="RIFLEx, for clips longer than the trained 129 frames (no loop or freeze): "
                      "auto (on above 129 frames), on or off.")
Preview = typer.Option(False, "--preview", help="Write preview.webp in the run folder after every step: the clip as the "
                       "model now predicts it, from the latents alone (no VAE; coarse colours, 1/8 size).")
# Per-run overrides of the profile's fields (lowvram.profiles.Overrides), all None = as the profile says.
StepCache = typer.Option(None, "--cache", help="Skip the DiT's blocks on steps that change little: off; for the 13B "
                         "model TeaCache safe (published ~1.6x) or fast (~2.1x); for HunyuanVideo-1.5 deepcache "
                         "(Tencent's schedule: 25 of 50 steps run one block); default: the profile's (off).")
Attention = typer.Option(None, "--attention", help="Attention kernel: auto (the fastest installed one that passes a probe on "
                         "this GPU), sdpa, sage (pip install '.[sage]'), flash ('.[flash]') or one SDPA kernel (sdpa:flash, sdpa:cudnn, "
                         "sdpa:efficient, sdpa:math); default: the profile's (auto).")
Compile = typer.Option(None, "--compile/--no-compile", help="torch.compile the DiT's blocks (first step compiles; cached on "
                       "disk for the next run); default: the profile's (off).")
Fp8Matmul = typer.Option(None, "--fp8-matmul", help="FP8 DiT linears: dequant (to bf16, then matmul), scaled_mm (FP8 tensor "
                         "cores, compute capability >= 8.9) or auto (scaled_mm where it passes a probe); default: the profile's.")
Pin = typer.Option(None, "--pin/--no-pin", help="Page-lock the streamed blocks' host copies (faster copies, RAM that cannot "
                   "be swapped); default: the profile's (on).")
Loras = typer.Option(None, "--lora", help="PATH[:STRENGTH] of a LoRA .safetensors (diffusers, kohya/musubi or official "
                     "names; strength default 1). Repeat to add several.")
Gpus = typer.Option(None, "--gpus", help="Split the video's tokens across this many GPUs (one process each, sequence parallel; "
                    "needs the \\[multigpu] extra). Every GPU runs the profile's plan for its share.")
Parallel = typer.Option("usp", "--parallel", help="With --gpus: usp (Ulysses as far as the 24 heads divide, then ring), ulysses or ring.")
ReleasedModel = typer.Option("t2v", "--model", help="Which released model: t2v (HunyuanVideo), i2v (HunyuanVideo-I2V, "
                             "token_replace: the current release), i2v-33ch (its first release, latent_concat), or a "
                             "HunyuanVideo-1.5 transformer: " + ", ".join(f"1.5-{variant}" for variant in V15_SAMPLING) + ".")
Json = typer.Option(False, "--json", help="Print one JSON object at the end (for scripts); no progress bars.")
Quiet = typer.Option(False, "--quiet", "-q", help="No progress bars; print only the result path.")


def overrides(step_cache: str | None = None, attention: str | None = None, compile_blocks: bool | None = None,
              fp8_matmul: str | None = None, pin: bool | None = None):
    """The override options, as lowvram takes them (it checks them, once, with the profile)."""
    from lowvram.profiles import Overrides

    return Overrides(step_cache=step_cache, attention=attention, compile=compile_blocks, fp8_matmul=fp8_matmul, pin_memory=pin)


# --- plumbing --------------------------------------------------------------------------------


class UserError(Exception):
    """Raised by the CLI itself for bad arguments; same handling as HyVideoError."""


def fail(message: str, as_json: bool = False, code: int = EXIT_USER_ERROR):
    if as_json:
        print_json({"ok": False, "error": message})
    first, *rest = str(message).split("\n")
    err.print(f"[bold red]error:[/] {escape(first)}")
    for line in rest:
        err.print(line, markup=False)
    raise typer.Exit(code)


@contextmanager
def user_errors(as_json: bool = False):
    """HyVideoError (any layer) -> one line on stderr, exit code 2."""
    from hyvideo.errors import HyVideoError

    try:
        yield
    except (HyVideoError, UserError) as error:
        fail(str(error), as_json)


def quiet_libraries() -> None:
    """transformers/huggingface_hub progress bars and load reports would garble ours, and
    bitsandbytes logs a warning about an optional CPU kernel package on import."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def print_json(value) -> None:
    """Exactly one JSON document on stdout (no colours, no wrapping)."""
    sys.stdout.write(json.dumps(value, indent=1, default=str) + "\n")
    sys.stdout.flush()


def print_table(table) -> None:
    """Tables at the terminal's width; piped into a file or another program, at 120 columns
    rather than rich's default of 80 (which folds every path)."""
    (out if out.is_terminal else Console(highlight=False, width=120)).print(table)


def format_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"
