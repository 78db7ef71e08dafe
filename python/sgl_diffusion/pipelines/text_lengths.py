"""Prompts of different token lengths in one batch, without their padding ever reaching the denoiser.

Some families give each prompt its own number of text tokens (Qwen-Image keeps only a prompt's real
tokens, so "a cat" and a paragraph differ in length). The conditioning stores a batch's prompts zero-padded
to the longest, with each row's length (`TEXT_LENGTHS`), so they stack and cut like any row tensor
(requests, outputs per prompt, the two CFG branches). Right before the denoiser runs, `ByTextLength`
groups the rows by length and runs each group on its own tokens only, with no attention mask:

* a row's prediction is the one its request gets when it runs alone, and the one the reference pipeline
  computes (padding plus a key mask is the same math, but softmax over a longer key sequence is blocked
  differently, which moves the last bits: measured 3e-7 on the Qwen-Image fixture);
* attention stays unmasked, so backends without mask support (flash-attn, SageAttention) keep their
  kernels instead of falling back or refusing.

The price: a batch whose prompts differ in length runs one forward per distinct length. Two rows of one
length (the outputs of one request, a prompt and a negative prompt of equal length) still share a forward.

A model that pads every caption itself to a multiple of some size, with a learned pad token rather than a
mask (Z-Image: 32), gives rows of different lengths the same sequence once padded. Such a family groups rows
by that padded length (`bucket`) and the model gets each row's own length (`lengths_key`): rows that the
model lays out alike then share a forward, as in the reference pipeline (a prompt and a short negative
prompt, for one), still without any mask.

A model with a second text input of its own per-row length (HunyuanVideo-1.5: the prompt's features and its
quoted text's) names it in `more_texts` with its lengths key: rows run together when every length agrees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar, cast

import torch

from .guidance import Denoiser

#: The conditioning key of each row's number of real text tokens: an int64 CPU tensor (B,), so grouping
#: rows never waits for the GPU.
TEXT_LENGTHS = "text_lengths"

_Encoded = TypeVar("_Encoded")


def each_text_once(texts: Sequence[str], encode: Callable[[str], _Encoded]) -> list[_Encoded]:
    """`encode(text)` for every text of `texts`, in their order, each distinct text encoded once (a negative prompt
    requests share, the outputs of one request). One text at a time, as the reference pipelines encode a prompt:
    batched with others it would be padded, and the encoder's masked attention and blocked matrix products
    change the last bits."""
    encoded = {text: encode(text) for text in dict.fromkeys(texts)}
    return [encoded[text] for text in texts]


def pad_text_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks `(length_i, hidden)` text rows zero-padded to the longest: `(B, max_length, hidden)`, and
    the lengths as `TEXT_LENGTHS` wants them."""
    if not rows:
        raise ValueError("pad_text_rows needs at least one row")
    longest = max(row.shape[0] for row in rows)
    padded = rows[0].new_zeros(len(rows), longest, rows[0].shape[-1])
    for index, row in enumerate(rows):
        padded[index, : row.shape[0]] = row
    lengths = torch.tensor([row.shape[0] for row in rows], dtype=torch.long)
    return padded, lengths


class ByTextLength:
    """A denoiser call that runs rows of equal text length together, each group without padding.

    Called with the guider's keyword inputs, which include `TEXT_LENGTHS` and the padded text under
    `text_key`. Every other tensor input must be batch-first (one row per output and branch); inputs that
    are no tensors (Qwen-Image's `img_shapes`) reach every group unchanged.

    With `bucket`, rows whose lengths fall in one bucket (`bucket(length)` equal) run together: the text is
    cut to the group's longest row, and the forward gets the group's row lengths, a tuple of ints, under
    `lengths_key` (a model that pads each row to the bucket itself, see the module docstring).

    `more_texts` maps further padded text inputs to their lengths' keys (each an int64 CPU tensor (B,) like
    `TEXT_LENGTHS`): rows group by all their lengths together, and each text is cut to its group's length.
    """

    def __init__(
        self,
        forward: Denoiser,
        text_key: str = "encoder_hidden_states",
        *,
        bucket: Callable[[int], int] | None = None,
        lengths_key: str | None = None,
        more_texts: Mapping[str, str] | None = None,
    ) -> None:
        if (bucket is None) != (lengths_key is None):
            raise ValueError("bucket and lengths_key go together: the model must learn each row's length")
        self.forward = forward
        self.text_key = text_key
        self.bucket = bucket
        self.lengths_key = lengths_key
        self.more_texts = dict(more_texts or {})
        if self.more_texts and bucket is not None:
            raise ValueError("more_texts groups rows by exact lengths: it does not take a bucket")

    def _call(
        self, inputs: dict[str, object], text: torch.Tensor, lengths: list[int], more: dict[str, int] | None = None
    ) -> torch.Tensor:
        # Contiguous, as the reference passes its unpadded embeddings (a strided view could take another
        # matmul path).
        inputs[self.text_key] = text[:, : max(lengths)].contiguous()
        for key, length in (more or {}).items():
            inputs[key] = cast(torch.Tensor, inputs[key])[:, :length].contiguous()
        if self.lengths_key is not None:
            inputs[self.lengths_key] = tuple(lengths)
        return self.forward(**inputs)

    def __call__(self, **inputs: object) -> torch.Tensor:
        lengths = inputs.pop(TEXT_LENGTHS)
        text = inputs[self.text_key]
        if not isinstance(lengths, torch.Tensor) or not isinstance(text, torch.Tensor):
            raise TypeError(f"{TEXT_LENGTHS} and {self.text_key} must be tensors")
        more_lengths = {key: cast(torch.Tensor, inputs.pop(name)).tolist() for key, name in self.more_texts.items()}
        rows = text.shape[0]
        row_lengths = lengths.tolist()
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, length in enumerate(row_lengths):
            key = length if self.bucket is None else self.bucket(length)
            groups.setdefault((key, *(more[row] for more in more_lengths.values())), []).append(row)
        if len(groups) == 1:
            (group_key,) = groups
            return self._call(dict(inputs), text, row_lengths, dict(zip(more_lengths, group_key[1:], strict=True)))
        predictions = []
        for group_key, members in groups.items():
            rows_of_group = self._selector(members, text.device)
            group = {key: self._rows(key, value, rows_of_group, rows) for key, value in inputs.items()}
            group_text = cast(torch.Tensor, group[self.text_key])
            more = dict(zip(more_lengths, group_key[1:], strict=True))
            prediction = self._call(group, group_text, [row_lengths[row] for row in members], more)
            predictions.append((rows_of_group, prediction))
        first = predictions[0][1]
        output = first.new_empty((rows, *first.shape[1:]))
        for rows_of_group, prediction in predictions:
            output[rows_of_group] = prediction
        return output

    @staticmethod
    def _selector(members: list[int], device: torch.device) -> slice | torch.Tensor:
        """The group's rows as a slice when they are consecutive (a request's outputs, one CFG branch of a
        batch whose prompts agree in length): views, and no index copied to the device every step."""
        if members[-1] - members[0] + 1 == len(members):
            return slice(members[0], members[-1] + 1)
        return torch.tensor(members, device=device)

    @staticmethod
    def _rows(key: str, value: object, rows_of_group: slice | torch.Tensor, rows: int) -> object:
        if not isinstance(value, torch.Tensor):
            return value
        if value.ndim == 0 or value.shape[0] != rows:
            raise ValueError(f"denoiser input {key} has shape {tuple(value.shape)}, not {rows} batch-first rows")
        if isinstance(rows_of_group, slice):
            return value[rows_of_group]
        return value.index_select(0, rows_of_group.to(value.device))
