"""`kosmos2`: Kosmos-2 (microsoft/kosmos-2-patch14-224) through transformers' Kosmos2ForConditionalGeneration, with
its grounding prompt. As kosmos-auto-captions does: the processor's post_process_generation strips the phrase,
object and patch-index tokens (the entities and their boxes) from the sentence, then the prompt's own words are
removed from its start, leaving the model's sentence."""

import re

from .hf import TransformersCaptioner

PROMPT = "<grounding>Describe this image in detail:"


class Kosmos2Captioner(TransformersCaptioner):
    name = "kosmos2"
    model_class = "Kosmos2ForConditionalGeneration"
    default_prompt = PROMPT
    default_max_new_tokens = 128
    strip_prompt_tokens = False  # the decoded text is post-processed whole, as Kosmos-2's processor expects

    def inputs(self, images, prompts):
        batch = self.processor(images=[image.convert("RGB") for image in images], text=prompts, return_tensors="pt",
                               padding=True)
        return self.to_device(batch)

    def generate(self, batch):
        import torch

        with torch.inference_mode():
            return self.model.generate(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"],
                                       image_embeds_position_mask=batch["image_embeds_position_mask"],
                                       image_embeds=None, use_cache=True, max_new_tokens=self.max_new_tokens,
                                       num_beams=self.num_beams, do_sample=False)

    def clean(self, text, prompt, image) -> str:
        sentence, _entities = self.processor.post_process_generation(text)
        words = " ".join(re.sub(r"<[^>]*>", " ", prompt or "").split())
        sentence = " ".join(sentence.split())
        if words and sentence.startswith(words):
            sentence = sentence[len(words):]
        return sentence.strip()
