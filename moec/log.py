"""moec's log, through Python's `logging`: one logger per topic under ``moec``.

| topic | what it says |
|---|---|
| ``moec.lift`` | each module moec lifted, and each it left eager and why |
| ``moec.compile`` | each program compiled (recipe, dtype, arch, kernels) |
| ``moec.tiles`` | each kernel's tiles per token-count bucket, and where they came from |
| ``moec.cache`` | kernel cache hits, writes and rewrites |
| ``moec.calls`` | a region's first call served each way (kernels, or eager and why) |

Nothing is shown unless asked. ``MOEC_LOGS`` asks: a level for every topic (``info``, ``debug``),
``+topic`` (that topic at ``info``; ``+topic:debug`` at a level), ``-topic`` (silence it), comma-separated:
``MOEC_LOGS=+lift,+tiles`` or ``MOEC_LOGS=info,-cache``. Python's own logging configuration works too
(``logging.getLogger("moec.lift").setLevel(logging.INFO)`` with a handler of yours).
"""
from __future__ import annotations

import logging

from . import env

TOPICS = ("lift", "compile", "tiles", "cache", "calls")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_configured = False


def logger(topic: str) -> logging.Logger:
    """The logger of ``topic`` (one of `TOPICS`), configured from ``MOEC_LOGS`` at first use."""
    if topic not in TOPICS:
        raise ValueError(f"unknown log topic {topic!r}; topics: {', '.join(TOPICS)}")
    if not _configured:
        configure()
    return logging.getLogger(f"moec.{topic}")


def parse(text: str) -> dict[str, int]:
    """``{topic: level}`` for a ``MOEC_LOGS`` value (see the module docstring)."""
    levels: dict[str, int] = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        if item.lower() in LEVELS:
            levels.update(dict.fromkeys(TOPICS, LEVELS[item.lower()]))
            continue
        sign, rest = (item[0], item[1:]) if item[0] in "+-" else ("+", item)
        topic, _, level = rest.partition(":")
        if topic not in TOPICS or (level and level.lower() not in LEVELS):
            raise ValueError(f"environment variable MOEC_LOGS: unknown {item!r}; accepted: a level "
                             f"({', '.join(LEVELS)}), or +topic[:level] / -topic with topics {', '.join(TOPICS)}")
        levels[topic] = logging.CRITICAL + 1 if sign == "-" else LEVELS[level.lower() or "info"]
    return levels


def configure() -> None:
    """Apply ``MOEC_LOGS`` (once; call again after changing it). Asked-for topics get a stderr handler."""
    global _configured
    _configured = True
    root = logging.getLogger("moec")
    levels = parse(env.text("MOEC_LOGS") or "")
    if levels and not any(getattr(h, "_moec", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        handler._moec = True
        root.addHandler(handler)
    for topic, level in levels.items():
        logging.getLogger(f"moec.{topic}").setLevel(level)
