"""core.functional (imported as F): the neural-network ops with PyTorch's names and semantics."""
