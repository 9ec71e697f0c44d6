"""`lowvram`: HunyuanVideo text-to-video from the terminal, on one 16-24 GB GPU, with resumable runs.

    lowvram generate "a red fox running through snow" --resolution 720p --aspect 16:9
    lowvram resume                       # the newest unfinished run
    lowvram runs | plan | profiles | bench | doctor | download | quantize | demo

This package only parses arguments and draws (and is the only code that prints): the work is in
lowvram/ (the engine; generation/: runner, run folders, bench; setup/: download, doctor), which returns data and reports
progress through callbacks. User errors (`HyVideoError`) print one line and exit 2; Ctrl-C saves the
run and exits 130. One module per group of commands: runs.py (generate, resume, demo, runs),
planning.py (plan, profiles, bench), weights.py (doctor, download, quantize).
"""

from . import planning, runs, weights  # noqa: F401  (each registers its commands on `app`)
from .app import app

__all__ = ["app"]
