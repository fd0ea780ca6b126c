"""Convert an SD1.x/2.x or SDXL model between a single file in the original (CompVis / Stability SGM) layout and a
diffusers folder, both ways, tensor by tensor. The seeds' `convert_sd_to_diffusers.py` / `convert_diffusers_to_sd.py`
step.

    lora-diffusion convert v1-5-pruned-emaonly.ckpt sd15-diffusers/          # .ckpt read safely (weights only)
    lora-diffusion convert sd15-diffusers/ sd15.safetensors --precision fp16

Every model weight is copied bit for bit (unless --precision casts it); a single file written from a folder and
read back gives the same tensors. A single file's EMA copies and schedule buffers have no place in a diffusers
folder and are left out.
"""

from pathlib import Path

from .model_files import ModelToolError, check_output, open_model, precision, write_model


def convert_model(source, output, *, dtype=None, config_dir=None, v2=None, v_parameterization=False,
                  overwrite=False):
    """Write `source` (folder or single file) as `output`: a `.safetensors` path is a single file, any other path
    a diffusers folder. Returns the output path."""
    check_output(output, [source], overwrite)
    model = open_model(source, config_dir=config_dir, v2=v2)
    wants_single = Path(output).suffix == ".safetensors"
    if wants_single == (model.kind == "single"):
        kind = "a single file" if wants_single else "a diffusers folder"
        raise ModelToolError(f"'{source}' is already {kind}; give a {'folder' if wants_single else '.safetensors'} "
                             f"output to convert it")
    return write_model(output, model, model.read, dtype, v_parameterization=v_parameterization)


def add_arguments(parser):
    parser.add_argument("source", help="a diffusers folder, or a .safetensors/.ckpt single file")
    parser.add_argument("output", help="a .safetensors path (single file) or a folder path (diffusers)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                        help="cast the weights (default: keep each tensor's dtype)")
    parser.add_argument("--config", default=None,
                        help="for a single-file source: a folder with unet/ vae/ text_encoder/ (SDXL: and "
                             "text_encoder_2/) configs (default: the shipped SD1.x, SD2.x or SDXL ones, detected from "
                             "the weights)")
    parser.add_argument("--v_parameterization", action="store_true",
                        help="single file -> folder: write a v-prediction scheduler (SD2.x 768-v models)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args):
    out = convert_model(args.source, args.output, dtype=precision(args.precision), config_dir=args.config,
                        v_parameterization=args.v_parameterization, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
