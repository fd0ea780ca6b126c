"""The import paths of release 0.1.0 still work after the package's folders were made (issue 21): every public name
that a module of 0.1.0 defined imports through its old path, as the very object of its new home, with a
MovedModuleWarning. The names were listed from the 0.1.0 sources (tests/data/public_names_0.1.0.json), not from
the code under test."""

import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import lora_diffusion
from lora_diffusion._moved import MOVED, MovedModuleWarning

NAMES = json.loads((Path(__file__).parent / "data" / "public_names_0.1.0.json").read_text())


@pytest.mark.parametrize("module", sorted(NAMES))
def test_every_public_name_of_0_1_imports_from_its_old_path(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MovedModuleWarning)
        found = importlib.import_module(module)
        missing = [name for name in NAMES[module] if not hasattr(found, name)]
    assert not missing, f"{module} lost {missing}"


def test_each_old_path_is_the_new_module_itself_and_warns():
    # a fresh interpreter: here the modules are imported already, and a module imports (and warns) once
    code = ("import importlib, json, sys, warnings\n"
            "from lora_diffusion._moved import MOVED\n"
            "seen = {}\n"
            "for old in MOVED:\n"
            "    with warnings.catch_warnings(record=True) as caught:\n"
            "        warnings.simplefilter('always')\n"
            "        module = importlib.import_module('lora_diffusion.' + old)\n"
            "    seen[old] = [module.__name__, [str(w.message) for w in caught\n"
            "                                   if w.category.__name__ == 'MovedModuleWarning']]\n"
            "print(json.dumps(seen))\n")
    seen = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout.splitlines()[-1])
    for old, new in MOVED.items():
        name, messages = seen[old]
        assert name == "lora_diffusion." + new, old  # the new module object, not a copy
        assert any(f"lora_diffusion.{old} moved to lora_diffusion.{new}" in m for m in messages), (old, messages)


def test_a_submodule_through_an_old_package_path_is_not_loaded_twice():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MovedModuleWarning)
        old = importlib.import_module("lora_diffusion.adapters.lora")
    from lora_diffusion.core.adapters import lora as new

    assert old is new and old.LoRALayer is lora_diffusion.LoRALayer
    assert new.__spec__.name == "lora_diffusion.core.adapters.lora"


def test_cloneofsimo_names_at_the_top_warn_and_live_in_lora_diffusion_lora():
    from lora_diffusion import lora

    with pytest.warns(MovedModuleWarning, match="lora_diffusion.lora"):
        from lora_diffusion import monkeypatch_lora
    assert monkeypatch_lora is lora.monkeypatch_lora
    assert "monkeypatch_lora" not in lora_diffusion.__all__
    with pytest.raises(AttributeError):
        lora_diffusion.no_such_name
