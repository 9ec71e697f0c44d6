"""Progress callbacks from the runner to whoever draws them (the CLI); nothing in lowvram prints."""


class Reporter:
    """Progress callbacks; these do nothing. The CLI subclasses it with rich progress bars.

    stage(name, total): a stage starts ("loading text encoders", "encoding text", "loading DiT",
    "denoising", "loading VAE", "decoding", "writing video" or "writing image"); total = number of
    units (steps, tiles) or None. advance(completed, **info): units done so far (info: s_per_step, peak_vram_gb).
    warn(message): something the user should know that does not stop the run.
    clip(number, total, run_id, steps_left): several runs go stage by stage (a batch); the next
    stage messages are about clip `number` of `total`; steps_left: denoising steps the batch has
    still to run (its ETA at the measured s/step).
    rewritten(prompt): --rewrite's prompt, the one that is encoded.
    preview(path): a --preview run's denoising starts; `path` is rewritten after every step.
    """

    def stage(self, name: str, total: int | None = None, completed: int = 0) -> None:
        pass

    def advance(self, completed: int, **info) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def clip(self, number: int, total: int, run_id: str, steps_left: int) -> None:
        pass

    def rewritten(self, prompt: str) -> None:
        pass

    def preview(self, path: str) -> None:
        pass
