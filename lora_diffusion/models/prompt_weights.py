"""Weighted captions (kohya's --weighted_captions): the web UIs' emphasis syntax in a caption, `(word:1.3)`,
`(word)` = x1.1, `[word]` = /1.1 (nested ones multiply; `\\(` is a literal parenthesis), as weights on the text
encoder's output states of those tokens, rescaled so that each caption's mean state keeps its unweighted value,
as kohya's get_weighted_text_embeddings does.

    fragments = parse_weights("a (red:1.5) square")      # [("a ", 1.0), ("red", 1.5), (" square", 1.0)]
    states = apply_token_weights(states, token_weights(tokenizer, [fragments], states.shape[1]))
"""

import re

import torch

EMPHASIS, DE_EMPHASIS = 1.1, 1 / 1.1
_TOKENS = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """A caption -> its (text, weight) fragments, in order; brackets that never close apply to the end."""
    out: list[list] = []
    round_open, square_open = [], []

    def multiply(start, factor):
        for fragment in out[start:]:
            fragment[1] *= factor

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            out.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(out))
        elif token == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), EMPHASIS)
        elif token == "]" and square_open:
            multiply(square_open.pop(), DE_EMPHASIS)
        else:
            out.append([token, 1.0])
    for start in round_open:
        multiply(start, EMPHASIS)
    for start in square_open:
        multiply(start, DE_EMPHASIS)
    merged: list[list] = []
    for fragment, weight in out:  # neighbours of one weight become one fragment
        if merged and merged[-1][1] == weight:
            merged[-1][0] += fragment
        else:
            merged.append([fragment, weight])
    return [(fragment, weight) for fragment, weight in merged if fragment] or [("", 1.0)]


def plain_text(fragments) -> str:
    """The caption the text encoder reads: the fragments without their brackets and weights."""
    return "".join(fragment for fragment, _ in fragments)


def token_weights(tokenizer, captions_fragments, length: int) -> torch.Tensor:
    """(B, length) weights of the encoder's output positions, laid out as encode_prompts lays its states out
    (BOS, the caption's tokens in order across windows, EOS and padding): each fragment tokenized on its own gives
    its weight to its tokens; BOS, EOS and padding weigh 1."""
    rows = []
    for fragments in captions_fragments:
        weights = [1.0]  # BOS
        for fragment, weight in fragments:
            ids = tokenizer(fragment, add_special_tokens=False).input_ids if fragment.strip() else []
            weights += [weight] * len(ids)
        weights = (weights + [1.0] * length)[:length]
        rows.append(weights)
    return torch.tensor(rows)


def apply_token_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """states (B, T, D) x weights (B, T), each caption rescaled to its unweighted mean (kohya's)."""
    weights = weights.to(states.device, states.dtype)
    before = states.float().mean(dim=(-2, -1))
    weighted = states * weights.unsqueeze(-1)
    after = weighted.float().mean(dim=(-2, -1))
    return weighted * (before / after).to(states.dtype).unsqueeze(-1).unsqueeze(-1)
