"""Lazy package exports (smviz.lazy): every exported name resolves to the object its submodule defines,
unknown names raise AttributeError, and the modules the app's Overview reads do not import transformers'
model classes or peft (checked in a fresh interpreter, where nothing is imported yet)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from smviz.lazy import lazy_exports

LAZY_PACKAGES = ["smviz", "smviz.model", "smviz.train"]


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_export_is_its_submodules_object(package):
    mod = importlib.import_module(package)
    assert mod.__all__ == sorted(n for names in mod.EXPORTS.values() for n in names)
    for submodule, names in mod.EXPORTS.items():
        source = importlib.import_module(submodule, package)
        for name in names:
            assert getattr(mod, name) is getattr(source, name), f"{package}.{name}"
    assert set(mod.__all__) <= set(dir(mod))


def test_a_submodule_named_like_its_function_leaves_the_function():
    import smviz.train.finetune  # binds the submodule as smviz.train's attribute "finetune"
    from smviz.train import finetune

    assert callable(finetune) and not isinstance(finetune, type(smviz.train))


def test_unknown_name_is_an_attribute_error():
    import smviz

    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        smviz.NoSuchThing  # noqa: B018
    with pytest.raises(ImportError):
        exec("from smviz.model import NoSuchThing", {})


def test_a_name_exported_twice_is_refused():
    with pytest.raises(ValueError, match="two submodules"):
        lazy_exports("smviz", {".a": ["x"], ".b": ["x"]})


def test_the_overviews_modules_import_no_model_classes():
    code = (
        "import sys\n"
        "from smviz.workspace.layout import Workspace\n"
        "from smviz.model import CONFIG_FILE, hash_files, read_memory_config, is_base_model_dir\n"
        "from smviz.trace import META_FILE, Trace\n"
        "from smviz.train.rundir import CONFIG, FinetuneRunDir\n"
        "from smviz.stats import SlotStats\n"
        "heavy = [m for m in ('transformers', 'peft', 'spacy', 'scipy', 'smviz.model.memory_model') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    # and the first use of a lazy name imports it
    code_use = "import sys, smviz\nsmviz.MemoryModel\nprint('smviz.model.memory_model' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code_use], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
