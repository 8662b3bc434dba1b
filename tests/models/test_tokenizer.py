"""ClipTokenizer: equal to transformers' slow CLIPTokenizer (without ftfy, the configuration the
project runs) on 200 varied prompts with a realistic byte-level BPE vocabulary trained here, for both
the SD 1.x (pad <|endoftext|>) and SD 2.x (pad "!") tokenizer files; a hand-checked toy vocabulary;
the folder reader's precedence and errors.

The slow tokenizer's ids are references of group ``tokenizer`` (``tests/references.py``).
transformers 5 has no slow CLIPTokenizer (its CLIPTokenizer is the tokenizers-backed one, which
tokenises 35-38 of these 200 prompts otherwise), so neither end of the supported range computes
them: they are committed, and computed live (checked against the committed copy, or written with
``ZMAGIC_WRITE_REFERENCES=1``) only with transformers 4.57.6, the last release that has it, and
PyTorch on Python 3.11, e.g. in a venv over ``make test-oldest``'s::

    python3.11 -m venv /tmp/slow
    site=/tmp/slow/lib/python3.11/site-packages
    echo "import site; site.addsitedir('$PWD/.venv-oldest/lib/python3.11/site-packages')" > $site/oldest.pth
    /tmp/slow/bin/pip install --no-deps transformers==4.57.6 tokenizers==0.22.1 huggingface-hub==0.36.0
    ZMAGIC_WRITE_REFERENCES=1 /tmp/slow/bin/python -m pytest tests/models/test_tokenizer.py
"""
import collections
import functools
import json
import random
import sys
import unicodedata

import numpy as np
import pytest
import tokenizers

from tests import references
from tests.references import text_array, torch_reference
from zmagic_jax.models._tokenizer import UNBOUNDED_LENGTH, ClipTokenizer, read_merges

GROUP = "tokenizer"

HAND = [
    "", " ", "a", "A", "a photo of a cat", "A Photo Of A CAT", "an astronaut riding a horse on mars",
    "it's a dog's life", "don't stop, won't stop", "they're here; we've got it", "I'm sure you'll see, he'd say",
    "IT'S LOUD", "DON'T", "They'Re", "'s", "'sun rises", "rock 'n' roll", "''quoted''", "`backticks`",
    "\"double quotes\" and 'single'", "o'clock at 5 o'clock", "l'amour d'été", "y'all'd've",
    "1", "12345", "3.14159", "1,000,000 people", "the year 2024-05-17", "v2.1 vs v1.5", "4k 8K 16k uhd",
    "$100 and 50% off!", "#hashtag @mention", "email me: someone@example.com", "http://example.com/a?b=c&d=e",
    "C++ / C# / F#", "a+b=c", "x^2 + y^2 = z^2", "(parentheses) [brackets] {braces} <angles>",
    "wow!!!", "what?!", "hmm...", "well -- maybe", "ellipsis…", "em—dash en–dash", "a/b\\c|d",
    "~tilde~ _underscore_ *stars*", "((masterpiece)), (best quality:1.2), [low quality]",
    "portrait, 85mm, f/1.8, bokeh, highly detailed, trending on artstation",
    "café", "cafe\u0301", "naïve résumé", "Ångström", "São Paulo", "Zürich über alles", "Ελληνικά ΟΔΟΣ",
    "ΣΊΣΥΦΟΣ", "Α'''Σ ΑΣ'Α", "Москва зимой", "ПРИВЕТ мир", "日本語のテキスト", "中文字符测试", "한국어 문장",
    "ภาษาไทย", "עברית", "العربية", "हिन्दी", "mixed 中文 and english", "東京タワー at night", "\U00020001\uf900",
    "emoji 😀😃😄", "👍🏽 thumbs", "family 👨‍👩‍👧", "flag 🇫🇷", "heart ❤️ red", "snowman ☃ star ★",
    "pink heart \U0001fa77 (emoji newer than Python 3.11's Unicode)", "math ∑∫√∞ ≠ ≤", "arrows → ← ↑",
    "°C and ℃", "ﬁ ligature", "Ｆｕｌｌｗｉｄｔｈ", "ｶﾀｶﾅ", "ß straße STRASSE", "İstanbul ıi", "ǅ dž Ǆ",
    "'ſun K", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ①②", "Ⅻ ½ ² ₁₂ ٣٤",
    "tab\there", "new\nline", "multiple   spaces", "  leading and trailing  ", "\t\n mixed \r\n whitespace \t",
    "nbsp\u00a0here", "thin\u2009space", "ideographic\u3000space", "line\u2028separator", "para\u2029sep",
    "zero\u200bwidth", "soft\u00adhyphen", "bom\ufeffmark", "ctrl\x01char", "null\x00byte", "bell\x07",
    "vt\x0bff\x0c", "nel\x85", "replacement \ufffd char", "private \ue000 use", "a\u0301\u0302\u0303 stacked",
    "<|endoftext|>", "a <|endoftext|> b", "x<|startoftext|>y", "!<|endoftext|>", "<|ENDOFTEXT|>",
    "<|EndOfText|> again", "a<|ENDOFTEXT|>", "<|endoftext", "endoftext|>", "<|notatoken|>", "<<>>",
    "!", "!!", "a!b", "hello! world!", "¡hola!", "!?!?",
    "The Quick Brown Fox Jumps Over The Lazy Dog", "tHe QuIcK bRoWn FoX", "ALL CAPS PROMPT",
    "snake_case_words and camelCaseWords", "kebab-case-words", "dots.in.words", "under_score_",
    "ending with 's", "plural cats' toys", "Jones's house", "'tis the season", "'til dawn",
    "'re 've 'm 'll 'd", "'RE 'VE 'M 'LL 'D", "can't've", "ma'am", "rock'n'roll",
    "a" * 300, "hello " * 100,
]

