"""The bottom floor: storage and the on-disk contracts other tools read.

``storage`` (every path a URI, retries, atomic writes), ``lease`` (one writer per
tagging OUT), ``manifest`` (the manifest contract), ``tagged`` (the tagging-output
contract). Imports nothing else of mlray.
"""
