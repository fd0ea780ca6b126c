"""`florence2`: Florence-2 (florence-community/Florence-2-large, -base: the checkpoints for transformers' own
Florence2ForConditionalGeneration) with one of its captioning tasks, <CAPTION>, <DETAILED_CAPTION> or
<MORE_DETAILED_CAPTION> (--task, the default): the processor turns the task into its prompt, the model writes,
and the processor's post_process_generation for the task gives the caption."""

from .base import CaptionError
from .hf import TransformersCaptioner

TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")


class Florence2Captioner(TransformersCaptioner):
    name = "florence2"
    model_class = "Florence2ForConditionalGeneration"
    default_max_new_tokens = 1024
    default_num_beams = 3
    strip_prompt_tokens = False  # an encoder-decoder: the output is the answer only

    def __init__(self, model, processor, *, task="<MORE_DETAILED_CAPTION>", **kwargs):
        if task not in TASKS:
            raise CaptionError(f"caption --captioner florence2: --task {task!r} is not one of {', '.join(TASKS)} "
                               f"(the tasks that write a caption)")
        self.task = task
        super().__init__(model, processor, **kwargs)

    @classmethod
    def extra_options(cls, options) -> dict:
        return {"task": getattr(options, "task", None) or "<MORE_DETAILED_CAPTION>"}

    def prompts(self, images) -> list:
        return [self.task for _ in images]

    def decode(self, ids) -> list:
        return self.processor.batch_decode(ids, skip_special_tokens=False)

    def clean(self, text, prompt, image) -> str:
        pad = getattr(getattr(self.processor, "tokenizer", None), "pad_token", None)
        if pad:  # a batch pads the shorter answers; the task's parser leaves them in
            text = text.replace(pad, "")
        parsed = self.processor.post_process_generation(text, task=self.task, image_size=image.size)
        return " ".join(str(parsed[self.task]).split())
