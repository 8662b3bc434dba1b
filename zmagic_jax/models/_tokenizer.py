"""CLIP's byte-level BPE tokenizer on the ``tokenizers`` library (no deep-learning framework).

:class:`ClipTokenizer` gives the ids transformers' slow ``CLIPTokenizer`` gives (what Stable
Diffusion pipelines and this library used so far), in the configuration transformers runs when the
``ftfy`` package is absent (neither of the project's environments has it). That tokenizer works in
four stages, each rebuilt here:

1. added tokens (``<|startoftext|>``, ``<|endoftext|>``, the pad token, anything in
   ``added_tokens_decoder``) are split out of the raw text, case-sensitively;
2. each remaining piece goes through BERT's ``BasicTokenizer(strip_accents=False,
   do_split_on_punc=False)``: code points 0, U+FFFD and category ``C*`` (but ``\\t\\n\\r``) are
   dropped, ``\\t\\n\\r`` and ``Zs`` become spaces, CJK ideographs are set apart, NFC, split on
   Python whitespace, every word ``str.lower()``-ed;
3. the result is cut by the regex
   ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``
   (case-insensitive), so digits are single tokens and contractions split off;
4. each piece is UTF-8 bytes mapped to GPT-2's printable byte alphabet and BPE-merged with
   ``</w>`` marking the word end; unknown symbols become the unk token.

Here stage 2 is a ``normalizers.Sequence`` (removal and space classes built from the running
Python's ``unicodedata``, as BasicTokenizer's are, NFC, a final-sigma rule, ``Lowercase``), stage 3
a ``Split`` pre-tokenizer whose CJK alternative stands for the spacing, stage 4
``ByteLevel(use_regex=False)`` + ``BPE(end_of_word_suffix="</w>")``.

One known difference from the slow tokenizer, on input no prompt writer produces: a case variant
of ``<|endoftext|>`` / ``<|startoftext|>`` (``<|ENDOFTEXT|>``) directly after punctuation
(``!<|ENDOFTEXT|>``) is the special token here and BPE pieces there; the exact strings, and case
variants elsewhere, agree. Letter/number classes and case mappings come from the Unicode tables
of the Rust regex engine and standard library, so a character whose properties differ between
those and Python's ``regex`` module could in principle tokenise differently.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import unicodedata
from typing import Optional, Sequence

import numpy as np

# transformers' VERY_LARGE_INTEGER: the model_max_length of a tokenizer whose config names none.
UNBOUNDED_LENGTH = int(1e30)

# CLIPTokenizer reads at most this many merges (OpenAI's 49152-token vocabulary minus the 256 bytes
# and the two special tokens), whatever merges.txt holds.
_MAX_MERGES = 49152 - 256 - 2

# The CJK ideograph blocks BasicTokenizer sets apart with spaces (each becomes its own word).
_CJK = (r"\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
        r"\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}")

# Python's str.lower() maps a capital sigma to the final form when a cased letter precedes it
# (through case-ignorable characters) and none follows; tokenizers' Lowercase is per character.
_FINAL_SIGMA = r"(?<=\p{Cased}\p{Case_Ignorable}*)\x{3A3}(?!\p{Case_Ignorable}*\p{Cased})"

# CLIP's word pattern; the CJK alternative comes before letters so an ideograph is a word alone.
_WORDS = (r"(?i)'s|'t|'re|'ve|'m|'ll|'d|[" + _CJK + r"]|[\p{L}&&[^" + _CJK + r"]]+|[\p{N}]"
          r"|[^\s\p{L}\p{N}]+")

# CLIPTokenizer keeps these two strings whole wherever its word regex meets them, in any case
# (its BPE cache maps them to themselves), so they are matched after lowercasing.
_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")

_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
_HOW_TO_GET = ("A CLIP tokenizer folder holds vocab.json and merges.txt (and usually "
               "tokenizer_config.json / special_tokens_map.json), as CLIPTokenizer.save_pretrained writes "
               "them; in a Stable Diffusion folder it is the tokenizer/ subfolder. Copy the files of the "
               "model you use into it.")


@functools.lru_cache(maxsize=None)
def _cleaning_classes() -> tuple:
    """Regex classes of the characters BasicTokenizer drops (0, U+FFFD, category ``C*`` but
    ``\\t\\n\\r``) and of those that then separate words (``str.isspace``), from the running Python's
    ``unicodedata`` as BasicTokenizer reads it, so characters unassigned in Python's Unicode
    version (category ``Cn``, e.g. emoji newer than it) are dropped as there."""
    def char_class(keep) -> str:
        spans, start = [], None
        for cp in range(sys.maxunicode + 2):
            inside = cp <= sys.maxunicode and keep(cp, chr(cp))
            if inside and start is None:
                start = cp
            elif not inside and start is not None:
                spans.append(f"\\x{{{start:X}}}" + ("" if cp - 1 == start else f"-\\x{{{cp - 1:X}}}"))
                start = None
        return "[" + "".join(spans) + "]"

    def dropped(cp, char):
        return cp in (0, 0xFFFD) or (unicodedata.category(char)[0] == "C" and char not in "\t\n\r")

    return char_class(dropped), char_class(lambda cp, char: char.isspace() and not dropped(cp, char))


def _backend():
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError("ClipTokenizer needs the `tokenizers` package (pip install tokenizers); it is "
                          "installed with transformers.") from error
    return tokenizers


def _content(token, *, key: str, file: str) -> dict:
    """A special/added token as a dict of ``tokenizers.AddedToken`` options (string or the
    serialised ``AddedToken`` dict transformers writes)."""
    if isinstance(token, str):
        return {"content": token}
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        if token.get("single_word"):
            raise ValueError(f"{file}: {key} {token['content']!r} has single_word=true, whose matching rule "
                             f"ClipTokenizer does not reproduce; set it to false.")
        return {"content": token["content"], "lstrip": bool(token.get("lstrip", False)),
                "rstrip": bool(token.get("rstrip", False))}
    raise ValueError(f"{file}: {key} must be a string or an AddedToken dict with a 'content' string; "
                     f"got {token!r}.")


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"ClipTokenizer: could not read {what} {path} ({type(error).__name__}: {error}). "
                         f"{_HOW_TO_GET}") from error


def read_merges(text: str) -> list:
    """The BPE merges of a ``merges.txt`` text, in rank order, as CLIPTokenizer reads them: the
    first line is dropped (the ``#version`` header), at most 48894 lines are used, a line is split
    on whitespace and only pairs count; a pair listed twice keeps its later rank."""
    lines = text.strip().split("\n")[1:_MAX_MERGES + 1]
    ranks = {}
    for rank, line in enumerate(lines):
        pair = tuple(line.split())
        if len(pair) == 2:
            ranks[pair] = rank
    return sorted(ranks, key=ranks.get)


class ClipTokenizer:
    """CLIP's tokenizer: ``tokenizer(prompts, max_length)`` is the ``(B, max_length)`` int32 array
    of ``[bos] + tokens + [eos]``, the tokens cut to ``max_length - 2`` (so eos stays last), padded
    on the right with the pad token: transformers' ``CLIPTokenizer(prompts, padding="max_length",
    truncation=True, max_length=max_length)["input_ids"]`` (see the module docstring).

    ``vocab``: token -> id (``vocab.json``); ``merges``: ``(left, right)`` pairs in rank order
    (:func:`read_merges`); ``bos/eos/pad/unk_token``: strings or serialised ``AddedToken`` dicts;
    ``added_tokens``: ``{id: token}`` of further tokens kept whole (``added_tokens_decoder``); a
    token outside ``vocab`` must take the next free id. ``source`` names the files in errors.
    Build one from a folder with :meth:`from_folder`.
    """

    def __init__(self, vocab: dict, merges: Sequence, *, bos_token="<|startoftext|>",
                 eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                 additional_special_tokens: Sequence = (), added_tokens: Optional[dict] = None,
                 model_max_length: int = UNBOUNDED_LENGTH, source: str = "<memory>"):
        tokenizers = _backend()
        self._check_vocab(vocab, merges, source)
        self._vocab = dict(vocab)
        self._model_max_length = int(model_max_length)
        specials = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token,
                    "unk_token": unk_token}
        specials = {key: _content(value, key=key, file=source) for key, value in specials.items()}
        extra = [_content(t, key="additional_special_tokens", file=source) for t in additional_special_tokens]
        listed = sorted(((int(i), _content(t, key="added_tokens_decoder", file=source))
                         for i, t in (added_tokens or {}).items()), key=lambda item: item[0])
        # Ids: a token in vocab.json has its vocab id; a new one must take the next free id, which
        # is the id tokenizers will give it when it is added in id order.
        next_id = len(self._vocab)
        self._added = {}
        for token_id, token in listed:
            known = self._vocab.get(token["content"])
            if known is None and token_id != next_id:
                raise ValueError(f"{source}: added token {token['content']!r} has id {token_id}; a token "
                                 f"outside vocab.json must take the next free id {next_id}.")
            if known is not None and known != token_id:
                raise ValueError(f"{source}: added token {token['content']!r} has id {token_id} but id "
                                 f"{known} in vocab.json; the files belong to different tokenizers.")
            next_id += known is None
            self._added[token["content"]] = (token_id, token)
        for key, token in list(specials.items()) + [("additional_special_tokens", t) for t in extra]:
            if token["content"] not in self._vocab and token["content"] not in self._added:
                raise ValueError(f"{source}: {key} {token['content']!r} is neither in vocab.json nor in "
                                 f"added_tokens_decoder; a CLIP tokenizer folder lists it in one of them.")
            self._added.setdefault(token["content"], (self._token_id(token["content"]), token))
        self._ids = {key: self._token_id(token["content"]) for key, token in specials.items()}

        from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
        model = tokenizers.models.BPE(vocab=self._vocab, merges=[tuple(m) for m in merges],
                                      unk_token=specials["unk_token"]["content"], end_of_word_suffix="</w>",
                                      continuing_subword_prefix="", fuse_unk=False, dropout=None)
        backend = tokenizers.Tokenizer(model)
        dropped, spaces = _cleaning_classes()
        backend.normalizer = normalizers.Sequence([
            normalizers.Replace(Regex(dropped), ""),
            normalizers.Replace(Regex(spaces), " "),
            normalizers.NFC(),
            normalizers.Replace(Regex(_FINAL_SIGMA), "\u03c2"),
            normalizers.Lowercase(),
        ])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        # In id order, so a new token gets the id checked above. The raw text is matched exactly,
        # as CLIPTokenizer's trie does; only CLIP's own two strings are matched after lowercasing.
        for content, (_, token) in sorted(self._added.items(), key=lambda item: item[1][0]):
            backend.add_special_tokens([AddedToken(content, single_word=False, lstrip=token.get("lstrip", False),
                                                   rstrip=token.get("rstrip", False),
                                                   normalized=content in _CLIP_SPECIALS)])
        for content in _CLIP_SPECIALS:
            if content in self._vocab and content not in self._added:
                backend.add_special_tokens([AddedToken(content, normalized=True)])
        for content, (token_id, _) in self._added.items():
            if backend.token_to_id(content) != token_id:
                raise ValueError(f"{source}: added token {content!r} got id {backend.token_to_id(content)}, "
                                 f"expected {token_id}.")
        self._backend = backend

    @staticmethod
    def _check_vocab(vocab, merges, source):
        if not isinstance(vocab, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()):
            raise ValueError(f"{source}: vocab.json must be a JSON object of token -> integer id.")
        ids = sorted(vocab.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"{source}: vocab.json ids must be 0 .. {len(ids) - 1}, each once.")
        for rank, pair in enumerate(merges):
            if len(pair) != 2:
                raise ValueError(f"{source}: merge {rank} is {pair!r}, not a pair of symbols.")
            for symbol in (pair[0], pair[1], pair[0] + pair[1]):
                if symbol not in vocab:
                    raise ValueError(f"{source}: merge {rank} ({' '.join(pair)}) needs {symbol!r}, which is not "
                                     f"in vocab.json; vocab.json and merges.txt must come from the same "
                                     f"tokenizer.")

    def _token_id(self, content: str) -> int:
        if content in self._vocab:
            return self._vocab[content]
        return self._added[content][0]

    @classmethod
    def from_folder(cls, folder) -> "ClipTokenizer":
        """The tokenizer saved in ``folder``: ``vocab.json`` and ``merges.txt``, with the special
        tokens and ``model_max_length`` of ``tokenizer_config.json`` (transformers' precedence: when
        it has no ``added_tokens_decoder``, ``special_tokens_map.json`` overrides it and
        ``added_tokens.json`` lists the added tokens). Stable Diffusion 1.x pads with
        ``<|endoftext|>``, 2.x with ``!``; either is read from these files."""
        folder = os.fspath(folder)
        files = {name: os.path.join(folder, name) for name in ("vocab.json", "merges.txt")}
        for name, path in files.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ClipTokenizer: {path} not found. {_HOW_TO_GET}")
        vocab = _read_json(files["vocab.json"], "vocabulary")
        try:
            with open(files["merges.txt"], encoding="utf-8") as handle:
                merges = read_merges(handle.read())
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"ClipTokenizer: could not read {files['merges.txt']} ({error}). "
                             f"{_HOW_TO_GET}") from error

        def optional(name):
            path = os.path.join(folder, name)
            return _read_json(path, name) if os.path.isfile(path) else {}

        config = optional("tokenizer_config.json")
        options = {key: config.get(key, default) for key, default in _DEFAULTS.items()}
        options["additional_special_tokens"] = list(config.get("additional_special_tokens") or [])
        if "added_tokens_decoder" in config:
            added = config["added_tokens_decoder"]
        else:
            for key, value in optional("special_tokens_map.json").items():
                if key == "additional_special_tokens":
                    options[key] += [t for t in value or [] if t not in options[key]]
                elif key in options:
                    options[key] = value
            added = {index: token for token, index in optional("added_tokens.json").items()}
        for key in _DEFAULTS:
            if options[key] is None:
                raise ValueError(f"ClipTokenizer: {key} is null in {folder}; CLIP needs a {key} "
                                 f"(default {_DEFAULTS[key]!r}).")
        length = config.get("model_max_length", UNBOUNDED_LENGTH)
        if isinstance(length, bool) or not isinstance(length, (int, float)) or length < 2:
            raise ValueError(f"{os.path.join(folder, 'tokenizer_config.json')}: model_max_length must be an "
                             f"integer >= 2; got {length!r}.")
        return cls(vocab, merges, added_tokens=added, model_max_length=int(length),
                   source=folder, **options)

    def token_ids(self, prompt: str) -> list:
        """The token ids of ``prompt`` without bos/eos, untruncated."""
        return self._backend.encode(prompt, add_special_tokens=False).ids

    def __call__(self, prompts: Sequence[str], max_length: int) -> np.ndarray:
        """``(len(prompts), max_length)`` int32 ids: bos, the tokens (at most ``max_length - 2``), eos,
        then pad ids."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"ClipTokenizer: prompts must be a list of strings; got {prompts!r:.80}.")
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise ValueError(f"ClipTokenizer: max_length must be an integer >= 2 (room for bos and eos); "
                             f"got {max_length!r}.")
        out = np.full((len(prompts), int(max_length)), self.pad_token_id, np.int32)
        for row, encoding in enumerate(self._backend.encode_batch(list(prompts), add_special_tokens=False)):
            ids = [self.bos_token_id] + encoding.ids[:max_length - 2] + [self.eos_token_id]
            out[row, :len(ids)] = ids
        return out

    @property
    def model_max_length(self) -> int:
        """``model_max_length`` of ``tokenizer_config.json`` (77 for CLIP), else :data:`UNBOUNDED_LENGTH`."""
        return self._model_max_length

    @property
    def vocab_size(self) -> int:
        """Entries of ``vocab.json`` (CLIPTokenizer's ``vocab_size``; added tokens not counted)."""
        return len(self._vocab)

    @property
    def id_count(self) -> int:
        """One more than the largest id the tokenizer can give (vocab.json and added tokens): the
        embedding table of the text encoder must have at least this many rows."""
        return 1 + max(max(self._vocab.values()), max((i for i, _ in self._added.values()), default=0))

    @property
    def bos_token_id(self) -> int:
        return self._ids["bos_token"]

    @property
    def eos_token_id(self) -> int:
        return self._ids["eos_token"]

    @property
    def pad_token_id(self) -> int:
        return self._ids["pad_token"]

    @property
    def unk_token_id(self) -> int:
        return self._ids["unk_token"]
