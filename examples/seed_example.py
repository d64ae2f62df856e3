"""The seed program, written as a user would: a 2-layer MLP (10 -> 50 -> 2, ReLU), CrossEntropyLoss, Adam(lr=0.001),
100 epochs on synthetic data. The only change from plain PyTorch is the two fusedopt imports below.

    python examples/seed_example.py                # fusedopt
    python examples/seed_example.py --torch        # plain PyTorch, for comparison
    python examples/seed_example.py --device cuda
"""

import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu")
parser.add_argument("--epochs", type=int, default=100)
parser.add_argument("--torch", action="store_true", help="run with torch.optim / torch.nn instead")
args = parser.parse_args()

if args.torch:
    from torch.nn import CrossEntropyLoss
    from torch.optim import Adam
else:
    from fusedopt.nn import CrossEntropyLoss  # was: from torch.nn import CrossEntropyLoss
    from fusedopt.optim import Adam  # was: from torch.optim import Adam

torch.manual_seed(0)
X = torch.randn(1000, 10)
y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
X, y = X.to(args.device), y.to(args.device)

model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 2)).to(args.device)
criterion = CrossEntropyLoss()
optimizer = Adam(model.parameters(), lr=0.001)

for epoch in range(args.epochs):
    optimizer.zero_grad()
    loss = criterion(model(X), y)
    loss.backward()
    optimizer.step()
    if epoch % 10 == 0 or epoch == args.epochs - 1:
        print(f"epoch {epoch:3d} loss {loss.item():.6f}")
print(f"final loss {loss.item():.8f}")
