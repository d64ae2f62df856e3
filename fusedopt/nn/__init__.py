"""Drop-in replacements for torch.nn: swap `torch.nn.X` for `fusedopt.nn.X` (losses), and
`torch.nn.utils.clip_grad_norm_` for `fusedopt.nn.utils.clip_grad_norm_`."""

from fusedopt.nn import functional, utils
from fusedopt.nn.bce_loss import BCELoss, BCEWithLogitsLoss
from fusedopt.nn.mse_loss import MSELoss

__all__ = ["BCELoss", "BCEWithLogitsLoss", "MSELoss", "functional", "utils"]