WORDS = ("a photo of an old oil painting digital art of the with in on by landscape portrait city night "
         "sunset forest river mountain castle dragon robot cyberpunk neon rainy street beautiful highly "
         "detailed sharp focus octane render unreal engine studio lighting cinematic dramatic warm cool "
         "colorful minimalist watercolor sketch pencil charcoal baroque renaissance impressionist surreal "
         "fantasy sci-fi steampunk vaporwave ukiyo-e anime manga pixel low-poly isometric 3d 2d hdr "
         "golden hour blue hour fog mist smoke fire water ice glass metal wood stone").split()
EXTRA = ["it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "café", "naïve", "Zürich",
         "東京", "中文", "😀", "👍🏽", "!", "!!", "?", "...", ",", ";", ":", "(", ")", "1.5", "2024", "#1",
         "Ελλάδα", "Москва", "100%", "$5", "x2", "A", "THE", "Of"]


def generated(seed, count):
    """Prompt-like word salads of 3 to 90 words (many longer than 75 tokens), mixed separators
    and case."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.choice([3, 6, 12, 25, 60, 90])
        words = [rng.choice(WORDS) if rng.random() < 0.8 else rng.choice(EXTRA) for _ in range(n)]
        seps = [rng.choice([" ", " ", " ", ", ", "  ", "\n", "\t", " - "]) for _ in range(n)]
        text = "".join(w + s for w, s in zip(words, seps))
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        out.append(text)
    return out


CORPUS = HAND + generated(0, 200 - len(HAND))


def byte_alphabet():
    """GPT-2's printable stand-ins of the 256 bytes, in CLIP's vocabulary order (printable bytes
    as themselves, then the others mapped from U+0100 up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = {b: b for b in printable}
    for b in range(256):
        if b not in stand_ins:
            stand_ins[b] = 256 + len(stand_ins) - len(printable)
    return [chr(c) for c in stand_ins.values()]


def train_bpe(texts, num_merges):
    """A deterministic byte-level BPE on CLIP's word split (tokenizers' trainer breaks count ties
    by hash order, so the merges are learnt here): the most frequent adjacent pair, ties broken by
    the pair itself, word ends marked with ``</w>``."""
    norm = tokenizers.normalizers.Sequence([tokenizers.normalizers.NFC(), tokenizers.normalizers.Lowercase()])
    pre = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"),
                                        behavior="removed", invert=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    counts = collections.Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in counts.items()}
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = count
        words = merged
    return merges


