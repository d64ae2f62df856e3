"""Drop-in replacements for torch.optim: change `torch.optim.X` to `fusedopt.optim.X`."""

from fusedopt.optim.adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
