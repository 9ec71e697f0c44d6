"""Sequence parallelism (lowvram/parallel.py) on CPU ranks talking gloo: the layouts and their
one-line errors, the LSE attention, and the tiny DiT's forward split across 2 or 4 processes
(Ulysses, ring, both) against the same forward in one process."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hyvideo.attention import attention_with_lse
from hyvideo.config import DIT_CONFIGS
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.errors import HyVideoError
from lowvram.generation.launch import free_port
from lowvram.parallel import Layout, SequenceParallel, check_parallel, choose_layout, split_axis
from tests.helpers import fork_ranks

pytest.importorskip("yunchang")


def test_layouts_take_as_much_ulysses_as_the_heads_allow():
    assert choose_layout("usp", 2, 24) == Layout(2, 2, 1)
    assert choose_layout("usp", 16, 24) == Layout(16, 8, 2)
    assert choose_layout("usp", 5, 24) == Layout(5, 1, 5)
    assert choose_layout("ring", 4, 24) == Layout(4, 1, 4)
    assert choose_layout("ulysses", 8, 24) == Layout(8, 8, 1)


@pytest.mark.parametrize("mode, world, heads, grid, words", [
    ("ulysses", 5, 24, (33, 45, 80), "24 heads do not divide into 5"),
    ("fast", 2, 24, (33, 45, 80), "--parallel must be one of"),
    ("usp", 0, 24, (33, 45, 80), "--gpus must be at least 1"),
    ("usp", 7, 24, (33, 45, 80), "neither 7 rows nor columns"),
])
def test_impossible_layouts_are_one_line_errors(mode, world, heads, grid, words):
    with pytest.raises(HyVideoError, match=words) as caught:
        check_parallel(mode, world, heads, grid)
    assert "\n" not in str(caught.value)


def test_rows_split_first_then_columns():
    assert split_axis((33, 45, 80), 5) == 1  # 720p: 45 rows into 5
    assert split_axis((33, 45, 80), 2) == 2  # 45 rows do not halve; 80 columns do


def test_attention_with_lse_matches_softmax_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 7, 2, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    out, lse = attention_with_lse(q, k, v)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 16**0.5
    reference = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)  # float32, one softmax: rounding only
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=0, atol=1e-5)


def _model_and_inputs(name: str = "tiny"):
    """The tiny DiT (2 heads) with random weights; a latent grid of 4 x 6 tokens over 3 frames and
    text with padding (6 of 9 tokens valid), as the pipeline passes them."""
    torch.manual_seed(0)
    config = DIT_CONFIGS[name]
    model = HunyuanVideoDiT(config).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, config.in_channels, 3, 8, 12, generator=g), torch.tensor([700.0]),
              torch.randn(1, 9, config.text_states_dim, generator=g), torch.tensor([[1] * 6 + [0] * 3]),
              torch.randn(1, config.text_states_dim_2, generator=g), torch.tensor([6000.0]))
    return model, inputs


def _rank(rank: int, world: int, mode: str, port: int, folder: str, name: str = "tiny") -> None:
    from yunchang.globals import PROCESS_GROUP, set_seq_parallel_pg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layout = choose_layout(mode, world, DIT_CONFIGS["tiny"].heads)
    set_seq_parallel_pg(layout.ulysses, layout.ring, rank, world)
    model, inputs = _model_and_inputs(name)
    model.sequence_parallel = SequenceParallel(layout, rank, model.config.patch_size, PROCESS_GROUP.ULYSSES_PG,
                                               PROCESS_GROUP.RING_PG)
    with torch.inference_mode():
        torch.save(model(*inputs), os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("mode, world, layout", [("ulysses", 2, (2, 1)), ("ring", 2, (1, 2)), ("usp", 4, (2, 2))])
@pytest.mark.slow
def test_split_forward_equals_one_process(tmp_path, mode, world, layout):
    """Every rank returns the whole velocity, equal to one process's within float32 rounding: the
    ranks sum the same terms in another order (keys permuted by the all-to-all, ring blocks merged
    by their log-sum-exp). 1e-5 on outputs of about 1 is ~100 float32 ulps; measured ~4e-7."""
    assert (choose_layout(mode, world, 2).ulysses, choose_layout(mode, world, 2).ring) == layout
    fork_ranks(_rank, world, mode, free_port(), str(tmp_path))
    model, inputs = _model_and_inputs()
    with torch.inference_mode():
        expected = model(*inputs)
    for rank in range(world):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("world", [2, 4])  # 4 token rows: 2 or 1 of them per rank
@pytest.mark.slow
def test_token_replace_split_forward_equals_one_process(tmp_path, world):
    """Image-to-video token_replace: each rank holds a slab of rows of every latent frame, so its
    share of the first frame's tokens (modulated from t = 0) is its tokens / 3 frames. Same bound
    and reasons as above."""
    fork_ranks(_rank, world, "ulysses" if world == 2 else "ring", free_port(), str(tmp_path), "tiny-i2v-16ch")
    model, inputs = _model_and_inputs("tiny-i2v-16ch")
    with torch.inference_mode():
        expected = model(*inputs)
    for rank in range(world):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected, rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend, bound", [("sdpa", 0.02), ("flash", 0.02), ("sage", 0.05)])
def test_cuda_attention_with_lse(backend, bound):
    """What a ring step runs on a GPU, in bf16, against float32 on the CPU: the output within the
    kernel's tolerance (test_attention.py's bounds), the log-sum-exp within bf16 input rounding."""
    from hyvideo.attention import installed, split_backend

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not installed(split_backend(backend)[0]):
        pytest.skip(f"{backend} is not installed")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 300, 4, 128) for _ in range(3))
    expected, expected_lse = attention_with_lse(q, k, v)
    out, lse = attention_with_lse(*(t.cuda().bfloat16() for t in (q, k, v)), backend)
    assert float((out.float().cpu() - expected).norm() / expected.norm()) < bound
    torch.testing.assert_close(lse.float().cpu(), expected_lse, rtol=0, atol=0.05)


def _i2v_denoise(name: str, latent_hw: tuple[int, int], chunk: int, sequence_parallel=None) -> torch.Tensor:
    """Three Euler steps of an image-to-video DiT (`name`: token_replace or latent_concat) from the
    image's stability-mode initial latents, 3 latent frames of `latent_hw`, its per-token work in
    chunks of `chunk` tokens; this process's share of the tokens when `sequence_parallel` is given."""
    from hyvideo.pipeline import GenerationRequest, ImageCondition, denoise, image_initial_latents
    from hyvideo.text_encoder import TextEmbeddings

    model, _ = _model_and_inputs(name)
    model.token_chunk, model.sequence_parallel = chunk, sequence_parallel
    config, (h, w) = model.config, latent_hw
    g = torch.Generator().manual_seed(2)
    condition = ImageCondition(config.image_condition_type, torch.randn(1, 16, 1, h, w, generator=g))
    noise = torch.randn(1, 16, 3, h, w, generator=g)
    embeddings = TextEmbeddings(torch.randn(1, 9, config.text_states_dim, generator=g), torch.tensor([[1] * 6 + [0] * 3]),
                                torch.randn(1, config.text_states_dim_2, generator=g), [False], [False])
    request = GenerationRequest("", width=8 * w, height=8 * h, frames=9, steps=3, seed=0)
    return denoise(model, embeddings, image_initial_latents(noise, condition, True), request, "cpu", image=condition)


