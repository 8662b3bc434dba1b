"""PyTorch reference definitions of the ported networks (``torch_<network>.py``), random weights for
them drawn with numpy (``random_weights.py``), and ``verify.py``, which checks a port against its
reference on your own checkpoint. Not part of the installed package: run it from a checkout
(``python ports/verify.py --help``). PyTorch comes from the test extra."""
