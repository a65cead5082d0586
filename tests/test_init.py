"""The package's public names load on first use, so the host-side parts stay torch-free."""

from __future__ import annotations

import subprocess
import sys

import gradguard


def test_every_public_name_is_exported_and_loads():
    assert set(gradguard.__all__) == {"__version__", *gradguard._EXPORTS}
    for name in gradguard.__all__:
        assert getattr(gradguard, name) is not None
    assert set(gradguard.__all__) <= set(dir(gradguard))


def test_subpackages_are_attributes_as_after_an_eager_import():
    code = (
        "import gradguard as gg\n"
        "assert gg.record.TensorBoardSink and gg.health.find_nonfinite_forward\n"
        "assert gg.policies.ZClip is gg.ZClip\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unknown_names_raise_attribute_error():
    try:
        gradguard.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_the_package_does_not_import_torch():
    code = "import sys, gradguard, gradguard.schema; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
