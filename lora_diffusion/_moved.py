"""Import paths of earlier releases: `lora_diffusion.network`, `lora_diffusion.kohya`, ... still import, as the very
module that now lives in its subpackage (so a monkeypatch through either name is seen by both), with a
DeprecationWarning naming the new path. Kept for one release; then this table goes."""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module (under lora_diffusion., dotted for one in a package) -> its home now; a prefix: `adapters.lora`
# follows `adapters`
MOVED = {
    "adapters": "core.adapters",
    "network": "core.network",
    "targets": "core.targets",
    "inject": "core.inject",
    "layer": "core.adapters",
    "lycoris_layers": "core.adapters",
    "kohya": "core.kohya",
    "formats.kohya": "core.kohya",  # the adapters' own file format: with them since 0.2
    "cloneofsimo": "lora",  # its research API; its file readers are formats.cloneofsimo
    "io": "formats.io",
    "base_checkpoint": "models.checkpoint",
    "convert": "models.convert",
    "sdxl": "models.sdxl",
    "tokenizer": "models.tokenizer",
    "dataset": "data.dataset",
    "flag_file": "options.flag_file",
    "train": "training.trainer",
    "generate": "tools.generate",
    "evaluate": "tools.evaluate",
    "world_features": "world.features",
    "quality": "world.quality",
    "pretrain_mini": "world.pretrain_mini",
}


class MovedModuleWarning(DeprecationWarning):
    """An import through a module path of an earlier release."""


def new_path(fullname: str) -> str | None:
    package, _, rest = fullname.partition(".")
    if package != "lora_diffusion" or not rest:
        return None
    for old in sorted(MOVED, key=len, reverse=True):  # the longest moved path that `rest` is or lies under
        if rest == old or rest.startswith(old + "."):
            return "lora_diffusion." + MOVED[old] + rest[len(old):]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__  # the import system sets __spec__ on what this returns: put it back after
        return module

    def exec_module(self, module):
        module.__spec__ = self.own_spec


class MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = new_path(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path goes in the next release",
                      MovedModuleWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install():
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())  # before the path finder, which would load a second copy
