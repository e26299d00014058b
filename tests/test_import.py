"""Every module imports (catches syntax errors and broken imports in code no other test reaches)."""

import importlib
import pkgutil

import posttrain


def test_import_every_module():
    names = [m.name for m in pkgutil.walk_packages(posttrain.__path__, "posttrain.")]
    assert "posttrain.stages.sft" in names
    for name in names:
        importlib.import_module(name)
