"""Progress as the user sees it: rich rows on a terminal, plain lines in a log, Ctrl-C that
finishes the step, and the result of a run (paths, or one JSON object)."""

import signal
from contextlib import contextmanager

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lowvram.progress import Reporter

from .app import EXIT_INTERRUPTED, err, out, print_json, quiet_libraries, user_errors


class RichReporter(Reporter):
    """Stages as rows: a spinner for loading, a bar with s/step, ETA and peak VRAM for steps; one
    plain line per stage and per step when stderr is a file or a pipe (a log of an hour-long run);
    nothing but warnings when not `enabled`."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.warnings: list[str] = []
        self.lines = enabled and not err.is_terminal
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), TimeElapsedColumn(),
            console=err, disable=not enabled or self.lines,
        )
        self.task = None
        self.step_times: list[float] = []
        self.clip_label = ""  # "clip 2/6 " in a batch
        self.batch_steps_left = None  # a batch's denoising steps left when this clip's stage began
        self.first_step = 0

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self._finish()
        self.progress.stop()

    def _finish(self):
        if self.task is not None:
            task = self.progress.tasks[-1]
            if task.total is None:
                self.progress.update(self.task, total=1, completed=1)
            self.progress.stop_task(self.task)

    def stage(self, name, total=None, completed=0):
        self._finish()
        self.first_step = completed
        self.task = self.progress.add_task(self.clip_label + name, total=total, completed=completed, info="")
        if self.lines:
            err.print(f"{self.clip_label}{name}" + (f" ({completed}/{total} done)" if total and completed else ""))

    def preview(self, path):
        if self.enabled:
            self.progress.console.print(f"preview (after every step): {escape(path)}")

    def clip(self, number, total, run_id, steps_left):
        self.clip_label = f"clip {number}/{total} "
        self.batch_steps_left = steps_left
        if self.lines:
            err.print(f"clip {number}/{total}: run {run_id}")

    def advance(self, completed, total=None, s_per_step=None, peak_vram_gb=None, dit_steps=None, **info):
        parts = []
        if s_per_step is not None:
            parts.append(f"{s_per_step:.2f} s/step")
            self.step_times.append(s_per_step)
        if dit_steps is not None:  # a step cache: steps whose blocks ran vs reused
            parts.append(f"DiT ran {dit_steps}, reused {completed - dit_steps}")
        if peak_vram_gb is not None:
            parts.append(f"peak VRAM {peak_vram_gb:.1f} GiB")
        if self.batch_steps_left is not None and s_per_step is not None:  # the whole batch's denoising
            left = (self.batch_steps_left - (completed - self.first_step)) * sum(self.step_times) / len(self.step_times)
            parts.append(f"batch eta {int(left // 60)}:{int(left % 60):02d}")
        update = {"completed": completed, "info": "  ".join(parts)}
        if total is not None:
            update["total"] = total
        self.progress.update(self.task, **update)
        task = self.progress.tasks[-1]
        if self.lines and s_per_step is not None and task.total:
            left = (task.total - completed) * sum(self.step_times) / len(self.step_times)
            err.print(f"  step {completed}/{task.total}  {'  '.join(parts)}  eta {int(left // 60)}:{int(left % 60):02d}")

    def rewritten(self, prompt):
        if self.enabled:
            self.progress.console.print(f"[cyan]rewritten prompt:[/] {escape(prompt)}")

    def warn(self, message):
        if message in self.warnings:  # e.g. the same attention fallback for every clip of a batch
            return
        self.warnings.append(message)
        self.progress.console.print(f"[yellow]warning:[/] {escape(message)}")


@contextmanager
def sigint_saves(stop):
    """First Ctrl-C while denoising: finish the step, save, stop. Otherwise: stop at once."""

    def handler(signum, frame):
        if stop.on_sigint():  # raises KeyboardInterrupt when not deferring
            err.print("\n[yellow]stopping after this step[/] (Ctrl-C again to stop now; the last saved step is kept)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_and_report(work, as_json: bool, quiet: bool):
    """Run `work(reporter, stop)` -> RunResult with progress, Ctrl-C and error handling."""
    from lowvram.generation.ranks import leave_ranks
    from lowvram.generation.runner import RunInterrupted, StopRequest

    quiet_libraries()
    stop = StopRequest()
    reporter = RichReporter(enabled=not (as_json or quiet))
    try:
        with user_errors(as_json), sigint_saves(stop), reporter:
            result = work(reporter, stop)
    except RunInterrupted as stopped:
        run = stopped.run
        message = f"stopped at step {run.step}/{run.steps} ({run.state}); continue with: {stopped.resume}"
        if as_json:
            print_json({"ok": False, "interrupted": True, "run_id": run.id, "step": run.step, "steps": run.steps,
                         "resume": stopped.resume})
        err.print(f"[yellow]{escape(message)}[/]")
        raise typer.Exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted before the run started; nothing to resume[/]")
        raise typer.Exit(EXIT_INTERRUPTED)
    finally:
        leave_ranks()  # rank 0 of several: the followers stop with it, whatever happened
    report_result(result, reporter.warnings, as_json, quiet)
    return result


def report_result(result, warnings, as_json, quiet):
    from lowvram.generation.batch import BatchResult

    if isinstance(result, BatchResult):
        report_batch(result, warnings, as_json, quiet)
    elif as_json:
        print_json({"ok": True, **result.to_dict(), "warnings": warnings})
    elif quiet:
        out.print(result.out or result.image or result.video, markup=False)
    else:
        if result.resumed_from == "done":
            err.print(f"run {result.run_id} is already done")
        else:
            seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
            err.print(f"[green]done[/] run {result.run_id}" + (f" ({seconds})" if seconds else ""))
        if result.image:
            out.print(f"image: {result.image}", markup=False)
        else:
            out.print(f"video: {result.video}", markup=False)
            out.print(f"first frame: {result.first_frame}", markup=False)
        if result.out:
            out.print(f"copied to: {result.out}", markup=False)


def report_batch(result, warnings, as_json, quiet):
    """A batch (or `resume --all`): one line per run, its video's path on stdout."""
    if as_json:
        print_json({"ok": True, **result.to_dict(), "warnings": warnings})
        return
    if not quiet:
        done = sum(r.resumed_from == "done" for r in result.runs)
        name = f"batch {result.batch_id}" if result.batch_id else "resume --all"
        err.print(f"[green]done[/] {escape(name)}: {len(result.runs)} runs" + (f" ({done} were already done)" if done else ""))
    for run in result.runs:
        out.print(run.out or run.video if quiet else f"{run.run_id}: {run.out or run.video}", markup=False)
