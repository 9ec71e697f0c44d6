"""What several test modules share, in one place (test modules import nothing from each other):
error measures, seeded random weights, three small DiTs with their inputs, a run below the CLI,
`lowvram` in this process (Typer's CliRunner) and as real processes, and ranks in forked processes.

diffusers, the independent reference implementation, is wrapped in diffusers_oracle.py; the tiny
model folders are conftest.py's session fixtures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from typer.testing import CliRunner

from hyvideo.config import DIT_CONFIGS, DiTConfig
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.pipeline import GenerationRequest
from hyvideo.v15_config import V15_DIT_CONFIGS
from hyvideo.v15_pipeline import V15Prompt
from lowvram.profiles import Overrides
from lowvram.progress import Reporter
from lowvram.schedule import BlockSchedule, plan_schedule
from lowvram.streaming import leaf_bytes
from quant.bytes import dit_block_kinds

ROOT = Path(__file__).resolve().parent.parent


# --- error measures ----------------------------------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32: the error of a whole tensor (quantization, bf16)."""
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err == err, "NaN error"  # NaN never passes a bound
    return err


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: the worst element, for parity where every element must agree."""
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err == err, "NaN error"
    return err


# --- seeded random weights ---------------------------------------------------------------------


def student_t(shape, generator: torch.Generator, df: int = 3) -> torch.Tensor:
    """Seeded Student-t samples scaled to unit variance: z / sqrt(chi2_df / df) * sqrt((df-2)/df)."""
    z = torch.randn(shape, generator=generator)
    chi2 = torch.randn((df, *shape), generator=generator).pow(2).sum(0)
    return z / (chi2 / df).sqrt() * ((df - 2) / df) ** 0.5


def randomize_(module: torch.nn.Module, seed: int, heavy: bool = False) -> None:
    """Weights ~ N(0, 1/fan_in) (or unit-variance Student-t df=3 / sqrt(fan_in): heavy tails, as
    trained weights have), norm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2): every parameter
    influences the output and activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim >= 2:
                p.copy_((student_t(p.shape, gen) if heavy else torch.randn(p.shape, generator=gen)) / p[0].numel() ** 0.5)
            else:
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)


def _has_quanto() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


HAS_QUANTO = _has_quanto()  # optional dependency: the GPU test machine lacks it
needs_quanto = pytest.mark.skipif(not HAS_QUANTO, reason="needs optimum-quanto")


# --- the tiny DiT (2 double + 2 single blocks) -------------------------------------------------


def tiny_dit(seed: int = 1, heavy: bool = False) -> HunyuanVideoDiT:
    model = HunyuanVideoDiT(DIT_CONFIGS["tiny"]).eval()
    randomize_(model, seed, heavy)
    return model


def dit_inputs(config: DiTConfig = DIT_CONFIGS["tiny"], seed: int = 0):
    """Batch 1, 3 latent frames of 8x8 (48 image tokens), 12 text tokens of which 9 valid."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.in_channels, 3, 8, 8, generator=gen)
    text = torch.randn(1, 12, config.text_states_dim, generator=gen)
    mask = torch.zeros(1, 12, dtype=torch.long)
    mask[0, :9] = 1
    pooled = torch.randn(1, config.text_states_dim_2, generator=gen)
    return x, torch.tensor([700.0]), text, mask, pooled, torch.tensor([6016.0])


# Parity with diffusers in float32 on CPU: the two implementations order a few reductions
# differently (qkv split vs fused, SDPA mask vs dropped padding); observed errors are ~1e-7, so 1e-5
# leaves margin but would catch any real formula difference (those show up at 1e-2 or more).
PARITY_TOL = 1e-5


def parity_inputs(config: DiTConfig, batch: int, frames: int, height: int, width: int, text_len: int,
                  valid: list[int], seed=0):
    """Inputs for a parity check: any latent grid, `valid[i]` of `text_len` text tokens in row i."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, frames, height, width, generator=gen)
    t = torch.tensor([997.0903, 500.0, 125.0][:batch])
    text = torch.randn(batch, text_len, config.text_states_dim, generator=gen)
    mask = torch.zeros(batch, text_len, dtype=torch.long)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
    pooled = torch.randn(batch, config.text_states_dim_2, generator=gen)
    guidance = torch.full((batch,), 6016.0)
    return x, t, text, mask, pooled, guidance


