"""Cases for the spatial, attention and Gumbel-softmax ops of core.functional."""

CASES = []