def _i2v_rank(rank: int, world: int, port: int, folder: str, name: str, latent_hw: tuple[int, int], chunk: int) -> None:
    from yunchang.globals import PROCESS_GROUP, set_seq_parallel_pg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layout = choose_layout("ulysses", world, DIT_CONFIGS[name].heads)
    set_seq_parallel_pg(layout.ulysses, layout.ring, rank, world)
    split = SequenceParallel(layout, rank, DIT_CONFIGS[name].patch_size, PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG)
    torch.save(_i2v_denoise(name, latent_hw, chunk, split), os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


# Latents of 6 x 8 (3 x 4 tokens: 3 rows do not halve, so each rank takes 2 columns: 6 tokens of
# every frame) or 8 x 12 (4 x 6 tokens: each rank 2 rows, 12 tokens of every frame); in 3 latent
# frames each rank's first-frame tokens are the first third of its shard, the boundary at 6 (12),
# inside a chunk of 4 (5) tokens (blocks.modulated_chunks cuts it there). latent_concat has no
# first-frame modulation: one split of its 33 channels.
I2V_CASES = [  # DiT, (latent h, w), token chunk, the split axis (2: columns)
    ("tiny-i2v-16ch", (6, 8), 4, 2),
    ("tiny-i2v-16ch", (8, 12), 5, 1),
    ("tiny-i2v-33ch", (6, 8), 4, 2),
]


@pytest.mark.parametrize("name, latent_hw, chunk, axis", I2V_CASES, ids=["token_replace-columns", "token_replace-rows",
                                                                        "latent_concat-columns"])
@pytest.mark.slow
def test_i2v_denoise_on_two_ranks_equals_one_process(tmp_path, name, latent_hw, chunk, axis):
    """Image-to-video's steps on 2 ranks (token_replace: the clean image frame and its t = 0
    modulation, only the later frames stepped; latent_concat: the 33-channel input, image and
    mask, split like the latents) give one process's latents on every rank, within the T2V --gpus
    runs' bound (tests/test_cli_multigpu.py: 1e-4 on final latents of about 4, float32, the ranks
    summing attention in another order each step; measured here 2e-7 to 5e-7, about 1 ulp). Under
    token_replace it fails if a rank took its first-frame tokens by global count (the first N / 3
    of its own tokens: two frames' worth) or by global position (rank 0 all of the first frame's
    tokens, rank 1 none): either puts the latents ~1e-1 off."""
    assert split_axis((3, latent_hw[0] // 2, latent_hw[1] // 2), 2) == axis
    fork_ranks(_i2v_rank, 2, free_port(), str(tmp_path), name, latent_hw, chunk)
    with torch.inference_mode():
        expected = _i2v_denoise(name, latent_hw, chunk)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected, rtol=0, atol=1e-4)


def _v15_model_and_inputs(image: bool, hw: tuple[int, int]):
    """The tiny HunyuanVideo-1.5 DiT (2 heads, patch 1) with random weights; 3 latent frames of `hw`
    tokens, Qwen and byT5 states with padding (dropped at batch 1), SigLIP states for image-to-video."""
    from hyvideo.v15_config import V15_DIT_CONFIGS
    from hyvideo.v15_dit import HunyuanVideo15DiT
    from tests.helpers import randomize_

    config = V15_DIT_CONFIGS["tiny"]
    model = HunyuanVideo15DiT(config).eval()
    randomize_(model, seed=1)
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(1, config.in_channels, 3, *hw, generator=g), torch.tensor([700.0]),
              torch.randn(1, 12, config.text_states_dim, generator=g), torch.tensor([[1] * 9 + [0] * 3]),
              torch.randn(1, 7, config.byt5_states_dim, generator=g), torch.tensor([[1] * 4 + [0] * 3]),
              torch.randn(1, 5, config.vision_states_dim, generator=g) if image else None)
    return model, inputs


def _v15_rank(rank: int, world: int, mode: str, port: int, folder: str, image: bool, hw: tuple[int, int]) -> None:
    from yunchang.globals import PROCESS_GROUP, set_seq_parallel_pg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, inputs = _v15_model_and_inputs(image, hw)
    layout = choose_layout(mode, world, model.config.heads)
    set_seq_parallel_pg(layout.ulysses, layout.ring, rank, world)
    model.sequence_parallel = SequenceParallel(layout, rank, model.config.patch_size, PROCESS_GROUP.ULYSSES_PG,
                                               PROCESS_GROUP.RING_PG)
    with torch.inference_mode():
        torch.save(model(*inputs), os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("mode, world, image, hw, axis", [
    ("ulysses", 2, False, (8, 10), 1),  # 8 token rows: 4 per rank
    ("ring", 2, True, (5, 8), 2),  # 5 rows do not halve: 4 columns per rank
    ("usp", 4, False, (8, 10), 1),  # Ulysses 2 x ring 2, 2 rows per rank
])
@pytest.mark.slow
def test_v15_split_forward_equals_one_process(tmp_path, mode, world, image, hw, axis):
    """HunyuanVideo-1.5's DiT (patch 1: a token per latent pixel) split the same ways, with its
    three kinds of text tokens (SigLIP for image-to-video, byT5, Qwen) on every rank, returns one
    process's velocity on every rank. Same bound and reasons as the 13B model's split forward above."""
    assert split_axis((3, *hw), world) == axis
    fork_ranks(_v15_rank, world, mode, free_port(), str(tmp_path), image, hw)
    model, inputs = _v15_model_and_inputs(image, hw)
    with torch.inference_mode():
        expected = model(*inputs)
    for rank in range(world):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected, rtol=0, atol=1e-5)
