"""Run folders: everything a generation needs to be resumed, bit-exactly, after any interruption.

    <runs-dir>/<id>/
      manifest.json                  settings, model fingerprint, versions, state, step k/N, checksums
                                     (and the rewritten prompt of a --rewrite run)
      embeddings.safetensors         text encoder outputs (a resume never reloads the text encoders)
      image_latent.safetensors       image-to-video: the conditioning image's scaled VAE latent (1.5: and its SigLIP states)
      latents-step0007.safetensors   latents after 7 of N Euler steps (the newest two are kept)
      cache-residual-step0006.safetensors  with a step cache: the residual of the last computed step
      final_latents.safetensors      latents after step N (a resume in "decoding" skips the DiT)
      video.mp4, first_frame.png     the outputs (image.png alone for a one-frame run)
      preview.webp                   with --preview: the latest step's predicted clip (lowvram/generation/preview.py)

States, in order: encoding -> denoising -> decoding -> done; "failed" records an error (the run can
still be resumed once the cause is fixed).

Why a resume is bit-exact: the initial noise is a pure function of the seed (CPU generator, facts
§5.4), each Euler step is a pure function of (latents, step index), and the latents are saved in
float32 exactly as they are between steps; the embeddings are saved in the dtype they were used in.

Crash safety: every file is written to a temp name, fsynced and renamed (atomic on POSIX), then the
folder is fsynced. A new checkpoint gets a new name; the manifest is switched to it atomically and
only then is the oldest one deleted. SIGKILL at any instant therefore leaves a manifest that points
at complete, checksummed files. Each file's sha256 is in the manifest and is checked when loaded;
a damaged newest checkpoint falls back to the one before it (or to the seed's noise).

With a step cache (hyvideo/step_cache.py) each checkpoint also holds the cache's state: the previous
step's latents in its file, the accumulated distance and the computed steps in its manifest entry,
and a reference to the residual file of the last computed step. A residual file is written once,
on the step that computed it, and shared by the checkpoints of the skipped steps after it; it is
deleted with the last checkpoint that refers to it, and all of them once the final latents are saved.
A checkpoint whose residual is damaged counts as damaged.

The manifest's settings are sealed by a sha256 (`settings_sha256`): a hand-edited manifest (other
steps, other prompt) would silently produce a different video than the one the run started, so it is
refused. An `fcntl` lock on the folder tells a live run from an interrupted one.
"""

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hyvideo.errors import HyVideoError
from hyvideo.files import write_atomic
from hyvideo.step_cache import CacheState
from hyvideo.text_encoder import TextEmbeddings
from hyvideo.v15_pipeline import V15Image, V15Prompt

try:
    import fcntl
except ImportError:  # not POSIX: runs work, a live run just cannot be detected
    fcntl = None

RUN_FORMAT = "hyvideo-lowvram-run"
RUN_VERSION = 1
STATES = ("encoding", "denoising", "decoding", "done", "failed")
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
V15_EMBEDDING_FIELDS = ("text_states", "text_mask", "byt5_states", "byt5_mask")  # hyvideo.v15_pipeline.V15Prompt's
IMAGE_LATENT = "image_latent.safetensors"
FINAL_LATENTS = "final_latents.safetensors"
VIDEO = "video.mp4"
FIRST_FRAME = "first_frame.png"
IMAGE = "image.png"  # the result of a one-frame run: HunyuanVideo is a joint image/video model
PREVIEW = "preview.webp"
LOCK = ".lock"
KEEP_CHECKPOINTS = 2  # the newest is what a resume uses; the one before covers a damaged newest
REQUIRED_KEYS = ("format", "version", "id", "settings", "settings_sha256", "model", "state", "step", "checkpoints")


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _slug(prompt: str, words: int = 4, length: int = 32) -> str:
    parts = re.findall(r"[a-z0-9]+", prompt.lower())[:words]
    return "-".join(parts)[:length].strip("-") or "run"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _files_of(checkpoint: dict) -> list[str]:
    """The files a checkpoint entry refers to: its latents, and its step cache's residual."""
    cache = checkpoint.get("cache")
    return [checkpoint["file"]] + ([cache["residual"]["file"]] if cache and "residual" in cache else [])


