"""`vlm`: a current vision-language model through transformers' image-text-to-text models (Qwen2-VL / Qwen2.5-VL
class: Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen2-VL-2B-Instruct) with a user prompt
(--prompt): the processor's chat template makes one user turn of the image and the prompt, the model answers,
and the answer (the tokens after the prompt) is the caption."""

from .hf import TransformersCaptioner

PROMPT = ("Describe this image in one or two sentences for a text-to-image training caption: the subject, its "
          "colours, the background and the style. Answer with the caption only.")


class VLMCaptioner(TransformersCaptioner):
    name = "vlm"
    model_class = "AutoModelForImageTextToText"
    default_prompt = PROMPT
    default_max_new_tokens = 128

    def prompts(self, images) -> list:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return [text for _ in images]

    def clean(self, text, prompt, image) -> str:
        text = " ".join(text.split())
        return text[1:-1].strip() if len(text) > 1 and text[0] == text[-1] == '"' else text
