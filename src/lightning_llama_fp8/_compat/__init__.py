"""Every call into a private API of Lightning, Transformer Engine or megatron-core, and the version probes.

One place to read when bumping a dependency: the rest of the package calls these wrappers, and the tests of this
sub-package fail when a private name they rely on moves.
"""
