"""OKD methods: one file per method, each returning a dict of named, weighted loss terms."""

from mcl_lightning.methods.base import OKDMethod, get_method, list_methods, reference_layout, register_method
from mcl_lightning.methods.cl_ilr import CLILR
from mcl_lightning.methods.dml import DML
from mcl_lightning.methods.independent import Independent
from mcl_lightning.methods.mcl_okd import MCLOKD
from mcl_lightning.methods.mutual_cl import MutualCL
from mcl_lightning.methods.okddip import OKDDip
from mcl_lightning.methods.one import ONE

__all__ = ["CLILR", "DML", "Independent", "MCLOKD", "MutualCL", "OKDDip", "OKDMethod", "ONE", "get_method",
           "list_methods", "reference_layout", "register_method"]
