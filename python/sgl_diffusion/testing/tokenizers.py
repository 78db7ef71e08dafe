"""Tiny, deterministic tokenizers for offline test fixtures.

The vocabularies are learned from :data:`CORPUS` by a small pure-Python BPE learner
(:func:`learn_bpe`). The ``tokenizers`` library trainers are deliberately not used: they break
frequency ties in hash order (and the Unigram trainer is multithreaded), so two identical runs can
produce different ids. Everything here is a pure function of the corpus, so two fixture builds are
byte-identical.

Words are split exactly as the target tokenizer splits them, by running the tokenizer's own
normalizer and pre-tokenizer (:func:`pretokenize`) over the corpus, so every corpus word ends up as a
single token of the learned vocabulary.

Adding a tokenizer family is one function: build an "alphabet only" tokenizer of the target class,
pre-tokenize :data:`CORPUS` (plus any pipeline templates) with it, call :func:`learn_bpe`, and
construct the final tokenizer from the resulting vocabulary and merges (see :func:`tiny_clip_tokenizer`).
Byte-level BPE tokenizers (Qwen2, Llama-3, Mistral/tekken) use :func:`bytes_to_unicode` for their
alphabet; Unigram tokenizers (T5/UMT5) use :func:`unigram_pieces`.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer, T5Tokenizer

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "CORPUS",
    "MISTRAL_SPECIAL_TOKENS",
    "QWEN2_SPECIAL_TOKENS",
    "QWEN3_CHAT_TEMPLATE",
    "bytes_to_unicode",
    "corpus_word_counts",
    "learn_bpe",
    "pretokenize",
    "tiny_byte_level_tokenizer",
    "tiny_clip_tokenizer",
    "tiny_mistral_tokenizer",
    "tiny_qwen2_tokenizer",
    "tiny_qwen3_tokenizer",
    "tiny_t5_tokenizer",
    "unigram_pieces",
]

# ~20 short prompts plus a few extra words. Changing this changes every fixture's token ids (and hence
# every fixture's outputs); append only when really needed. Families whose pipelines hard-code template
# crop indices (Qwen-Image, HunyuanVideo) must add their template text to the corpus they learn from so
# that every template word becomes exactly one token.
CORPUS: tuple[str, ...] = (
    "a photo of a cat",
    "a photo of a dog sitting on a red sofa",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at sunset",
    "a cute corgi wearing sunglasses on the beach",
    "a bowl of fresh fruit on a wooden table",
    "a futuristic city skyline at night, neon lights",
    "portrait of an old man with a white beard",
    "a small boat sailing across a calm blue lake",
    "a close-up of a colorful parrot in the rainforest",
    "a snowy mountain landscape under a starry sky",
    "an oil painting of sunflowers in a vase",
    "a robot playing the piano in a jazz bar",
    "a steaming cup of coffee next to an open book",
    "two cats playing with a ball of yarn",
    "a panda eating bamboo in a green forest",
    "a vintage car parked on a rainy street",
    "a dragon flying over a medieval castle",
    "a bicycle leaning against a brick wall",
    "A fox in the snow, highly detailed, 4k",
    "The quick brown fox jumps over the lazy dog.",
    "dance monkey",
    "hello world! it's a beautiful day, isn't it?",
    "image video prompt negative blurry low quality text",
)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
T5_SPECIALS: tuple[str, str, str] = ("<pad>", "</s>", "<unk>")
#: Qwen2.5-VL's special tokens, in the order of the real vocabulary (which puts them after the BPE ranks,
#: from id 151643 on): text end/padding, chat turns, grounding markers, then the vision placeholders.
QWEN2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Qwen3 adds its reasoning markers after Qwen2's specials.
QWEN3_THINK_TOKENS: tuple[str, ...] = ("<think>", "</think>")
#: A minimal Qwen3 chat template: the turns of the real one (string or text-part content; no system prompt, tools
#: or reasoning history), and its `enable_thinking` switch, which closes an empty reasoning block when it is false.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
T5_CHAR_SCORE = -15.0


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode char table (256 entries, in byte order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def pretokenize(tokenizer: Tokenizer, texts: Iterable[str]) -> list[str]:
    """Split ``texts`` into words exactly as ``tokenizer`` (a ``tokenizers.Tokenizer``) does.

    Runs the tokenizer's normalizer (if any) and pre-tokenizer; returns the words in corpus order.
    """
    words: list[str] = []
    for text in texts:
        if tokenizer.normalizer is not None:
            text = tokenizer.normalizer.normalize_str(text)
        if tokenizer.pre_tokenizer is None:
            words.append(text)
        else:
            words.extend(w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text))
    return words


def corpus_word_counts(words: Iterable[str]) -> dict[str, int]:
    """Word -> frequency, in first-occurrence order (deterministic)."""
    return dict(collections.Counter(words))


def learn_bpe(
    word_counts: Mapping[str, int],
    *,
    end_of_word_suffix: str = "",
    max_merges: int | None = None,
    min_frequency: int = 1,
) -> list[tuple[str, str]]:
    """Learn BPE merges over ``word_counts`` deterministically.

    Each word starts as a sequence of its characters (the last one carrying ``end_of_word_suffix``,
    CLIP style). At every step the most frequent adjacent pair is merged; ties are broken by the
    lexicographically smallest pair, so the result does not depend on hash order. Stops after
    ``max_merges`` merges or when no pair occurs at least ``min_frequency`` times (with the default
    ``min_frequency=1`` every word ends up as a single symbol).
    """
    words: list[tuple[list[str], int]] = []
    for word, count in word_counts.items():
        if not word:
            continue
        symbols = list(word)
        symbols[-1] += end_of_word_suffix
        words.append((symbols, count))

    merges: list[tuple[str, str]] = []
    while max_merges is None or len(merges) < max_merges:
        pair_counts: dict[tuple[str, str], int] = collections.defaultdict(int)
        for symbols, count in words:
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        if pair_counts[best] < min_frequency:
            break
        merges.append(best)
        merged = best[0] + best[1]
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    symbols[i : i + 2] = [merged]
                i += 1
    return merges


def _bpe_vocab(alphabet: Sequence[str], merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Alphabet (in the given order), then one token per merge, deduplicated."""
    vocab: dict[str, int] = {}
    for tok in alphabet:
        vocab.setdefault(tok, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def tiny_clip_tokenizer(corpus: Iterable[str] = CORPUS, *, model_max_length: int = 77) -> CLIPTokenizer:
    """A tiny openai-CLIP-style tokenizer (byte-level BPE with ``</w>``, lower-cased).

    Layout like openai CLIP: 256 byte chars, the same 256 with ``</w>``, the learned merges, then
    ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids; pad = unk = eos.
    """
    from transformers import CLIPTokenizer

    byte_chars = list(bytes_to_unicode().values())
    alphabet = byte_chars + [c + "</w>" for c in byte_chars]
    base = CLIPTokenizer(vocab=_bpe_vocab(alphabet, []) | {CLIP_BOS: 512, CLIP_EOS: 513}, merges=[])
    words = pretokenize(base.backend_tokenizer, corpus)
    merges = learn_bpe(corpus_word_counts(words), end_of_word_suffix="</w>")
    vocab = _bpe_vocab(alphabet, merges)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def unigram_pieces(
    corpus: Iterable[str] = CORPUS,
    *,
    specials: Sequence[str] = T5_SPECIALS,
    char_score: float = T5_CHAR_SCORE,
) -> list[tuple[str, float]]:
    """SentencePiece-Unigram style ``(piece, score)`` list learned from ``corpus``.

    ``specials`` (score 0) first, then ``▁``, then every corpus word as ``▁word`` (score = log relative
    frequency; ordered by descending frequency, then alphabetically), then every other corpus
    character (score ``char_score``, sorted). Case-sensitive, as T5 is.
    """
    texts = list(corpus)
    word_counts = collections.Counter(w for text in texts for w in re.findall(r"\w+", text))
    total = sum(word_counts.values())
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in specials]
    pieces.append(("▁", -2.0))
    seen = {p for p, _ in pieces}
    for word, count in sorted(word_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        piece = "▁" + word
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, math.log(count / total)))
    for ch in sorted({ch for text in texts for ch in text if not ch.isspace()}):
        if ch not in seen:
            seen.add(ch)
            pieces.append((ch, char_score))
    return pieces


