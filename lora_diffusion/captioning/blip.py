"""`blip`: BLIP (Salesforce/blip-image-captioning-large, -base) and BLIP-2 (Salesforce/blip2-opt-2.7b,
blip2-flan-t5-xl, ...) through transformers; config.json's model_type picks BlipForConditionalGeneration or
Blip2ForConditionalGeneration. --prompt: BLIP continues it ('a photography of'; the caption keeps it, as BLIP
writes it), BLIP-2 answers it ('Question: what is shown? Answer:'; only the answer is kept)."""

from .hf import TransformersCaptioner, model_type


def blip_class(folder):
    return "Blip2ForConditionalGeneration" if model_type(folder) in ("blip-2", "blip_2") else \
        "BlipForConditionalGeneration"


class BlipCaptioner(TransformersCaptioner):
    name = "blip"
    model_class = staticmethod(blip_class)
    default_max_new_tokens = 75
    default_num_beams = 3

    @property
    def is_blip2(self):
        return type(self.model).__name__.startswith("Blip2")

    def new_tokens(self, ids, batch):
        if not self.is_blip2:  # BLIP's decoder starts again from the prompt: the caption includes it
            return ids
        return super().new_tokens(ids, batch)
