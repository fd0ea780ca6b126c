"""Caption training images: one caption file per image, from a tagger, a captioning model or the shapes world.

    lora-diffusion caption data/10_dog --captioner wd14 --model SmilingWolf/wd-v1-4-convnext-tagger-v2 \\
        --out_ext .wd14 --general_threshold 0.35 --remove_underscore
    lora-diffusion caption data/10_dog --captioner kosmos2 --out_ext .kosmos
    lora-diffusion caption examples/quickstart/data/10_star --captioner world --style tags --output_dir tags/

Captions are written atomically; an existing caption is kept unless --overwrite (or --append / --prepend adds to
it); an unreadable image is skipped with a warning naming it. Captioners: wd14, kosmos2, blip, florence2, vlm,
world (docs/tools.md lists their models).
"""

import sys
from pathlib import Path

from lora_diffusion import captioning
from lora_diffusion.captioning import CaptionError
from lora_diffusion.cli import main, set_cpu_threads


def add_arguments(parser):
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--captioner", required=True, choices=captioning.names())
    parser.add_argument("--model", help="a local folder or a Hugging Face repo id (default: the captioner's own, "
                        "see docs/tools.md)")
    parser.add_argument("--out_ext", "--caption_extension", "--out-ext", dest="out_ext", default=".txt",
                        help="caption file extension (default .txt)")
    parser.add_argument("--output_dir", "--output-dir", help="write the captions here instead of beside the images")
    parser.add_argument("--overwrite", action="store_true", help="replace existing captions")
    parser.add_argument("--append", "--append_tags", dest="append", action="store_true",
                        help="add to an existing caption (tags without repeats, kohya's --append_tags)")
    parser.add_argument("--prepend", action="store_true", help="put the new caption before an existing one")
    parser.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on cuda, fp32 on cpu), fp32, fp16, bf16")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the cores not busy now; see `lora-diffusion train --threads`)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    text = parser.add_argument_group("captioning models (kosmos2, blip, florence2, vlm)")
    text.add_argument("--prompt", help="blip: a text the caption continues; vlm: the user prompt; kosmos2: the "
                      "prompt (default '<grounding>An image of')")
    text.add_argument("--task", default="<MORE_DETAILED_CAPTION>",
                      help="florence2: <CAPTION>, <DETAILED_CAPTION> or <MORE_DETAILED_CAPTION>")
    text.add_argument("--max_new_tokens", type=int, default=None, help="default: the captioner's own")
    text.add_argument("--num_beams", type=int, default=None, help="beam search width (default: the captioner's)")
    text.add_argument("--trust_remote_code", action="store_true",
                      help="let transformers run a model's own code (only for models you trust)")
    world = parser.add_argument_group("world")
    world.add_argument("--style", default="sentence", choices=("sentence", "tags"))
    wd = parser.add_argument_group("wd14 (kohya's tag_images_by_wd14_tagger.py options)")
    wd.add_argument("--thresh", type=float, default=0.35, help="tag threshold (default 0.35)")
    wd.add_argument("--general_threshold", type=float, default=None, help="general tags (default --thresh)")
    wd.add_argument("--character_threshold", type=float, default=None,
                    help="character tags (default --thresh; above 1 turns them off)")
    wd.add_argument("--undesired_tags", default="", help="tags never written, separated by --caption_separator")
    wd.add_argument("--always_first_tags", default=None, help="tags put first when found, e.g. '1girl,1boy'")
    wd.add_argument("--caption_separator", default=", ", help="between tags (default ', ')")
    wd.add_argument("--remove_underscore", action="store_true", help="underscores to spaces (tags over 3 chars)")
    wd.add_argument("--use_rating_tags", action="store_true", help="the rating tag first")
    wd.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="the rating tag last")
    wd.add_argument("--character_tags_first", action="store_true", help="character tags before general tags")
    wd.add_argument("--character_tag_expand", action="store_true",
                    help="'name_(series)' becomes 'name, series'")
    wd.add_argument("--tag_replacement", default=None,
                    help="'source1,target1;source2,target2'; escape ',' and ';' with a backslash")
    wd.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")


def run(args) -> int:
    if args.append and args.prepend:
        raise CaptionError("caption: --append and --prepend exclude each other")
    if args.model is None:
        args.model = captioning.default_model(args.captioner)
    images = captioning.find_images(args.images, recursive=args.recursive)
    if not images:
        raise CaptionError(f"caption: no images in {', '.join(args.images)}")
    if args.captioner != "world":
        args.threads = set_cpu_threads(args.threads, command="caption")
    captioner = captioning.captioner(args.captioner, args)
    root = Path(args.images[0]).expanduser() if len(args.images) == 1 and Path(args.images[0]).is_dir() else None
    mode = "append" if args.append else "prepend" if args.prepend else "write"
    report = captioning.caption_images(captioner, images, out_ext=args.out_ext, output_dir=args.output_dir,
                                       root=root, overwrite=args.overwrite, batch_size=args.batch_size, mode=mode,
                                       progress=not args.no_progress)
    print(f"caption ({args.captioner}): {report.format()}")
    if args.frequency_tags and hasattr(captioner, "tag_frequencies"):
        print("Tag frequencies:")
        for tag, count in sorted(captioner.tag_frequencies.items(), key=lambda kv: -kv[1]):
            print(f"{tag}: {count}")
    return 1 if report.unreadable and not report.written else 0


if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