def clip_files(folder, merges, tokenizer_config=None, special_tokens_map=None):
    """vocab.json / merges.txt in CLIP's layout: bytes, bytes + </w>, merge results, then
    <|startoftext|> and <|endoftext|>."""
    alphabet = byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    for a, b in merges:
        if a + b not in vocab:
            vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if special_tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return folder


def added(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


# tokenizer_config.json / special_tokens_map.json as the Stable Diffusion repositories ship them
# (legacy, no added_tokens_decoder, so special_tokens_map.json is read).
SD1 = ({"model_max_length": 77, "do_lower_case": True, "errors": "replace", "tokenizer_class": "CLIPTokenizer",
        "bos_token": dict(added("<|startoftext|>"), __type="AddedToken"), "pad_token": "<|endoftext|>",
        "eos_token": dict(added("<|endoftext|>"), __type="AddedToken"),
        "unk_token": dict(added("<|endoftext|>"), __type="AddedToken")},
       {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
        "pad_token": "<|endoftext|>", "unk_token": added("<|endoftext|>")})
SD2 = ({**SD1[0], "pad_token": "!"}, {**SD1[1], "pad_token": "!"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    merges = train_bpe(generated(1, 400) + HAND + [" ".join(WORDS)] * 5, 300)
    root = tmp_path_factory.mktemp("clip_tokenizer")
    return {name: clip_files(root / name, merges, *files) for name, files in (("sd1", SD1), ("sd2", SD2))}


# --- against transformers' slow CLIPTokenizer (committed references) ----------------------------------

def have_slow_tokenizer() -> bool:
    """Whether transformers' slow CLIPTokenizer is importable: transformers 5 replaced it by the
    tokenizers-backed one."""
    try:
        import transformers
    except ImportError:
        return False
    return int(transformers.__version__.split(".")[0]) < 5


def slow_reference(name: str, compute):
    """The slow tokenizer's output ``name``: ``compute()`` where it is importable (and PyTorch,
    which ``torch_reference`` asks for to compute live and to write), else the committed copy."""
    if have_slow_tokenizer():
        return torch_reference(GROUP, name, compute)
    # torch_reference would compute wherever PyTorch is (make test-oldest); this is its
    # committed-copy branch
    value = references._unflatten(name, references._stored(GROUP))
    if value is None:
        pytest.fail(f"reference {GROUP}:{name} is not committed; see the module docstring")
    return value


@functools.lru_cache(maxsize=None)
def _slow_tokenizer(folder: str):
    """transformers' slow CLIPTokenizer of ``folder`` as it runs without ftfy."""
    import transformers
    # transformers uses ftfy when it is importable; the project's environments have none, and the
    # reference must be that configuration even where it is installed
    saved = sys.modules.get("ftfy")
    sys.modules["ftfy"] = None
    try:
        slow = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    finally:
        if saved is None:
            del sys.modules["ftfy"]
        else:
            sys.modules["ftfy"] = saved
    assert slow.fix_text is None
    return slow


def slow_ids(folder, prompts, length=77) -> np.ndarray:
    """The slow tokenizer's ids, as int16 (the 814 ids fit; numpy refuses Python ints that do not)."""
    slow = _slow_tokenizer(str(folder))
    return np.asarray(slow(list(prompts), padding="max_length", truncation=True, max_length=length)["input_ids"],
                      np.int16)


def _slow_corpus(folder) -> dict:
    """The slow tokenizer on the corpus: ``ids`` at max_length 77, its bos / eos / pad ids,
    model_max_length and vocab_size (``specials``), and every prompt's tokens untruncated
    (``tokens`` concatenated, ``lengths``)."""
    slow = _slow_tokenizer(str(folder))
    tokens = [slow.convert_tokens_to_ids(slow.tokenize(p)) for p in CORPUS]
    return {"ids": slow_ids(folder, CORPUS),
            "specials": np.array([slow.bos_token_id, slow.eos_token_id, slow.pad_token_id, slow.model_max_length,
                                  slow.vocab_size]),
            "tokens": np.asarray(sum(tokens, []), np.int16), "lengths": np.array([len(t) for t in tokens])}


def _slow_merges(folder) -> np.ndarray:
    """The merges the slow tokenizer read, in rank order, as UTF-8 lines ``left right``."""
    ranks = _slow_tokenizer(str(folder)).bpe_ranks
    return text_array("\n".join(" ".join(pair) for pair in sorted(ranks, key=ranks.get)))


def _unassigned() -> np.ndarray:
    """The code points of the corpus unassigned (category Cn) in the running Python's Unicode."""
    return np.array(sorted({ord(c) for p in CORPUS for c in p if unicodedata.category(c) == "Cn"}), np.int64)


@pytest.fixture(scope="module")
def as_reference_read():
    """Prompts as the references' Python read them. The slow tokenizer, like ClipTokenizer, drops
    what the running Python's ``unicodedata`` calls unassigned, so a character newer than the
    references' Python (3.11, Unicode 14.0), but known here, is dropped there and kept here (U+1FA77
    of the "pink heart" prompt on 3.12, Unicode 15.0). Such characters are removed before the
    comparison: the rest of their prompts is still compared, the characters themselves only on a
    Python of the references' Unicode version."""
    newer = {chr(c) for c in slow_reference("unassigned", _unassigned) if unicodedata.category(chr(c)) != "Cn"}
    return lambda prompts: ["".join(c for c in p if c not in newer) for p in prompts]


def test_trained_vocabulary_is_the_references(trained):
    """The BPE learnt here (tokenizers' normalizers on a seeded corpus, ties broken by the pair) is
    the one the references were computed with, whatever the Python or tokenizers version."""
    merges = bytes(slow_reference("merges", lambda: _slow_merges(trained["sd1"]))).decode()
    assert (trained["sd1"] / "merges.txt").read_text(encoding="utf-8").split("\n", 1)[1].strip() == merges


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_corpus_equals_slow_clip_tokenizer(trained, as_reference_read, name):
    ours = ClipTokenizer.from_folder(trained[name])
    reference = slow_reference(name, lambda: _slow_corpus(trained[name]))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.model_max_length, ours.vocab_size) == \
        tuple(reference["specials"])
    expected = reference["ids"]
    got = ours(as_reference_read(CORPUS), 77)
    assert got.dtype == np.int32 and got.shape == (200, 77)
    differ = [prompt for prompt, a, b in zip(CORPUS, got, expected) if not np.array_equal(a, b)]
    assert not differ, f"{len(differ)} of 200 differ: {differ[:5]}"
    # the comparison is meaningful: merged multi-byte tokens, words split into several pieces,
    # prompts truncated and padded
    vocab = {i: t for t, i in json.loads((trained[name] / "vocab.json").read_text(encoding="utf-8")).items()}
    tokens = [vocab[i] for i in reference["tokens"]]
    assert sum(len(t.replace("</w>", "")) > 1 for t in tokens) > 0.3 * len(tokens)
    assert sum(not t.endswith("</w>") for t in tokens) > 0.2 * len(tokens)
    lengths = reference["lengths"]
    assert sum(n > 75 for n in lengths) >= 20 and sum(n < 20 for n in lengths) >= 100


def test_other_lengths_equal_slow(trained, as_reference_read):
    ours = ClipTokenizer.from_folder(trained["sd1"])
    for length in (3, 16):  # at max_length=2 CLIPTokenizer logs an error and leaves prompts untruncated
        expected = slow_reference(f"sd1_max_length_{length}", lambda: slow_ids(trained["sd1"], CORPUS[:60], length))
        np.testing.assert_array_equal(ours(as_reference_read(CORPUS[:60]), length), expected)


@pytest.mark.xfail(strict=True, reason="documented difference: a case variant of <|endoftext|> right after "
                                       "punctuation is the special token here, BPE pieces in CLIPTokenizer")
def test_known_difference(trained):
    ours = ClipTokenizer.from_folder(trained["sd1"])
    expected = slow_reference("known_difference", lambda: slow_ids(trained["sd1"], ["!<|ENDOFTEXT|>"], 8))
    np.testing.assert_array_equal(ours(["!<|ENDOFTEXT|>"], 8), expected)


# --- without transformers ----------------------------------------------------------------------------

TOY_VOCAB = ["!", "a", "c", "t", "o", "a</w>", "c</w>", "t</w>", "o</w>", "ca", "cat</w>", "!</w>",
             "<|startoftext|>", "<|endoftext|>"]
TOY_MERGES = "#version: 0.2\nc a\nca t</w>\n"


@pytest.fixture()
def toy(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(TOY_VOCAB)}))
    (tmp_path / "merges.txt").write_text(TOY_MERGES)
    return tmp_path


