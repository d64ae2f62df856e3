"""Drop-in replacements for torch.optim: change `torch.optim.X` to `fusedopt.optim.X`."""

from fusedopt.optim._lowbit import to_full_precision_state_dict
from fusedopt.optim.adafactor import Adafactor
from fusedopt.optim.adagrad import Adagrad
from fusedopt.optim.adam import Adam, AdamW
from fusedopt.optim.lamb import LAMB
from fusedopt.optim.lion import Lion
from fusedopt.optim.muon import Muon

# Not drop-ins for a torch.optim class, so not in __all__ (the registry contract lists the drop-ins).
from fusedopt.optim.muon_adamw import MuonWithAdamW as MuonWithAdamW
from fusedopt.optim.muon_adamw import muon_param_groups as muon_param_groups
from fusedopt.optim.rmsprop import RMSprop
from fusedopt.optim.sgd import SGD

__all__ = ["LAMB", "SGD", "Adafactor", "Adagrad", "Adam", "AdamW", "Lion", "Muon", "RMSprop",
           "to_full_precision_state_dict"]  # fmt: skip
