"""The seed program, written as a user would: a 2-layer MLP (10 -> 50 -> 2, ReLU), CrossEntropyLoss, Adam(lr=0.001),
100 epochs on synthetic data. The only change from plain PyTorch is the fusedopt loss import below and the
optimizer's class (examples/optimizers.py: fusedopt.optim.X for torch.optim.X).

    python examples/seed_example.py                      # fusedopt
    python examples/seed_example.py --torch              # plain PyTorch, for comparison
    python examples/seed_example.py --optimizer lion     # another optimizer (examples/optimizers.py)
    python examples/seed_example.py --device cuda
"""

import argparse

import torch
from optimizers import NAMES, help_text, make
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu")
parser.add_argument("--epochs", type=int, default=100)
parser.add_argument("--torch", action="store_true", help="run with torch.optim / torch.nn instead")
parser.add_argument("--optimizer", default="adam", choices=NAMES, metavar="NAME", help=help_text())
args = parser.parse_args()

if args.torch:
    from torch.nn import CrossEntropyLoss
else:
    from fusedopt.nn import CrossEntropyLoss  # was: from torch.nn import CrossEntropyLoss

torch.manual_seed(0)
X = torch.randn(1000, 10)
y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
X, y = X.to(args.device), y.to(args.device)

model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 2)).to(args.device)
criterion = CrossEntropyLoss()
# adam: fusedopt.optim.Adam(model.parameters(), lr=0.001), or torch.optim.Adam with --torch
optimizer = make(args.optimizer, "torch" if args.torch else "fusedopt", model, lr=0.001, head=model[-1])

for epoch in range(args.epochs):
    optimizer.zero_grad()
    loss = criterion(model(X), y)
    loss.backward()
    optimizer.step()
    if epoch % 10 == 0 or epoch == args.epochs - 1:
        print(f"epoch {epoch:3d} loss {loss.item():.6f}")
print(f"final loss {loss.item():.8f}")