def forward(model, inputs):
    with torch.no_grad():
        return model(*inputs)


# --- the streaming DiT (3 double + 5 single blocks: rings of both kinds, uneven spreads) --------

STREAMING_CONFIG = DiTConfig(hidden_size=64, heads=2, double_blocks=3, single_blocks=5, refiner_blocks=1,
                             text_states_dim=48, text_states_dim_2=40, rope_axes_dim=(8, 12, 12))


def streaming_dit(seed=1, dtype=torch.float32) -> HunyuanVideoDiT:
    model = HunyuanVideoDiT(STREAMING_CONFIG).eval()
    randomize_(model, seed=seed)
    return model.to(dtype)


def streaming_inputs(seed=0):
    """2 latent frames of 6x8 (24 image tokens), 10 text tokens of which 7 valid."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 6, 8, generator=gen)
    text = torch.randn(1, 10, STREAMING_CONFIG.text_states_dim, generator=gen)
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 7:] = 0
    pooled = torch.randn(1, STREAMING_CONFIG.text_states_dim_2, generator=gen)
    return x, torch.tensor([700.0]), text, mask, pooled, torch.tensor([6016.0])


def schedule_for(model, **kwargs) -> BlockSchedule:
    return plan_schedule(dit_block_kinds(model.config), [leaf_bytes(b) for b in model.all_blocks()], **kwargs)


def run_steps(model, streamer, inputs, steps):
    outs = []
    with torch.no_grad():
        for step in range(steps):
            outs.append(model(*inputs, blocks=streamer.blocks_for_step(prefetch_next_step=step + 1 < steps)))
    return outs


# --- the small DiT (wider than tiny: per-token tensors dominate, as in the 13B model) -----------

SMALL = DiTConfig(hidden_size=128, heads=2, double_blocks=2, single_blocks=2, refiner_blocks=1,
                  text_states_dim=48, text_states_dim_2=40, rope_axes_dim=(16, 24, 24))


def small_dit(dtype=torch.bfloat16, seed=1) -> HunyuanVideoDiT:
    model = HunyuanVideoDiT(SMALL).eval()
    randomize_(model, seed=seed)
    return model.to(dtype)


def small_inputs(frames=4, h=32, w=32, text=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, frames, h, w, generator=gen), torch.tensor([500.0]),
            torch.randn(1, text, SMALL.text_states_dim, generator=gen), torch.ones(1, text, dtype=torch.long),
            torch.randn(1, SMALL.text_states_dim_2, generator=gen), torch.tensor([6016.0]))


# --- a run below the CLI -----------------------------------------------------------------------

# 64x48 px, 9 frames: latents [1, 16, 3, 6, 8], the smallest clip with several latent frames and
# both spatial dims even after the 2x2 patching; 4 steps are enough to stop and resume mid-way.
REQUEST = GenerationRequest("a red fox running through snow", width=64, height=48, frames=9, steps=4, seed=11)


def run_options(model_dir, runs_dir, request=REQUEST, step_cache=None, attention=None, compile=None, **kw):
    """RunOptions on the CPU; --cache / --attention / --compile as the CLI passes them (Overrides)."""
    from lowvram.generation.preflight import RunOptions

    return RunOptions(request, model_dir, runs_dir, device="cpu",
                      overrides=Overrides(step_cache=step_cache, attention=attention, compile=compile), **kw)


def new_run(model_dir, runs_dir, request=REQUEST, **kw):
    from lowvram.generation.preflight import start_run

    return start_run(run_options(model_dir, runs_dir, request, **kw))


class StopAfter(Reporter):
    """Asks the runner to stop once `n` steps are done (what the first Ctrl-C does)."""

    def __init__(self, stop, n: int):
        self.stop, self.n, self.warnings = stop, n, []

    def advance(self, completed, **info):
        if completed >= self.n and self.stop.stage == "denoising":
            self.stop.set()

    def warn(self, message):
        self.warnings.append(message)


# --- `lowvram` in this process -----------------------------------------------------------------

RUNNER = CliRunner()
# 64x48, 9 frames, 2 steps, float32 on the CPU: about a second per run.
TINY_ARGS = ["--size", "64x48", "--frames", "9", "--steps", "2", "--seed", "5", "--device", "cpu"]


def invoke(*args):
    import cli  # here, not at the top: `pytest -m cuda` collects where the CLI's packages (av) are missing

    return RUNNER.invoke(cli.app, [str(a) for a in args])


def as_json(result) -> dict:
    return json.loads(result.stdout)


def one_line_error(result) -> str:
    """The error: one line starting with "error:", the last thing on stderr (progress lines of
    the stages that ran before it may come first)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return lines[errors[0]]


