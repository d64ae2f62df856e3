"""Drop-in replacements for torch.nn: `torch.nn.CrossEntropyLoss` becomes `fusedopt.nn.CrossEntropyLoss`,
`torch.nn.functional.cross_entropy` becomes `fusedopt.nn.functional.cross_entropy`, and
`torch.nn.utils.clip_grad_norm_` becomes `fusedopt.nn.utils.clip_grad_norm_`."""

from fusedopt.nn import functional, utils
from fusedopt.nn.cross_entropy import CrossEntropyLoss

__all__ = ["CrossEntropyLoss", "functional", "utils"]
