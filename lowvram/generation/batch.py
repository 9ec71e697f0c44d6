"""Many clips in one invocation (prompts x seeds), the models loaded once for all of them.

    clips = read_prompts(Path("prompts.jsonl"), defaults, seeds=[1, 2])  # bad line -> HyVideoError naming it
    batch, runs, files, plan = start_batch(options, clips, reporter)      # every check, then the run folders
    result = execute_batch(batch, runs, files, plan, reporter, stop)      # encode all, denoise all, decode all
    result = resume_batch(runs_dir, "batch-20250101-120000", reporter=reporter, stop=stop)

Each clip is an ordinary run folder (lowvram/generation/run_folder.py), with the settings and manifest a single
`generate` of that clip would write: it resumes alone (`lowvram resume ID`) or with its batch, and
its result is bit-identical to running it alone. The batch itself is one small file beside them,
`<runs-dir>/<batch id>.batch.json`: the runs in order, the prompt-file line each came from, and
their states when the batch last stopped or finished (the run folders are the truth; `lowvram
runs` reads those).

Prompt files: one prompt per line, or one JSON object per line with overrides of the command's
options, e.g. {"prompt": "a fox", "seed": 3, "size": "960x544", "frames": 261, "steps": 30,
"riflex": "off"} (with I2V weights also "image": "a.png", relative to the working folder). Blank
lines and lines starting with # are skipped. Each line gives one clip per seed of --seeds, or one
clip with its own "seed". Every line is checked before any run folder is made or model loaded.

One profile for the whole batch: the one chosen (or given) for its largest clip, since one DiT is
loaded; with `--profile auto` a smaller clip may therefore run with a smaller card's profile than
it would alone. The DiT is placed once by the largest clip's plan (runner.execute_runs says why
that fits every clip and changes no result).
"""

import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from hyvideo.errors import HyVideoError
from hyvideo.files import write_atomic
from hyvideo.pipeline import GenerationRequest, riflex_choice, validate_request
from lowvram.profiles import Overrides
from lowvram.progress import Reporter
from lowvram.sizes import resolve_size

from .preflight import RunOptions, plan_for_run, prepare_run, resumable_files, versions
from .run_folder import Run, RunEntry, glob_escape, list_runs
from .runner import RunInterrupted, RunResult, StopRequest, done_result, execute_runs, is_done, resume_run

BATCH_FORMAT = "hyvideo-lowvram-batch"
BATCH_SUFFIX = ".batch.json"
# What a JSON line may set: the prompt and the options of `generate` that change one clip.
MODEL_DEFAULTS = ("steps", "guidance", "flow_shift", "frames", "size")  # what a HunyuanVideo-1.5 model fills where unset
LINE_KEYS = {"prompt": str, "seed": int, "size": str, "resolution": str, "aspect": str, "frames": int, "steps": int,
             "guidance": float, "flow_shift": float, "riflex": str, "image": str}
KIND_NAMES = {str: "a text", int: "a whole number", float: "a number"}


@dataclass
class Clip:
    request: GenerationRequest
    line: int | None = None  # the prompt file's line (1-based); None for a prompt given on the command line
    given: frozenset = frozenset()  # what its line set of MODEL_DEFAULTS ("size": size, resolution or aspect)


# --- clips -------------------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """"1,2,3" / "10..19" (both ends included) / "1,5..7" -> the seeds, in order."""
    seeds = []
    try:
        for part in text.replace(" ", "").split(","):
            first, _, last = part.partition("..")
            seeds += list(range(int(first), int(last) + 1)) if last else [int(first)]
    except ValueError:
        raise HyVideoError(f"--seeds must be numbers like 1,2,3 or a range like 10..19; got {text!r}") from None
    if not seeds:
        raise HyVideoError(f"--seeds {text!r} is an empty range; write the smaller number first, e.g. 10..19")
    return seeds


def clips_for(prompt: str, defaults: GenerationRequest, seeds: list[int] | None, line: int | None = None,
              overrides: dict | None = None) -> list[Clip]:
    """One prompt's clips: `defaults` (the command's options) with the line's overrides, one clip per
    seed (the line's own seed, else each of `seeds`, else the defaults' seed, else a random one)."""
    overrides = dict(overrides or {})
    size = {k: overrides.pop(k) for k in ("size", "resolution", "aspect") if k in overrides}
    if "riflex" in overrides:  # "auto" | "on" | "off", as --riflex
        overrides["riflex"] = riflex_choice(overrides["riflex"])
    given = frozenset({*(name for name in overrides if name in MODEL_DEFAULTS), *(["size"] if size else [])})
    request = replace(defaults, prompt=prompt, **overrides)
    if size or "image" in overrides:  # a line's own image takes its own bucket, as `generate --image` would
        width, height = resolve_size(size.get("size"), size.get("resolution"), size.get("aspect"), request.image)
        request = replace(request, width=width, height=height)
    validate_request(request)
    if "seed" in overrides or seeds is None:
        seeds = [request.seed if request.seed is not None else random.randint(0, 1_000_000)]
    return [Clip(replace(request, seed=seed), line, given) for seed in seeds]


