"""Cases for core.functional (filled in with the functional ops)."""

CASES = []
