"""The hooks a llmlb plugin may implement (pluggy). Each hook has a test in test_plugins.py."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("llmlb")
hookimpl = pluggy.HookimplMarker("llmlb")


@hookspec
def register_engines():
    """Return a list of Engine instances; a plugin's engine wins over a built-in one."""
