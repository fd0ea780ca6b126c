"""What the transformers captioners share: loading a model and its processor from a folder or the Hugging Face
cache (a clear line when transformers, the model or one of its parts is missing), devices and dtypes, batched
greedy or beam generation, and the decoding of what the model added after its prompt."""

import json
from pathlib import Path

from .base import Captioner, CaptionError, require, resolve_model, torch_device, torch_dtype


def model_type(folder) -> str:
    """config.json's model_type ('' when there is none)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError):
        return ""


NOT_FOR_TORCH = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "onnx/*", "*.gguf", "*.tflite", "coreml/*"]  # other runtimes


class TransformersCaptioner(Captioner):
    """caption_batch: prompts(images) -> processor(images, text) -> model.generate -> decode -> clean."""

    name = "?"
    model_class = "AutoModelForImageTextToText"  # a transformers class name, or a callable(folder) -> name
    default_prompt = None
    default_max_new_tokens = 77
    default_num_beams = 1
    strip_prompt_tokens = True  # generate() returns the prompt's tokens first: drop them before decoding

    def __init__(self, model, processor, *, prompt=None, max_new_tokens=None, num_beams=None, device=None,
                 dtype=None):
        self.model, self.processor = model, processor
        self.prompt = self.default_prompt if prompt is None else prompt
        self.max_new_tokens = max_new_tokens or self.default_max_new_tokens
        self.num_beams = num_beams or self.default_num_beams
        parameter = next(model.parameters(), None)
        self.device = device if device is not None else (parameter.device if parameter is not None else "cpu")
        self.dtype = dtype if dtype is not None else (parameter.dtype if parameter is not None else None)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and not getattr(model.config, "is_encoder_decoder", False):
            tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token

    @classmethod
    def command(cls):
        return f"caption --captioner {cls.name}"

    @classmethod
    def class_for(cls, folder):
        return cls.model_class(folder) if callable(cls.model_class) else cls.model_class

    @classmethod
    def load(cls, folder, *, device="auto", dtype="auto", trust_remote_code=False):
        """(model, processor) from a local folder, on `device` in `dtype`."""
        transformers = require("transformers", cls.command(), extra="", package="transformers")
        name = cls.class_for(folder)
        model_cls = getattr(transformers, name, None)
        if model_cls is None:
            raise CaptionError(f"{cls.command()}: this transformers ({transformers.__version__}) has no {name}; "
                               f"upgrade it with `pip install -U transformers`")
        device = torch_device(device)
        dtype = torch_dtype(dtype, device)
        try:
            processor = transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
            model = model_cls.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        except ImportError as error:  # a part of the processor needs a package (torchvision, sentencepiece, ...)
            raise CaptionError(f"{cls.command()}: loading '{folder}' needs a package that is missing ({error})") \
                from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CaptionError(f"{cls.command()}: cannot load the model in '{folder}' as {name} ({line[:300]})") \
                from None
        return model.to(device).eval(), processor

    @classmethod
    def from_options(cls, options):
        get = lambda key, default=None: getattr(options, key, default)  # noqa: E731
        from . import default_model

        folder = resolve_model(get("model") or default_model(cls.name), cls.command(), ignore=NOT_FOR_TORCH)
        model, processor = cls.load(folder, device=get("device", "auto"), dtype=get("dtype", "auto"),
                                    trust_remote_code=get("trust_remote_code", False))
        return cls(model, processor, **cls.extra_options(options), prompt=get("prompt"),
                   max_new_tokens=get("max_new_tokens"), num_beams=get("num_beams"))

    @classmethod
    def extra_options(cls, options) -> dict:
        return {}

    # --- one batch

    def prompts(self, images) -> list:
        return [self.prompt or "" for _ in images]

    def inputs(self, images, prompts):
        images = [image.convert("RGB") for image in images]
        if any(prompts):
            batch = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        else:
            batch = self.processor(images=images, return_tensors="pt")
        return self.to_device(batch)

    def to_device(self, batch):
        import torch

        return {k: (v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device))
                if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def generate(self, batch):
        import torch

        with torch.inference_mode():
            return self.model.generate(**batch, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                       do_sample=False)

    def new_tokens(self, ids, batch):
        """The generated ids without the prompt's, when generate() returned the prompt first."""
        prompt = batch.get("input_ids")
        if self.strip_prompt_tokens and prompt is not None and ids.shape[1] >= prompt.shape[1] and bool(
                (ids[:, :prompt.shape[1]] == prompt.to(ids.device)).all()):
            return ids[:, prompt.shape[1]:]
        return ids

    def decode(self, ids) -> list:
        return self.processor.batch_decode(ids, skip_special_tokens=True)

    def clean(self, text, prompt, image) -> str:
        return " ".join(text.split())

    def caption_batch(self, images) -> list:
        prompts = self.prompts(images)
        batch = self.inputs(images, prompts)
        texts = self.decode(self.new_tokens(self.generate(batch), batch))
        return [self.clean(text, prompt, image) for text, prompt, image in zip(texts, prompts, images)]
