"""Render a Jinja2 template from moec's `templates/` folder into Triton source."""
from __future__ import annotations

import functools
from pathlib import Path

import jinja2

from moec import templates


@functools.lru_cache(maxsize=None)
def _env() -> jinja2.Environment:
    root = Path(templates.__file__).resolve().parent
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(root)), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(template: str, **context) -> str:
    """Render ``templates/<template>`` with ``context``; unknown names are an error."""
    return _env().get_template(template).render(**context)
