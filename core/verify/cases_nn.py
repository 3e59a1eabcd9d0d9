"""Cases for core.nn modules."""

CASES = []
