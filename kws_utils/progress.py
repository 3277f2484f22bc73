"""One progress-bar helper for the whole course: plain text bars that save cleanly in notebooks.

tqdm.auto draws a widget in Jupyter; a notebook executed headless (nbconvert, nbval) saves such a
widget as its first frame, "0%| 0/438", which reads as if nothing ran. A text bar ends as its
finished line ("100%| 438/438") in the saved output too. KWS_PROGRESS (see config) picks the kind.
"""
from __future__ import annotations

from typing import Any, Iterable

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm as auto_tqdm

from kws_utils import config


def bar(iterable: Iterable | None = None, **kwargs: Any) -> text_tqdm:
    """A tqdm progress bar of the kind config.progress_mode() names (text, widget or none)."""
    mode = config.progress_mode()
    # No "0%" first frame (a loop shorter than the delay prints nothing at all) and few redraws,
    # so a saved notebook holds short outputs that end with the finished bar.
    kwargs.setdefault("delay", 2.0)
    kwargs.setdefault("mininterval", 5.0)
    if mode == "none":
        kwargs["disable"] = True
    cls = auto_tqdm if mode == "widget" else text_tqdm
    return cls(iterable, **kwargs)
