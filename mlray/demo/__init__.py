"""The packaged demo: real multi-label data sets composed from images shipped in
packages (``datasets``) and the end-to-end ``mlray demo`` (``run``)."""
