"""Drop-in replacements for torch.nn: `torch.nn.utils.clip_grad_norm_` becomes `fusedopt.nn.utils.clip_grad_norm_`."""

from fusedopt.nn import utils

__all__ = ["utils"]
