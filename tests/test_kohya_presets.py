"""The LoRA presets that ship with the kohya_ss GUI (copies in ../shared/kohya_ss_presets/, the files users load at
the top of the GUI), with only the model and the data replaced: every one reads into a run whose network and
optimizer build as the preset says, the FLUX one is refused in one line, and one preset of each kind trains a few
steps into a file that diffusers or the lycoris-lora package loads with the outputs of ours.
(`python benchmarks/kohya_coverage.py --presets ../shared/kohya_ss_presets --run` trains all of them.)"""

import json
import warnings
from pathlib import Path

import pytest
import torch

import train_lora
from lora_diffusion import load_network
from lora_diffusion.models import load_models
from test_train import make_dataset, read

PRESETS = Path(__file__).resolve().parents[2] / "shared" / "kohya_ss_presets"
FILES = sorted(PRESETS.glob("*.json")) if PRESETS.is_dir() else []
pytestmark = pytest.mark.skipif(not FILES, reason=f"no kohya_ss presets at {PRESETS}")
ALGO = {"LyCORIS/LoCon": "locon", "LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr", "LyCORIS/iA3": "ia3"}
# One SD preset of each algorithm trains here (LoRA + AdamW8bit, LoHa, LoKr + Prodigy, LoKr with train_norm and
# rank_dropout_scale, iA3). The SDXL ones take minutes each on a CPU, beyond
# the suite's budget: they are read above, and trained by benchmarks/kohya_coverage.py --run.
TRAINED = ["sd15 - EDG_LoraOptiSettings", "sd15 - EDG_LoHaOptiSettings", "lokr-sd15", "sd15 - LoKr v1.1", "ia3-sd15"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("presets"), n=2)


@pytest.fixture(scope="module")
def start_files(tmp_path_factory):
    """What a preset's lora_network_weights names (phase 2 of a two-phase recipe): a LoRA of each family."""
    return write_start_files(tmp_path_factory.mktemp("start"))


def write_start_files(folder: Path) -> Path:
    from lora_diffusion import create_network

    for name in ("builtin:tiny", "builtin:tiny-xl"):
        models = load_models(name)
        create_network(models.unet, models.text_encoders, rank=4, alpha=2).save_weights(
            folder / f"{name.split(':')[1]}.safetensors")
    return folder


def with_our_model_and_data(preset: Path, data: Path, out: Path, start_files: Path) -> Path:
    """The preset with the model, the data (and a starting LoRA where it names one) and the run's length replaced
    (no sampling, to keep it short)."""
    document = json.loads(preset.read_text(encoding="utf-8"))
    if document.get("lora_network_weights") or document.get("network_weights"):
        start = start_files / ("tiny-xl.safetensors" if document.get("sdxl") else "tiny.safetensors")
        document.update(lora_network_weights=str(start), network_weights="")
    document.update(pretrained_model_name_or_path="builtin:tiny-xl" if document.get("sdxl") else "builtin:tiny",
                    train_data_dir=str(data), reg_data_dir="", dataset_config="", output_dir=str(out),
                    output_name="preset", epoch=0, max_train_steps=2, max_resolution="64,64", min_bucket_reso=64,
                    max_bucket_reso=128, sample_every_n_epochs=0, sample_every_n_steps=0, save_every_n_epochs=0,
                    save_every_n_steps=0, logging_dir="", train_batch_size=1, max_data_loader_n_workers=0)
    path = out.parent / f"{out.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


@pytest.mark.parametrize("preset", FILES, ids=lambda p: p.stem)
def test_every_preset_reads_into_the_run_it_describes(preset, data, start_files, tmp_path, capsys):
    document = json.loads(preset.read_text(encoding="utf-8"))
    config = with_our_model_and_data(preset, data, tmp_path / "out", start_files)
    if document["LoRA_type"].startswith("Flux"):
        assert train_lora.main(["--config_file", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "FLUX.1" in err
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bucket_reso_steps 1, xformers without xformers: named, and the run goes on
        args = train_lora.parse_args(["--config_file", str(config)])
    algo = ALGO.get(document["LoRA_type"])
    assert args.network_module == ("lycoris.kohya" if algo else "networks.lora")
    assert train_lora.network_options(args).get("algo") == algo
    assert args.optimizer_type == document["optimizer"] and args.network_dim == int(document["network_dim"])
    assert args.mixed_precision == (document.get("mixed_precision") or "no")


def lycoris_outputs(tensors, models):
    from conftest import unet_inputs
    from test_lycoris import lycoris_from_weights

    network = lycoris_from_weights({k: v.float() for k, v in tensors.items()}, models.unet, models.text_encoder)
    x, t, context = unet_inputs(size=8)
    with torch.no_grad():
        out = models.unet(x, t, context).sample
    network.restore()
    return out


def lycoris_ia3_outputs(tensors, models):
    """lycoris-lora's own IA3Module on each module the file names (its network loader cannot read iA3 files, its
    own included: see docs/format.md), loaded strictly from the file's tensors."""
    from lycoris.modules import IA3Module

    from conftest import unet_inputs
    from lora_diffusion.core.network import all_named_modules

    available = all_named_modules(models.unet, models.text_encoder)
    modules = []
    for key in tensors:
        if key.endswith(".on_input"):
            name = key[: -len(".on_input")]
            module = IA3Module(name, available[name].module, 1.0, train_on_input=bool(tensors[key]))
            module.load_state_dict({"weight": tensors[f"{name}.weight"].float(), "on_input": tensors[key]})
            module.apply_to()
            modules.append(module)
    x, t, context = unet_inputs(size=8)
    with torch.no_grad():
        out = models.unet(x, t, context).sample
    for module in modules:
        module.restore()
    return out


def diffusers_outputs(path, models):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from conftest import unet_inputs

    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora()
    x, t, context = unet_inputs(size=8)
    with torch.no_grad():
        return pipe.unet(x, t, context).sample


@pytest.mark.parametrize("name", TRAINED)
def test_a_preset_of_each_kind_trains_into_a_file_the_clients_load(name, data, start_files, tmp_path):
    from conftest import unet_inputs

    preset = PRESETS / f"{name}.json"
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = with_our_model_and_data(preset, data, out, start_files)
        assert train_lora.main(["--config_file", str(config)]) == 0
    path = out / "preset.safetensors"
    tensors, metadata = read(path)
    assert all(torch.isfinite(v.float()).all() for v in tensors.values())
    models = load_models("builtin:tiny")
    network = load_network(str(path), models.unet, models.text_encoder)
    x, t, context = unet_inputs(size=8)
    with torch.no_grad():
        ours = models.unet(x, t, context).sample
    network.remove()
    with torch.no_grad():
        plain = models.unet(x, t, context).sample
    assert (ours - plain).abs().max() > 0  # two steps moved the file away from doing nothing
    fresh = load_models("builtin:tiny")
    if any(key.endswith(".on_input") for key in tensors):
        theirs = lycoris_ia3_outputs(tensors, fresh)
    elif metadata["ss_network_module"] == "lycoris.kohya":
        theirs = lycoris_outputs(tensors, fresh)
    else:
        theirs = diffusers_outputs(path, fresh)
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-4)