def test_toy_vocabulary(toy):
    tok = ClipTokenizer.from_folder(toy)
    ids = {t: i for i, t in enumerate(TOY_VOCAB)}
    bos, eos = ids["<|startoftext|>"], ids["<|endoftext|>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (bos, eos, eos, eos)
    assert tok.model_max_length == UNBOUNDED_LENGTH and tok.vocab_size == len(TOY_VOCAB)
    out = tok(["A CAT", "cat!", "", "cot", "cat " * 10], 6)
    np.testing.assert_array_equal(out, [
        [bos, ids["a</w>"], ids["cat</w>"], eos, eos, eos],
        [bos, ids["cat</w>"], ids["!</w>"], eos, eos, eos],
        [bos, eos, eos, eos, eos, eos],
        [bos, ids["c"], ids["o"], ids["t</w>"], eos, eos],
        [bos, ids["cat</w>"], ids["cat</w>"], ids["cat</w>"], ids["cat</w>"], eos],  # truncated, eos kept
    ])
    assert tok.token_ids("x!") == [tok.unk_token_id, ids["!</w>"]]  # a symbol outside the vocabulary


def test_pad_token_from_special_tokens_map(toy):
    """Legacy folders: special_tokens_map.json overrides tokenizer_config.json (SD 2.x pads with "!",
    which is then also kept whole in the text, as CLIPTokenizer does)."""
    (toy / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}))
    (toy / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    tok = ClipTokenizer.from_folder(toy)
    assert tok.pad_token_id == TOY_VOCAB.index("!") and tok.model_max_length == 77
    assert tok(["cat!"], 5).tolist() == [[12, 10, 0, 13, 0]]
    # with added_tokens_decoder (newer files) tokenizer_config.json alone counts
    (toy / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "added_tokens_decoder": {
        "12": added("<|startoftext|>"), "13": added("<|endoftext|>")}}))
    assert ClipTokenizer.from_folder(toy).pad_token_id == 13


