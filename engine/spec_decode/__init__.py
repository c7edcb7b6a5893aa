"""Speculative decoding: proposers (n-gram prompt lookup, ...) guess the next tokens, the target
model scores all of them in one forward, and the rejection sampler keeps the target's output
distribution exactly."""
