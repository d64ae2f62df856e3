"""Drop-in replacements for torch.nn: `torch.nn.XLoss` becomes `fusedopt.nn.XLoss`, `torch.nn.functional.f`
becomes `fusedopt.nn.functional.f`, and `torch.nn.utils.clip_grad_norm_` becomes `fusedopt.nn.utils.clip_grad_norm_`.
LinearCrossEntropyLoss is torch 2.14's nn.LinearCrossEntropyLoss, computed without the (N, V) logits."""

from fusedopt.nn import functional, utils
from fusedopt.nn.bce_loss import BCELoss, BCEWithLogitsLoss
from fusedopt.nn.cross_entropy import CrossEntropyLoss
from fusedopt.nn.linear_cross_entropy import LinearCrossEntropyLoss
from fusedopt.nn.mse_loss import MSELoss

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "MSELoss",
    "functional",
    "utils",
]