@dataclass
class Run:
    """One run folder and its manifest (a dict, written as JSON)."""

    folder: Path
    manifest: dict

    # --- creation and opening ------------------------------------------------------------------

    @classmethod
    def create(cls, runs_dir: Path, settings: dict, model: dict, versions: dict) -> "Run":
        runs_dir = Path(runs_dir)
        try:
            runs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise HyVideoError(f"cannot create the runs folder {runs_dir}: {error.strerror or error}; pass --runs-dir") from None
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(settings['prompt'])}"
        for n in range(1, 1000):
            run_id = base if n == 1 else f"{base}-{n}"
            try:
                (runs_dir / run_id).mkdir()
                break
            except FileExistsError:
                continue
            except OSError as error:
                raise HyVideoError(f"cannot create a run folder in {runs_dir}: {error.strerror or error}; pass --runs-dir") from None
        else:
            raise HyVideoError(f"too many runs named {base} in {runs_dir}")
        manifest = {
            "format": RUN_FORMAT, "version": RUN_VERSION, "id": run_id, "created": _now(), "updated": _now(),
            "settings": settings, "settings_sha256": settings_digest(settings), "model": model, "versions": versions,
            "state": "encoding", "step": 0, "checkpoints": [], "embeddings": None, "final_latents": None,
            "outputs": {}, "error": None, "truncated": None, "seconds": {},
        }
        run = cls(runs_dir / run_id, manifest)
        run.save()
        return run

    @classmethod
    def open(cls, folder: Path) -> "Run":
        """Read and validate a run folder; anything wrong is a HyVideoError saying what."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise HyVideoError(f"{folder} is not a lowvram run folder (no {MANIFEST}); `lowvram runs` lists the runs")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise HyVideoError(f"the manifest of run {folder.name} is corrupt ({error}); start a new run with `lowvram generate`") from None
        if not isinstance(manifest, dict) or manifest.get("format") != RUN_FORMAT:
            raise HyVideoError(f"{folder} is not a lowvram run folder ({MANIFEST} is not a run manifest)")
        if not isinstance(manifest.get("version"), int) or manifest["version"] > RUN_VERSION:
            raise HyVideoError(f"run {folder.name} was made by a newer lowvram (manifest version {manifest.get('version')}); upgrade")
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise HyVideoError(f"the manifest of run {folder.name} is corrupt (missing {', '.join(missing)}); start a new run")
        if manifest["state"] not in STATES:
            raise HyVideoError(f"the manifest of run {folder.name} is corrupt (unknown state {manifest['state']!r}); start a new run")
        if settings_digest(manifest["settings"]) != manifest["settings_sha256"]:
            raise HyVideoError(
                f"the settings in {path} were changed after run {folder.name} started (checksum mismatch), so resuming "
                "would not give the video it began; start a new run with `lowvram generate` instead"
            )
        rewritten = manifest.get("rewritten_prompt")
        if rewritten and sha256_bytes(str(rewritten.get("text")).encode()) != rewritten.get("sha256"):
            raise HyVideoError(
                f"the rewritten prompt in {path} was changed after run {folder.name} rewrote it (checksum mismatch); "
                "start a new run with `lowvram generate` instead"
            )
        return cls(folder, manifest)

    # --- properties ----------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def state(self) -> str:
        return self.manifest["state"]

    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def steps(self) -> int:
        return self.settings["steps"]

    @property
    def finished(self) -> bool:
        return self.state == "done"

    @property
    def preview_file(self) -> Path | None:
        """The live preview, once a --preview run has written one."""
        path = self.folder / PREVIEW
        return path if path.is_file() else None

    @property
    def result_file(self) -> Path:
        """The run's result in its folder: image.png for one frame, else video.mp4."""
        return self.folder / (IMAGE if self.settings["frames"] == 1 else VIDEO)

    # --- manifest --------------------------------------------------------------------------------

    def save(self) -> None:
        self.manifest["updated"] = _now()
        write_atomic(self.folder / MANIFEST, json.dumps(self.manifest, indent=1).encode(), "the run manifest")

    def set_state(self, state: str, error: str | None = None) -> None:
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        self.manifest["state"] = state
        self.manifest["error"] = error
        self.save()

    def record_failure(self, error: str) -> None:
        """Best effort: the failure may be the disk itself."""
        try:
            self.set_state("failed", error)
        except HyVideoError:
            pass

    # --- files with checksums -------------------------------------------------------------------

    def _write_checked(self, name: str, tensors: dict, what: str) -> dict:
        data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        write_atomic(self.folder / name, data, what)
        return {"file": name, "sha256": sha256_bytes(data)}

    def _read_checked(self, entry: dict | None) -> dict | None:
        """The tensors of a file the manifest lists, or None if missing or not matching its sha256."""
        if not entry:
            return None
        try:
            data = (self.folder / entry["file"]).read_bytes()
        except OSError:
            return None
        if sha256_bytes(data) != entry.get("sha256"):
            return None
        return st_load(data)

    def save_embeddings(self, embeddings: TextEmbeddings) -> None:
        tensors = {"text_states": embeddings.text_states, "text_mask": embeddings.text_mask, "text_states_2": embeddings.text_states_2}
        self.manifest["embeddings"] = self._write_checked(EMBEDDINGS, tensors, "the text embeddings")
        self.manifest["truncated"] = {"llm": bool(any(embeddings.truncated)), "clip": bool(any(embeddings.truncated_2))}
        self.save()

    def load_embeddings(self) -> TextEmbeddings | None:
        tensors = self._read_checked(self.manifest.get("embeddings"))
        if tensors is None:
            return None
        flags = self.manifest.get("truncated") or {}
        return TextEmbeddings(tensors["text_states"], tensors["text_mask"], tensors["text_states_2"],
                              [bool(flags.get("llm"))], [bool(flags.get("clip"))])

    def save_v15_embeddings(self, prompt: V15Prompt, negative: V15Prompt | None) -> None:
        """HunyuanVideo-1.5: the prompt's Qwen2.5-VL and byT5 states, and the negative prompt's
        under real CFG, in the same checked file as the 13B model's embeddings."""
        tensors = {}
        for prefix, encoded in (("", prompt), ("negative_", negative)):
            if encoded is not None:
                tensors |= {prefix + name: getattr(encoded, name).contiguous() for name in V15_EMBEDDING_FIELDS}
        self.manifest["embeddings"] = self._write_checked(EMBEDDINGS, tensors, "the text embeddings")
        self.save()

    def load_v15_embeddings(self) -> tuple[V15Prompt, V15Prompt | None] | None:
        tensors = self._read_checked(self.manifest.get("embeddings"))
        if tensors is None:
            return None
        prompt = V15Prompt(*(tensors[name] for name in V15_EMBEDDING_FIELDS))
        negative = V15Prompt(*(tensors["negative_" + name] for name in V15_EMBEDDING_FIELDS)) if "negative_text_states" in tensors else None
        return prompt, negative

    def save_image_latent(self, latent: torch.Tensor) -> None:
        """Image-to-video: the image's latent, so a resume never reloads the VAE before denoising."""
        self.manifest["image_latent"] = self._write_checked(IMAGE_LATENT, {"latent": latent}, "the image latent")
        self.save()

    def load_image_latent(self) -> torch.Tensor | None:
        tensors = self._read_checked(self.manifest.get("image_latent"))
        return None if tensors is None else tensors["latent"]

    def save_v15_image(self, image: V15Image) -> None:
        """HunyuanVideo-1.5 image-to-video: the image's scaled VAE latents and SigLIP states, so a
        resume never loads SigLIP or the VAE before denoising (and denoises from the same tensors)."""
        tensors = {"latent": image.latents.contiguous(), "vision_states": image.vision_states.contiguous()}
        self.manifest["image_latent"] = self._write_checked(IMAGE_LATENT, tensors, "the image latent")
        self.save()

    def load_v15_image(self) -> V15Image | None:
        tensors = self._read_checked(self.manifest.get("image_latent"))
        if tensors is None or "vision_states" not in tensors:
            return None
        return V15Image(tensors["latent"], tensors["vision_states"])

    def save_rewritten_prompt(self, prompt: str) -> None:
        """--rewrite's result, kept so that a resume encodes the same prompt without rewriting."""
        self.manifest["rewritten_prompt"] = {"text": prompt, "sha256": sha256_bytes(prompt.encode())}
        self.save()

    @property
    def rewritten_prompt(self) -> str | None:
        entry = self.manifest.get("rewritten_prompt")
        return entry["text"] if entry else None

    def save_step(self, step: int, latents: torch.Tensor, cache: CacheState | None = None) -> None:
        """Checkpoint the float32 latents after `step` completed Euler steps (1..N), with the step
        cache's state when there is one. If this fails (disk full), the previous checkpoint and the
        manifest pointing at it are untouched."""
        name = f"latents-step{step:04d}.safetensors"
        if step == self.steps:
            cache = None  # after the last step only the latents matter
        tensors = {"latents": latents}
        if cache is not None and cache.previous_latents is not None:  # TeaCache's (DeepCache keeps none)
            tensors["cache_previous_latents"] = cache.previous_latents
        try:
            entry = self._write_checked(name, tensors, f"the step {step} checkpoint")
            if cache is not None:
                entry["cache"] = self._cache_entry(cache)
        except HyVideoError as error:
            raise HyVideoError(f"{error}; {self._kept_hint()}") from None
        entry["step"] = step
        older = [c for c in self.manifest["checkpoints"] if c["step"] != step]
        kept = older[max(0, len(older) - (KEEP_CHECKPOINTS - 1)):] + [entry]
        dropped = [c for c in self.manifest["checkpoints"] if c not in kept]
        previous = self.manifest["checkpoints"], self.manifest["step"]
        self.manifest["checkpoints"], self.manifest["step"] = kept, step
        try:
            self.save()
        except HyVideoError as error:  # the manifest on disk still points at the previous checkpoint
            self.manifest["checkpoints"], self.manifest["step"] = previous
            raise HyVideoError(f"{error}; {self._kept_hint()}") from None
        in_use = {f for c in kept for f in _files_of(c)}
        for old in dropped:  # only once the manifest no longer points at them
            for file in _files_of(old):
                if file not in in_use:
                    (self.folder / file).unlink(missing_ok=True)

    def _cache_entry(self, cache: CacheState) -> dict:
        """The manifest part of the cache state; writes the residual unless a kept checkpoint has it
        (DeepCache has none before its first cached step)."""
        entry = {"accumulated": cache.accumulated, "computed": list(cache.computed), "residual_step": cache.residual_step,
                 **({"split": cache.split} if cache.split is not None else {})}
        if cache.residual is None:
            return entry
        residual_name = f"cache-residual-step{cache.residual_step:04d}.safetensors"
        residual = next((c["cache"]["residual"] for c in self.manifest["checkpoints"]
                         if c.get("cache", {}).get("residual", {}).get("file") == residual_name), None)
        if residual is None:
            residual = self._write_checked(residual_name, {"residual": cache.residual}, "the step cache's residual")
        return {**entry, "residual": residual}

    def _kept_hint(self) -> str:
        step = self.manifest["checkpoints"][-1]["step"] if self.manifest["checkpoints"] else 0
        return f"the run is kept at step {step}/{self.steps}: free some space, then `lowvram resume {self.id}`"

    def latest_latents(self) -> tuple[int, torch.Tensor | None, CacheState | None, list[str]]:
        """(completed steps, latents or None for "start from the seed's noise", the step cache's
        state saved with them or None, warnings). Checks each checkpoint's sha256 (and its
        residual's), newest first, and falls back past damaged ones."""
        warnings = []
        for entry in reversed(self.manifest["checkpoints"]):
            tensors = self._read_checked(entry)
            cache = entry.get("cache")
            residual = self._read_checked(cache["residual"]) if cache and "residual" in cache else None
            if tensors is not None and "latents" in tensors and (not cache or "residual" not in cache or residual is not None):
                state = None
                if cache:
                    state = CacheState(cache["accumulated"], list(cache["computed"]), tensors.get("cache_previous_latents"),
                                       residual["residual"] if residual else None, cache["residual_step"], cache.get("split"))
                return entry["step"], tensors["latents"], state, warnings
            warnings.append(f"checkpoint {entry['file']} is missing or damaged (checksum mismatch); using an earlier one")
        if self.manifest["checkpoints"]:
            warnings.append("no intact latents checkpoint: denoising restarts from step 0 (same seed, same result)")
        return 0, None, None, warnings

    def save_final(self, latents: torch.Tensor) -> None:
        """The final latents; the step cache's residuals (0.73 GB each at 720p) go with them: the
        last checkpoint, which has the same latents, needs none."""
        self.manifest["final_latents"] = self._write_checked(FINAL_LATENTS, {"latents": latents}, "the final latents")
        caches = [c.pop("cache") for c in self.manifest["checkpoints"] if "cache" in c]
        residuals = [cache["residual"]["file"] for cache in caches if "residual" in cache]
        self.save()
        for file in residuals:
            (self.folder / file).unlink(missing_ok=True)

    def load_final(self) -> torch.Tensor | None:
        tensors = self._read_checked(self.manifest.get("final_latents"))
        return None if tensors is None else tensors["latents"]

    def remove_stray_files(self) -> None:
        """Temp files and checkpoints the manifest does not point at (left by a killed process)."""
        listed = {f for c in self.manifest["checkpoints"] for f in _files_of(c)}
        for path in self.folder.iterdir():
            if path.name.startswith(".") and ".tmp-" in path.name:
                path.unlink(missing_ok=True)
            elif path.name.startswith(("latents-step", "cache-residual-step")) and path.name not in listed:
                path.unlink(missing_ok=True)

    # --- liveness --------------------------------------------------------------------------------

    def lock(self):
        """Take the run's lock for this process (released by the kernel when the process dies).
        Returns the open lock file (keep it); HyVideoError if another process holds it."""
        handle = open(self.folder / LOCK, "a+")
        if fcntl is None:
            return handle
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise HyVideoError(f"run {self.id} is running in another process; wait for it or stop it first") from None
        return handle

    def is_running(self) -> bool:
        if fcntl is None or not (self.folder / LOCK).exists():
            return False
        with open(self.folder / LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False


# --- finding runs ------------------------------------------------------------------------------


@dataclass
class RunEntry:
    """One folder under the runs dir, for `lowvram runs`: the Run, or why it cannot be read."""

    folder: Path
    run: Run | None
    problem: str | None = None

    @property
    def id(self) -> str:
        return self.run.id if self.run else self.folder.name

    def summary(self) -> dict:
        """One row of `lowvram runs` (also its --json output)."""
        run = self.run
        if run is None:
            return {"id": self.id, "prompt": None, "size": None, "step": None, "steps": None, "state": "unreadable",
                    "running": False, "output": None, "preview": None, "folder": str(self.folder), "problem": self.problem}
        s = run.settings
        output = (run.manifest.get("outputs") or {}).get("out") or run.result_file
        return {"id": run.id, "prompt": s["prompt"], "size": f"{s['width']}x{s['height']}x{s['frames']}",
                "step": run.step, "steps": run.steps, "state": run.state,
                "running": run.state != "done" and run.is_running(), "output": str(output) if run.finished else None,
                "preview": str(run.preview_file) if run.preview_file else None,
                "folder": str(run.folder), "seed": s["seed"], "profile": s["profile"]["name"],
                "created": run.manifest.get("created"), "error": run.manifest.get("error"),
                "rewritten_prompt": run.rewritten_prompt, "input_image": s.get("image")}


def list_runs(runs_dir: Path) -> list[RunEntry]:
    """Every folder in `runs_dir` holding a manifest, oldest first (run ids start with the time)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    entries = []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if not (folder / MANIFEST).exists():
            continue
        try:
            entries.append(RunEntry(folder, Run.open(folder)))
        except HyVideoError as error:
            entries.append(RunEntry(folder, None, str(error)))
    entries.sort(key=lambda e: (e.run.manifest.get("created", "") if e.run else "", e.folder.name))
    return entries


def find_run(runs_dir: Path, ref: str | None) -> Run:
    """A run by id, unique id prefix, or folder path; without `ref`, the newest unfinished run."""
    runs_dir = Path(runs_dir)
    if ref is None:
        unfinished = [e.run for e in list_runs(runs_dir) if e.run is not None and not e.run.finished]
        if not unfinished:
            raise HyVideoError(f"no unfinished run in {runs_dir}; `lowvram runs --runs-dir DIR` lists runs")
        return unfinished[-1]
    if Path(ref).is_dir() and (Path(ref) / MANIFEST).exists():
        return Run.open(Path(ref))
    if (runs_dir / ref).is_dir():
        return Run.open(runs_dir / ref)
    matches = sorted(p for p in runs_dir.glob(f"{glob_escape(ref)}*") if p.is_dir()) if runs_dir.is_dir() else []
    if len(matches) == 1:
        return Run.open(matches[0])
    if len(matches) > 1:
        raise HyVideoError(f"{ref!r} matches {len(matches)} runs ({', '.join(p.name for p in matches[:3])}, ...); give more of the id")
    if Path(ref).is_dir():
        return Run.open(Path(ref))  # a folder without a manifest: says it is not a run folder
    raise HyVideoError(f"no run {ref!r} in {runs_dir}; `lowvram runs` lists the runs")


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)
