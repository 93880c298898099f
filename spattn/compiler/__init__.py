"""Pattern -> plan -> block-sparse layouts -> generated Triton module.

Not built yet: the compiler issue adds it. The runtime's PyTorch backend already works from
`spattn.patterns.geometry`, which the plan will build on.
"""
