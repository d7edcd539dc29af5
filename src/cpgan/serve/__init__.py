"""The web demo (``cpgan serve``): a page and a JSON API over a trained run's sampler.

Standard library HTTP server plus numpy/PIL for PNG encoding; torch is only imported by ``cmd_serve`` when it
loads :class:`cpgan.sampling.Sampler`. See :mod:`cpgan.serve.app` for the API and its limits.
"""
from .app import (
    CpganServer,
    Gate,
    SamplerLike,
    ServeLimits,
    add_serve_command,
    attention_overlays,
    cmd_serve,
    make_server,
    png_data_url,
    serve,
)

__all__ = [
    "CpganServer",
    "Gate",
    "SamplerLike",
    "ServeLimits",
    "add_serve_command",
    "attention_overlays",
    "cmd_serve",
    "make_server",
    "png_data_url",
    "serve",
]
