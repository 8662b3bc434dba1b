"""The README's API examples run as they are written and print what their comments say.

Every ``python`` block preceded by ``<!-- tested: NAME -->`` is run, in order, in one namespace
(later blocks continue earlier ones); each ``print(...)  # expected`` line must print the
expected text (numbers to 4 significant digits, float32 round-off aside)."""
import contextlib
import io
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- tested: ([\w-]+) -->\n```python\n(.*?)```", re.S)
PRINT = re.compile(r"^print\(.*\)\s+#\s*(.+)$")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|inf|nan")


def _tokens(text):
    """Numbers as floats, everything else as words, so ``(8, 4) True`` and ``[2.7 0.12]`` compare."""
    numbers = [float(n) for n in NUMBER.findall(text)]
    words = NUMBER.sub(" ", re.sub(r"[\[\](),]", " ", text)).split()
    return numbers, words


def test_readme_examples_print_what_they_say():
    blocks = BLOCK.findall(README.read_text())
    assert [name for name, _ in blocks] == ["custom-scheme", "grad-vmap", "amdm", "one-way"], "the README's tested blocks changed"
    namespace = {}
    expected = [PRINT.match(line).group(1) for _, code in blocks for line in code.splitlines()
                if PRINT.match(line)]
    assert len(expected) == 5
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for name, code in blocks:
            exec(compile(code, f"README.md:{name}", "exec"), namespace)
    printed = out.getvalue().strip().splitlines()
    assert len(printed) == len(expected), printed
    for got, want in zip(printed, expected):
        (got_numbers, got_words), (want_numbers, want_words) = _tokens(got), _tokens(want)
        assert got_words == want_words, (got, want)
        np.testing.assert_allclose(got_numbers, want_numbers, rtol=2e-4, err_msg=f"{got!r} vs README {want!r}")