# --- `lowvram` as real processes (for what needs one: SIGKILL, Ctrl-C, several ranks) ----------

PROMPT = "a red fox running through snow"


def lowvram(*args) -> list[str]:
    return [sys.executable, "-m", "cli", *map(str, args)]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(lowvram(*args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def manifest(runs_dir: Path) -> dict | None:
    """The manifest of the one run in runs_dir, once it exists (written atomically: never partial)."""
    found = list(runs_dir.glob("*/manifest.json"))
    return json.loads(found[0].read_text()) if found else None


def start_and_wait_for_step(runs_dir: Path, model_dir: Path, args: list[str], step: int = 1,
                            timeout: float = 90, prompt: str = PROMPT) -> tuple[subprocess.Popen, dict]:
    """`lowvram generate` started as a process, once its manifest says `step` steps are saved."""
    process = subprocess.Popen(lowvram("generate", prompt, "--model-dir", model_dir, "--runs-dir", runs_dir, *args),
                               cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = manifest(runs_dir)
        if current and current["step"] >= step:
            return process, current
        if process.poll() is not None:
            raise AssertionError(f"generate ended before step {step}: {process.communicate()}")
        time.sleep(0.01)
    process.kill()
    raise AssertionError("no step was saved in time")


def killed_after_a_step(runs_dir: Path, model_dir: Path, args: list[str], timeout: float = 90, prompt: str = PROMPT) -> dict:
    """`lowvram generate` started as a process and killed (SIGKILL) once a step is saved: the
    manifest it left."""
    process, _ = start_and_wait_for_step(runs_dir, model_dir, args, timeout=timeout, prompt=prompt)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"
    return manifest(runs_dir)


def final_latents(json_text: str) -> torch.Tensor:
    """The final latents that a `--json` result (of a process or of `invoke`) names."""
    return load_file(json.loads(json_text)["final_latents"])["latents"]


def uninterrupted_latents(model_dir, runs_dir, args: list[str]) -> torch.Tensor:
    """Final latents of an uninterrupted `lowvram generate` in this process (a process only where
    `args` start several ranks: the launcher starts each rank as `python -m cli` with its argv)."""
    command = ["generate", PROMPT, "--model-dir", model_dir, "--runs-dir", runs_dir, "--json", *args]
    if "--gpus" in args:
        done = run(*command)
        assert done.returncode == 0, done.stderr
        return final_latents(done.stdout)
    done = invoke(*command)
    assert done.exit_code == 0, done.output
    return final_latents(done.stdout)


# --- ranks as forked processes -----------------------------------------------------------------


def fork_ranks(function, world: int, *args) -> None:
    """function(rank, world, *args) in `world` processes, each with one intra-op thread. Forked, not
    spawned: no second import of torch, the project and the test module per rank (seconds each on
    a busy machine). One thread: the ranks share the cores, and GNU OpenMP, which this parent may
    have used, is not fork-safe for a team of threads in the child."""
    mp.start_processes(_one_thread, args=(function, world, *args), nprocs=world, start_method="fork")


def _one_thread(rank: int, function, world: int, *args) -> None:
    torch.set_num_threads(1)
    function(rank, world, *args)


def make_v15_prompt(seed: int, valid: int, byt5_valid: int) -> V15Prompt:
    """Random HunyuanVideo-1.5 prompt embeddings for the tiny DiT: 12 Qwen tokens (`valid` of them
    valid), 6 byT5 tokens (`byt5_valid`)."""
    tiny = V15_DIT_CONFIGS["tiny"]
    gen = torch.Generator().manual_seed(seed)
    text_mask, byt5_mask = torch.zeros(1, 12, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)
    text_mask[0, :valid], byt5_mask[0, :byt5_valid] = 1, 1
    return V15Prompt(torch.randn(1, 12, tiny.text_states_dim, generator=gen), text_mask,
                     torch.randn(1, 6, tiny.byt5_states_dim, generator=gen), byt5_mask)