def tiny_t5_tokenizer(corpus: Iterable[str] = CORPUS, *, model_max_length: int = 512) -> T5Tokenizer:
    """A tiny T5/UMT5-style Unigram tokenizer: pad 0, eos 1 (appended), unk 2, no sentinel ids."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=unigram_pieces(corpus), extra_ids=0, model_max_length=model_max_length)


def _without_special_tokens(texts: Iterable[str], specials: Sequence[str]) -> list[str]:
    """The plain-text runs between special tokens: a tokenizer splits specials off before it pre-tokenizes,
    so learning merges across e.g. ``<|im_end|>\\n`` would only add tokens that never occur."""
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    return [part for text in texts for part in pattern.split(text) if part]


def tiny_qwen2_tokenizer(
    corpus: Iterable[str] = CORPUS,
    *,
    templates: Sequence[str] = (),
    model_max_length: int = 32768,
    extra_special_tokens: Sequence[str] = (),
) -> Qwen2Tokenizer:
    """A tiny Qwen2 / Qwen2.5-VL tokenizer: byte-level BPE with Qwen2's pre-tokenizer, then the specials.

    ``templates`` are prompt templates whose token counts a pipeline hard-codes (Qwen-Image crops the first
    34 tokens of its chat template): learning merges from them makes each template word one token, as the
    real 151k vocabulary does, so the crop lands on the same boundary. Ids: the 256 byte characters, one per
    merge, then :data:`QWEN2_SPECIAL_TOKENS`, then ``extra_special_tokens`` (Qwen3's reasoning markers).
    ``<|im_end|>`` is eos and ``<|endoftext|>`` pad, as in Qwen2.5-VL's tokenizer_config.json.
    """
    from transformers import Qwen2Tokenizer

    specials = (*QWEN2_SPECIAL_TOKENS, *extra_special_tokens)
    alphabet = list(bytes_to_unicode().values())
    base = Qwen2Tokenizer(vocab=_bpe_vocab(alphabet, []), merges=[])
    texts = [*corpus, *_without_special_tokens(templates, specials)]
    merges = learn_bpe(corpus_word_counts(pretokenize(base.backend_tokenizer, texts)))
    vocab = _bpe_vocab(alphabet, merges)
    for special in specials:
        vocab[special] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[s for s in specials if s not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=model_max_length,
    )


def tiny_byte_level_tokenizer(
    specials: Sequence[str],
    corpus: Iterable[str] = CORPUS,
    *,
    templates: Sequence[str] = (),
    model_max_length: int = 32768,
    **special_tokens: object,
) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (Qwen2's pre-tokenizer: GLM-4 style) kept as ``tokenizer.json``.

    Ids: the 256 byte characters, one per merge learned from ``corpus`` and ``templates`` (with the specials
    cut out), then ``specials`` in order. ``special_tokens`` are the tokenizer's keyword arguments naming them
    (``bos_token=...``, ``extra_special_tokens={...}``). The class is transformers' plain fast tokenizer, which
    saves and reloads ``tokenizer.json`` verbatim (v5 rebuilds Llama-style classes from vocab and merges).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    alphabet = list(bytes_to_unicode().values())
    pre_tokenizer = Qwen2Tokenizer(vocab=_bpe_vocab(alphabet, []), merges=[]).backend_tokenizer.pre_tokenizer
    texts = [*corpus, *_without_special_tokens(templates, specials)] if specials else [*corpus, *templates]
    base = Tokenizer(models.BPE(vocab=_bpe_vocab(alphabet, []), merges=[]))
    base.pre_tokenizer = pre_tokenizer
    merges = learn_bpe(corpus_word_counts(pretokenize(base, texts)))
    backend = Tokenizer(models.BPE(vocab=_bpe_vocab(alphabet, merges), merges=merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        **special_tokens,  # type: ignore[arg-type]
    )


def tiny_qwen3_tokenizer(corpus: Iterable[str] = CORPUS, *, templates: Sequence[str] = ()) -> Qwen2Tokenizer:
    """A tiny Qwen3 tokenizer (Z-Image, FLUX.2-klein): Qwen2's byte-level BPE and specials, then ``<think>`` and
    ``</think>``, with a chat template (:data:`QWEN3_CHAT_TEMPLATE`) that honours ``enable_thinking``. Qwen3's
    real tokenizer is a ``Qwen2Tokenizer`` too."""
    tokenizer = tiny_qwen2_tokenizer(corpus, templates=templates, extra_special_tokens=QWEN3_THINK_TOKENS)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


#: Control tokens of Mistral's tekken vocabulary, in its id order (they come first, from id 0): the ones a
#: Mistral Small 3.1 chat (system prompt, instructions, images) renders.
MISTRAL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)

#: Mistral Small 3.1's chat template, for the conversations FLUX.2-dev renders: BOS, the system prompt, then
#: each user turn as an instruction (text parts joined; image parts as ``[IMG]``).
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = namespace(text='') %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{%- set content.text = content.text + part['text'] %}"
    "{%- else %}{%- set content.text = content.text + '[IMG]' %}{%- endif %}"
    "{%- endfor %}{%- set content = content.text %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + content + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + content + '[/INST]' }}"
    "{%- else %}{{- content + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def tiny_mistral_tokenizer(corpus: Iterable[str] = CORPUS, *, templates: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A tiny Mistral (tekken-style) tokenizer: byte-level BPE with the control tokens first, then the 256
    byte characters, then one token per merge; :data:`MISTRAL_CHAT_TEMPLATE`.

    Built and saved as a plain ``PreTrainedTokenizerFast`` (transformers 5's ``TokenizersBackend``), which
    keeps ``tokenizer.json`` as it is: loading a byte-level vocabulary as ``LlamaTokenizerFast`` would
    rebuild its pre-tokenizer and change the ids. ``templates`` (system prompts) are learned from, so each
    of their words is one token, as in the real 131k vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    texts = [*corpus, *templates]
    words = [word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(text)]
    merges = learn_bpe(corpus_word_counts(words))
    vocab = _bpe_vocab([*MISTRAL_SPECIAL_TOKENS, *bytes_to_unicode().values()], merges)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(MISTRAL_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=MISTRAL_CHAT_TEMPLATE,
        model_max_length=131072,
    )
