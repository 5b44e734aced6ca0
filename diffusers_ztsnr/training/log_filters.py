"""Bounded log lines for library messages that quote whole prompts.

diffusers pipelines' ``encode_prompt`` warns "The following part of your input was truncated because CLIP can only
handle sequences up to 77 tokens: [...]" and quotes the removed text of *every* prompt of the batch, so a
2,000-character caption, or a batch of short captions padded to a long one (hundreds of ``<|endoftext|>`` pad
tokens), prints kilobytes per training step. The warning comes from each pipeline module's own logger
(``diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion``, ``...stable_diffusion_xl...``,
``...stable_diffusion_3...``, ``diffusers.pipelines.flux.pipeline_flux``, ...), all children of ``diffusers``.
transformers 5.x logs no prompt text itself (its tokenizer warns "Token indices sequence length is longer than
...", without the text), but its loggers get the same bound.

A filter on a logger only sees records created by that very logger, not those of its children, so
:func:`install_long_message_filter` attaches one shared :class:`LongMessageFilter` to the library root loggers,
to every one of their descendants that exists at that moment, and to the library root loggers' handlers (the
libraries' own stderr handlers, which records of loggers created later still reach). Install it after the
pipeline is loaded, so that its module's logger exists.
"""

from __future__ import annotations

import logging

LIBRARY_LOGGERS = ("diffusers", "transformers")

__all__ = ["LIBRARY_LOGGERS", "OPTIONAL_KERNEL_NOTICES", "LongMessageFilter", "install_long_message_filter",
           "install_optional_kernel_filter", "shorten"]

#: ``{logger: message prefixes}`` of import-time notices about optional compiled kernels that the training scripts
#: never use: torchao's C++/CUDA extensions built for other Python / torch / CUDA versions (torchao falls back to its
#: Python kernels), diffusers' note that it could not import them, and torch's deprecation note on the enums
#: torchao registers. They would otherwise push a script's one-line error off the end of stderr.
OPTIONAL_KERNEL_NOTICES = {
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
    "torch.utils._pytree": ("<enum ",),
}


def shorten(text: str, max_chars: int) -> str:
    """``text`` if it has at most ``max_chars`` characters (or shortening would not make it shorter), else its
    first two thirds and last third of ``max_chars`` characters around a ``" … (N characters omitted) … "``
    marker: at most ``max_chars`` plus the marker's length (under 50 characters)."""
    if len(text) <= max_chars:
        return text
    tail = max_chars // 3
    head = max_chars - tail
    omitted = len(text) - head - tail
    short = f"{text[:head]} … ({omitted} characters omitted) … {text[len(text) - tail:]}"
    return short if len(short) < len(text) else text


class LongMessageFilter(logging.Filter):
    """Shortens, in place, every record whose formatted message is over ``max_chars`` characters (see
    :func:`shorten`); never drops a record. The shortened text replaces ``msg`` and ``args`` is cleared, so every
    handler after this filter sees the short form; a record is shortened at most once (it is marked with a
    ``long_message_checked`` attribute), however many loggers and handlers carry the filter."""

    def __init__(self, max_chars: int = 300) -> None:
        super().__init__()
        self.max_chars = int(max_chars)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "long_message_checked", False):  # seen by a logger, now by a handler: shortened once
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is left for the handler to report
            return True
        record.long_message_checked = True
        if len(message) > self.max_chars:
            record.msg = shorten(message, self.max_chars)
            record.args = None
        return True


_FILTER: LongMessageFilter | None = None


def install_long_message_filter(
    max_chars: int = 300, names: tuple[str, ...] = LIBRARY_LOGGERS
) -> LongMessageFilter:
    """Attach one process-wide :class:`LongMessageFilter` to the loggers ``names``, to all their descendants that
    exist now, and to the handlers of the ``names`` loggers; return it.

    Idempotent: a second call reuses the same filter (updating ``max_chars``) and attaches it to loggers created
    since, never twice to one logger or handler. Records of a descendant logger created after the call are
    shortened when they reach a handler of ``names`` (the libraries' default stderr handlers), not before.
    """
    global _FILTER
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if _FILTER is None:
        _FILTER = LongMessageFilter(max_chars)
    _FILTER.max_chars = int(max_chars)
    existing = list(logging.root.manager.loggerDict.items())
    for name in names:
        root = logging.getLogger(name)
        root.addFilter(_FILTER)  # addFilter ignores a filter already attached
        for handler in root.handlers:
            handler.addFilter(_FILTER)
        for child_name, child in existing:
            if child_name.startswith(name + ".") and isinstance(child, logging.Logger):
                child.addFilter(_FILTER)
    return _FILTER


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not record.getMessage().startswith(self.prefixes)
        except Exception:  # a malformed record is left for the handler to report
            return True


def install_optional_kernel_filter() -> None:
    """Drop the records of :data:`OPTIONAL_KERNEL_NOTICES` (idempotent; install before the libraries import
    torchao, whose notices come at import time)."""
    for name, prefixes in OPTIONAL_KERNEL_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))
