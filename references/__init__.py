"""Independent reference implementations, used by the tests and the benchmarks.

Each module here re-derives one method from its paper and its authors' code, step by step and
with plain loops where that is clearer. None of them imports ``captum_gradmask``: the library is
checked against them, so they must not share its code (or its mistakes). They are not installed
with the package; run the tests and benchmarks from the repository root.
"""
