"""Progress bars for the demo's long stages, and nothing else on screen: the libraries' loading chatter
(pipeline-loading bars, the safety-checker notice, optional-dependency notices) says nothing about the demo."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

_LOADERS = ("diffusers", "transformers", "datasets", "accelerate", "huggingface_hub", "peft")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Loggers of the loading libraries at ERROR and their progress bars off, restored afterwards."""
    import transformers

    # before diffusers' pipelines import transformers' image processors, which log about a missing torchvision
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    import datasets
    import diffusers

    levels = {name: logging.getLogger(name).level for name in _LOADERS}
    bars = (diffusers.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled(),
            datasets.is_progress_bar_enabled())
    for name in _LOADERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecation notices of the libraries, not ours
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        transformers.utils.logging.set_verbosity(verbosity)
        if bars[0]:
            diffusers.utils.logging.enable_progress_bar()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()
        if bars[2]:
            datasets.enable_progress_bars()


def stage_bar(name: str, total: int) -> Callable[[int], None]:
    """A tqdm bar for one training stage; returns its ``update``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=name, leave=True, dynamic_ncols=True)

    def update(count: int) -> None:
        bar.update(count)
        if bar.n >= total:
            bar.close()

    return update
