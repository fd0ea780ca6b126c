"""`world`: the shapes world's own captioner for builtin:mini images. The judge (lora_diffusion.world.judge) reads
the shape, its colour and the background back from the pixels, and the world's caption grammar writes them:
sentence style 'a red star on a blue background', tags style 'red star, blue background'. No model to load."""

from lora_diffusion import world as shapes_world

from .base import Captioner, CaptionError

STYLES = ("sentence", "tags")


class WorldCaptioner(Captioner):
    name = "world"

    def __init__(self, style="sentence"):
        if style not in STYLES:
            raise CaptionError(f"world: --style must be one of {', '.join(STYLES)}, got {style!r}")
        self.style = "tags" if style == "tags" else "sentence"

    @classmethod
    def from_options(cls, options):
        return cls(getattr(options, "style", None) or "sentence")

    def caption_one(self, image) -> str:
        shape, color, background = shapes_world.judge(image)
        if shape is None or color is None:  # nothing drawn on the background
            return f"{background} background" if self.style == "tags" else f"a plain {background} background"
        return shapes_world.caption(shapes_world.Scene(shape, color, background), self.style)

    def caption_batch(self, images) -> list:
        return [self.caption_one(image) for image in images]
