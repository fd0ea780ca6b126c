"""The floor of requires-python (3.10, which has no tomllib): run by .ci/run with the oldest Python found.

PyTorch's CPU build is not installable for every Python here, so this checks what the floor is about without it:
every file compiles, and the TOML readers (flag files, dataset configs) work with the `tomli` fallback. The package's
__init__ (which imports torch) is skipped by registering `lora_diffusion` as a bare package first.
"""

import argparse
import compileall
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ok = all(compileall.compile_dir(ROOT / d, quiet=1, force=True) for d in ("lora_diffusion", "tests", "benchmarks"))
ok &= all(compileall.compile_file(ROOT / f, quiet=1, force=True) for f in ("train_lora.py", "dataset.py"))
if not ok:
    sys.exit(f"Python {sys.version.split()[0]}: some files do not compile")

package = types.ModuleType("lora_diffusion")
package.__path__ = [str(ROOT / "lora_diffusion")]
sys.modules["lora_diffusion"] = package

from lora_diffusion.data.dataset_config import read_dataset_config  # noqa: E402
from lora_diffusion.data.errors import DatasetError  # noqa: E402
from lora_diffusion.data.subset import FLAG_DEFAULTS  # noqa: E402
from lora_diffusion.options.flag_file import ConfigFileError, read_config_file  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    parser = argparse.ArgumentParser()
    parser.add_argument("--network_dim", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    flags = tmp / "flags.toml"
    flags.write_text("[network]\nnetwork_dim = 8\n[optimizer]\nlearning_rate = 2e-4\n", encoding="utf-8")
    assert read_config_file(str(flags), parser) == {"network_dim": 8, "learning_rate": 2e-4}
    flags.write_text("network_dim = \n", encoding="utf-8")
    try:
        read_config_file(str(flags), parser)
        raise AssertionError("a broken flag file was read")
    except ConfigFileError as e:
        assert "not valid TOML" in str(e), e

    (tmp / "images").mkdir()
    config = tmp / "dataset.toml"
    config.write_text("[general]\nshuffle_caption = true\n[[datasets]]\nresolution = 256\n"
                      "[[datasets.subsets]]\nimage_dir = 'images'\nnum_repeats = 3\n", encoding="utf-8")
    subsets, batch_size = read_dataset_config(config, dict(FLAG_DEFAULTS))
    assert (subsets[0].num_repeats, subsets[0].resolution, subsets[0].shuffle_caption) == (3, (256, 256), True)
    config.write_text("[general\n", encoding="utf-8")
    try:
        read_dataset_config(config, dict(FLAG_DEFAULTS))
        raise AssertionError("a broken dataset config was read")
    except DatasetError as e:
        assert "cannot be parsed" in str(e), e

print(f"Python {sys.version.split()[0]}: compiles; flag files and dataset configs read (tomllib or tomli)")
