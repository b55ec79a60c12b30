"""Pallas kernels (Triton on GPU, interpret mode on CPU), each beside its pure-jnp reference.

The decode kernel is `kernels.mla_decode.mla_decode`: its module keeps the package attribute
`mla_decode`, so the function is not re-exported under the same name.
"""

from kernels import dispatch, grouped_matmul, mla_attention, mla_decode
from kernels.dispatch import combine, permute, sort_by_expert
from kernels.grouped_matmul import gmm, gmm_reference, tgmm
from kernels.mla_attention import flash_attention, flash_attention_reference
from kernels.mla_decode import mla_decode_reference

__all__ = [
    "combine", "dispatch", "flash_attention", "flash_attention_reference", "gmm", "gmm_reference",
    "grouped_matmul", "mla_attention", "mla_decode", "mla_decode_reference", "permute",
    "sort_by_expert", "tgmm",
]