def test_added_tokens_beyond_vocab(toy):
    (toy / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "14": dict(added("<cat-toy>"), special=False)}}))
    tok = ClipTokenizer.from_folder(toy)
    assert tok(["a <cat-toy>"], 5).tolist() == [[12, 5, 14, 13, 13]]
    (toy / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"20": added("<x>")}}))
    with pytest.raises(ValueError, match="must take the next free id 14"):
        ClipTokenizer.from_folder(toy)


def test_folder_errors(toy, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match=r"vocab\.json not found.*tokenizer/ subfolder"):
        ClipTokenizer.from_folder(empty)
    (empty / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt not found"):
        ClipTokenizer.from_folder(empty)
    (toy / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match=r"pad_token '<pad>' is neither in vocab\.json"):
        ClipTokenizer.from_folder(toy)
    (toy / "special_tokens_map.json").unlink()
    (toy / "merges.txt").write_text("#version: 0.2\nc a\nca x\n")
    with pytest.raises(ValueError, match=r"merge 1 \(ca x\) needs 'x'"):
        ClipTokenizer.from_folder(toy)
    (toy / "vocab.json").write_text("not json")
    with pytest.raises(ValueError, match="could not read vocabulary"):
        ClipTokenizer.from_folder(toy)


def test_call_errors(toy):
    tok = ClipTokenizer.from_folder(toy)
    with pytest.raises(TypeError, match="list of strings"):
        tok("a cat", 77)
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        tok(["a"], 1)


def test_read_merges_as_clip_tokenizer():
    text = "#version: 0.2\na b\nbad line here\nc d\na b\n" + "".join(f"x{i} y\n" for i in range(49000))
    merges = read_merges(text)
    assert merges[:2] == [("c", "d"), ("a", "b")]  # a repeated pair keeps its later rank
    assert len(merges) == 48894 - 4 + 2  # at most 48894 lines after the header