def read_prompts(path: Path, defaults: GenerationRequest, seeds: list[int] | None = None) -> list[Clip]:
    """The clips of a prompt file (see the module docstring). A bad line is a HyVideoError
    "<file> line N: what is wrong"."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise HyVideoError(f"cannot read --prompts {path}: {getattr(error, 'strerror', None) or error}") from None
    clips = []
    for number, text in enumerate(lines, 1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        try:
            prompt, overrides = parse_line(text)
            clips += clips_for(prompt, defaults, seeds, number, overrides)
        except HyVideoError as error:
            raise HyVideoError(f"{Path(path).name} line {number}: {error}") from None
    if not clips:
        raise HyVideoError(f"{path} has no prompts: write one prompt per line (or one JSON object per line)")
    return clips


def parse_line(text: str) -> tuple[str, dict]:
    """A prompt file's line -> (prompt, overrides)."""
    if not text.startswith("{"):
        return text, {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise HyVideoError(f"not valid JSON ({error.msg} at column {error.colno}); a line is a prompt, "
                           'or a JSON object like {"prompt": "..."}') from None
    if not isinstance(values, dict) or not isinstance(values.get("prompt"), str):
        raise HyVideoError('a JSON line needs a "prompt" text, e.g. {"prompt": "a red fox", "seed": 3}')
    for key, value in values.items():
        kind = LINE_KEYS.get(key)
        if kind is None:
            raise HyVideoError(f"unknown key {key!r}; a line may set {', '.join(LINE_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise HyVideoError(f"{key} must be {KIND_NAMES[kind]}, not {json.dumps(value)}")
        values[key] = kind(value)  # 6 -> 6.0: the settings a single run would store
    return values.pop("prompt"), values


# --- the batch manifest ---------------------------------------------------------------------------


@dataclass
class Batch:
    """`<runs-dir>/<id>.batch.json`: the batch's runs in order and their last known states."""

    path: Path
    id: str
    created: str
    source: str | None  # the prompt file
    runs: list[dict] = field(default_factory=list)  # {"id", "line", "state"}

    @classmethod
    def create(cls, runs_dir: Path, source: str | None, runs: list[Run], lines: list[int | None]) -> "Batch":
        base = f"batch-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in range(1, 1000):
            batch_id = base if n == 1 else f"{base}-{n}"
            path = Path(runs_dir) / f"{batch_id}{BATCH_SUFFIX}"
            try:
                path.open("x").close()  # claims the id; the content is written atomically below
                break
            except FileExistsError:
                continue
        else:
            raise HyVideoError(f"too many batches named {base} in {runs_dir}")
        entries = [{"id": run.id, "line": line, "state": run.state} for run, line in zip(runs, lines)]
        batch = cls(path, batch_id, time.strftime("%Y-%m-%dT%H:%M:%S%z"), source, entries)
        batch.save()
        return batch

    @classmethod
    def open(cls, path: Path) -> "Batch":
        try:
            values = json.loads(Path(path).read_text())
            if values.get("format") != BATCH_FORMAT:
                raise ValueError("not a batch manifest")
            return cls(Path(path), values["id"], values["created"], values["source"], values["runs"])
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise HyVideoError(f"{path} is not a readable batch manifest ({error}); its runs can still be resumed one by one") from None

    def save(self) -> None:
        values = {"format": BATCH_FORMAT, "version": 1, **{k: v for k, v in asdict(self).items() if k != "path"}}
        write_atomic(self.path, json.dumps(values, indent=1, default=str).encode(), "the batch manifest")

    def record(self, runs: list[Run]) -> None:
        """Note the states of `runs` (best effort: the run folders are the truth)."""
        states = {run.id: run.state for run in runs}
        for entry in self.runs:
            entry["state"] = states.get(entry["id"], entry["state"])
        try:
            self.save()
        except HyVideoError:
            pass


def list_batches(runs_dir: Path) -> list[Batch]:
    """The batches in `runs_dir`, oldest first (unreadable batch files are left out)."""
    batches = []
    for path in sorted(Path(runs_dir).glob(f"*{BATCH_SUFFIX}")) if Path(runs_dir).is_dir() else []:
        try:
            batches.append(Batch.open(path))
        except HyVideoError:
            continue
    return batches


def find_batch(runs_dir: Path, ref: str) -> Batch:
    """A batch by id or unique id prefix."""
    matches = sorted(Path(runs_dir).glob(f"{glob_escape(ref)}*{BATCH_SUFFIX}")) if Path(runs_dir).is_dir() else []
    exact = Path(runs_dir) / f"{ref}{BATCH_SUFFIX}"
    if exact in matches or len(matches) == 1:
        return Batch.open(exact if exact in matches else matches[0])
    if matches:
        raise HyVideoError(f"{ref!r} matches {len(matches)} batches; give more of the id")
    raise HyVideoError(f"no batch {ref!r} in {runs_dir}; `lowvram runs` lists the batches")


def group_runs(runs_dir: Path) -> list[tuple[Batch | None, list[RunEntry]]]:
    """`lowvram runs`: each batch with its runs (in the batch's order), then the runs of no batch."""
    entries = {entry.id: entry for entry in list_runs(runs_dir)}
    groups = []
    for batch in list_batches(runs_dir):
        members = [entries.pop(e["id"]) for e in batch.runs if e["id"] in entries]
        if members:
            groups.append((batch, members))
    return groups + ([(None, list(entries.values()))] if entries else [])


# --- running ------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    batch_id: str
    manifest: str
    runs: list[RunResult]

    def to_dict(self) -> dict:
        return {"batch_id": self.batch_id, "manifest": self.manifest, "runs": [r.to_dict() for r in self.runs]}


def sampling_given(options: RunOptions, clip: Clip) -> frozenset:
    """What the user set of MODEL_DEFAULTS for one clip, on the command line or on its line (a
    HunyuanVideo-1.5 transformer's own defaults fill the rest, `preflight.v15_request`)."""
    return options.sampling_given | clip.given


def start_batch(options: RunOptions, clips: list[Clip], reporter: Reporter | None = None, source: Path | None = None):
    """Every check of every clip, then one run folder per clip and the batch manifest.
    `options`: what the clips share (its request is replaced by each clip's). Returns
    (batch, runs, files, plan of the largest clip)."""
    out = options.out
    if out is not None and len(clips) > 1 and not Path(out).is_dir():
        raise HyVideoError(f"--out {out}: a batch copies each video into a folder as <run id>.mp4; give an existing folder")
    largest = max(clips, key=lambda c: c.request.width * c.request.height * c.request.frames)
    _, _, files, plan = prepare_run(replace(options, request=largest.request,
                                            sampling_given=sampling_given(options, largest)), reporter)
    settled = replace(options, profile=plan.profile, overrides=Overrides())  # the overrides are in plan.profile now
    prepared = [prepare_run(replace(settled, request=clip.request, sampling_given=sampling_given(settled, clip)), reporter)
                for clip in clips]
    runs = [Run.create(Path(options.runs_dir), settings, model, versions()) for settings, model, _, _ in prepared]
    batch = Batch.create(options.runs_dir, str(Path(source).resolve()) if source else None, runs, [clip.line for clip in clips])
    return batch, runs, files, prepared[clips.index(largest)][3]


def execute_batch(batch: Batch, runs: list[Run], files, plan, reporter: Reporter | None = None,
                  stop: StopRequest | None = None) -> BatchResult:
    """Run `runs` of `batch` stage by stage (runner.execute_runs); Ctrl-C says `resume --batch`."""
    try:
        results = execute_runs(runs, files, plan, reporter, stop)
    except RunInterrupted as stopped:
        stopped.resume = f"lowvram resume --batch {batch.id}"
        raise
    finally:
        batch.record(runs)
    return BatchResult(batch.id, str(batch.path), results)


def resume_batch(runs_dir: Path, ref: str, model_dir: Path | None = None, reporter: Reporter | None = None,
                 stop: StopRequest | None = None) -> BatchResult:
    """Continue every unfinished run of a batch, stage by stage; each gives what it would alone."""
    reporter = reporter or Reporter()
    batch = find_batch(runs_dir, ref)
    runs = []
    for entry in batch.runs:
        folder = Path(runs_dir) / entry["id"]
        if not folder.is_dir():
            reporter.warn(f"run {entry['id']} of batch {batch.id} is no longer in {runs_dir}; skipping it")
            continue
        runs.append(Run.open(folder))
    unfinished = [run for run in runs if not is_done(run)]
    results = {run.id: done_result(run) for run in runs if is_done(run)}
    if unfinished:
        for run in unfinished:  # each run's weights checked (a batch's runs share its model folder)
            files = resumable_files(run, model_dir, reporter)
        largest = max(unfinished, key=lambda r: r.settings["width"] * r.settings["height"] * r.settings["frames"])
        done = execute_batch(batch, unfinished, files, plan_for_run(largest, files), reporter, stop)
        results.update({r.run_id: r for r in done.runs})
    return BatchResult(batch.id, str(batch.path), [results[run.id] for run in runs])


def resume_all(runs_dir: Path, model_dir: Path | None = None, reporter: Reporter | None = None,
               stop: StopRequest | None = None) -> list[RunResult]:
    """Every unfinished run in `runs_dir`: each batch's together, then the others one by one."""
    results = []
    for batch, entries in group_runs(runs_dir):
        unfinished = [e.run for e in entries if e.run is not None and not is_done(e.run)]
        if not unfinished:
            continue
        if batch is not None:
            results += resume_batch(runs_dir, batch.id, model_dir, reporter, stop).runs
        else:
            results += [resume_run(runs_dir, run.id, model_dir, reporter, stop) for run in unfinished]
    if not results:
        raise HyVideoError(f"no unfinished run in {runs_dir}; `lowvram runs --runs-dir DIR` lists runs")
    return results
