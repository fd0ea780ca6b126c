"""How much of kohya is here, as numbers: of kohya sd-scripts' train_network / sdxl_train_network flags
(benchmarks/kohya_flags.json), how many this trainer accepts, implements, or refuses with a reason before any
work; with --presets DIR, how many kohya_ss GUI LoRA presets read into a run (each preset's model and data
replaced by a builtin model and a 2-image folder) and, with --run, how many train 2 steps to a file.

    python benchmarks/kohya_coverage.py [--presets ../shared/kohya_ss_presets [--run]]
"""

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def flag_coverage() -> dict:
    from lora_diffusion.options import trainer_options

    kohya = [f["name"] for f in json.loads((ROOT / "benchmarks" / "kohya_flags.json").read_text())["flags"]]
    ours = {o.name: o for o in trainer_options()}
    accepted = [n for n in kohya if n in ours]
    refused = {n: ours[n].refused for n in accepted if ours[n].refused}
    return dict(kohya=len(kohya), accepted=len(accepted), implemented=len(accepted) - len(refused),
                refused=refused, unknown=[n for n in kohya if n not in ours])


def preset_run(preset: Path, data: Path, out: Path, start_files: Path, run: bool) -> tuple[bool, str]:
    """Read (and with run=True train) one GUI preset with only the model and data replaced, as the tests do."""
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    import train_lora
    from test_kohya_presets import with_our_model_and_data

    config = with_our_model_and_data(preset, data, out, start_files)
    argv = ["--config_file", str(config), "--overwrite"] + ([] if run else ["--output_config"])
    err = StringIO()
    with warnings.catch_warnings(), redirect_stdout(StringIO()), redirect_stderr(err):
        warnings.simplefilter("ignore")
        code = train_lora.main(argv)
    return code == 0, err.getvalue().strip().splitlines()[-1] if code else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", help="a folder of kohya_ss GUI LoRA presets (presets/lora/*.json)")
    parser.add_argument("--run", action="store_true", help="train each preset 2 steps (minutes)")
    args = parser.parse_args()
    c = flag_coverage()
    print(f"kohya flags: {c['kohya']}; accepted {c['accepted']}, implemented {c['implemented']}, refused with a "
          f"reason {len(c['refused'])}, unknown {len(c['unknown'])}")
    for name, why in c["refused"].items():
        print(f"  refused --{name}: {why}")
    for name in c["unknown"]:
        print(f"  unknown --{name}")
    if args.presets:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_kohya_presets import write_start_files
        from test_train import make_dataset

        presets = sorted(Path(args.presets).glob("*.json"))
        ok = 0
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "start").mkdir()
            data, start_files = make_dataset(Path(tmp), n=2), write_start_files(Path(tmp) / "start")
            for preset in presets:
                good, why = preset_run(preset, data, Path(tmp) / "out" / preset.stem, start_files, args.run)
                ok += good
                print(f"  {'ok ' if good else 'NO '} {preset.name}{': ' + why if why else ''}")
        print(f"kohya_ss GUI presets {'trained' if args.run else 'read'}: {ok} of {len(presets)}")


if __name__ == "__main__":
    main()
