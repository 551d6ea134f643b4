"""Transformer Engine STAND-IN for moeforge's CPU tests. Not NVIDIA's Transformer Engine.

A test double of the small part of TE's PyTorch API that moeforge calls (model/fp8/te.py):
`transformer_engine.pytorch.Linear`, `GroupedLinear`, `autocast` / `fp8_autocast`, and the
recipes of `transformer_engine.common.recipe`. Constructor arguments, defaults, parameter names
and shapes, the `_extra_state` entry and the dimension checks follow TE's own source
(NVIDIA/TransformerEngine, transformer_engine/pytorch/module/{base,linear,grouped_linear}.py,
quantization.py, common/recipe/__init__.py, read at 2.20.0.dev0); the code is written here, not
copied. The GEMMs run moeforge's emulated FP8 (model/fp8/gemm.py) inside an enabled autocast and
plain high-precision GEMMs outside it, on any device.

Installed only by the tests (tests/te_standin/__init__.py puts this folder on sys.path and
PYTHONPATH when the real TE is absent). `IS_MOEFORGE_TEST_STANDIN` marks it: model/fp8/te.py
lets fp8.backend=te run on a CPU only when the imported TE carries that marker.
"""

__version__ = "0.0.0+moeforge.test.standin"

# model/fp8/te.py `check` accepts a non-CUDA device only when this attribute is present and true.
IS_MOEFORGE_TEST_STANDIN = True
