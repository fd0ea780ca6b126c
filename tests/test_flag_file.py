"""--output_config writes every flag a run set, so that --config_file reads the same run back."""

from pathlib import Path

import train_lora
from lora_diffusion.formats.io import loads_toml
from lora_diffusion.options.flag_file import write_config_file

ROOT = Path(__file__).resolve().parents[1]


def test_written_config_keeps_the_flags_that_have_a_second_spelling(tmp_path):
    source = ROOT / "examples" / "quickstart" / "config.toml"
    given = {k: v for section in loads_toml(source.read_text()).values() for k, v in section.items()}
    parser = train_lora.build_parser()
    args = train_lora.parse_args(["--config_file", str(source)])
    out = tmp_path / "written.toml"
    write_config_file(str(out), args, parser)
    written = loads_toml(out.read_text())
    # cache_latents (also --no_cache_latents) and validation_every_n_epochs (also --validate_every_n_epochs)
    for key in ("cache_latents", "validation_every_n_epochs", "network_dim", "unet_lr", "sample_prompts"):
        assert written[key] == given[key], key
    again = train_lora.parse_args(["--config_file", str(out)])
    assert {k: v for k, v in vars(again).items() if k not in ("config_file", "parser")} == \
        {k: v for k, v in vars(args).items() if k not in ("config_file", "parser")}
